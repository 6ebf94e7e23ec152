#!/usr/bin/env bash
# SAT continual pre-training on one node: one process per GPU under torchrun.
#
#   DATA_PATH=... TOKENIZER_MODEL=... CHECKPOINT_DIR=... PRETRAINED_CHECKPOINT=... \
#     examples/train_torchrun.sh PRESET [pretrain_sat.py flags...]
#
# PRESET is tinyllama, llama2-7b or llama2-13b (examples/presets/); DENSE=1 trains its
# dense twin. Flags given after the preset override the preset's. Every variable is
# described in examples/presets/common.sh and docs/multi-gpu.md; DRY_RUN=1 prints the
# command instead of running it.
set -euo pipefail
# shellcheck source=examples/presets/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/presets/common.sh"
sat_init "$@"
gpus=$(sat_gpus_per_node)
sat_run "$(sat_python)" -m torch.distributed.run --standalone --nnodes 1 \
  --nproc-per-node "$gpus" "$SAT_SCRIPT" "${SAT_ARGS[@]}"
