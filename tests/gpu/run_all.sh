#!/usr/bin/env bash
# Every multi-GPU test on this host, then a summary table: correctness of TP, TP+SP, PP,
# DP (distributed optimizer), TP2xDP2 and TP2xPP2 against 1 GPU in fp32 (judged) with
# bf16 twins next to their noise floors (reported), checkpoints resumed at TP=1, and
# tokens/s scaling. Layouts that need more GPUs than are visible are skipped.
#
#   OUT=/some/dir GPU_TEST_WORK=/tmp/w bash tests/gpu/run_all.sh   # on a GPU host
#   GPU_TEST_CPU=1 bash tests/gpu/run_all.sh    # rehearsal on CPU at toy size
#
# Writes ${OUT:-runs/gpu}/results.json, run_all.log and logs/ (one per launch); exits
# non-zero if a check fails. PYTHON runs it: default python3 (on GPU hosts, with
# megatron-core installed), or .venv/bin/python for the CPU rehearsal when it exists.
# GPU_TEST_* variables: docs/multi-gpu.md ("GPU tests").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-runs/gpu}
export OUT
mkdir -p "$OUT"
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  if [[ "${GPU_TEST_CPU:-0}" == 1 && -x .venv/bin/python ]]; then
    PYTHON=.venv/bin/python
  fi
fi
# NVLink multicast stays off on shared hosts (docs/multi-gpu.md).
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
"$PYTHON" -m pytest tests/gpu -m gpu -v -rs -p no:cacheprovider 2>&1 | tee "$OUT/run_all.log"
exit "${PIPESTATUS[0]}"
