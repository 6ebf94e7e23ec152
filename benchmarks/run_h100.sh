#!/usr/bin/env bash
# The performance suite on one H100 (docs/performance.md quotes its JSON):
#   bash benchmarks/run_h100.sh [OUT_DIR] [PART...]
# PART: check (the CUDA-only tests), kernels (compile time and speed of the width-dependent
# kernels over a LORS schedule), step (whole training step), lors (a whole LORS run against
# dense), layers, profile; default: all but profile. Every run
# starts with benchmarks/gemm_probe.py (how fast this GPU is today). Installs a carried
# megatron-core wheel if megatron is missing (GPU hosts have no network).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-benchmarks/results}}
shift || true
PARTS=${*:-check kernels step lors layers}
PY=${PY:-python3}
mkdir -p "$OUT"
"$PY" -c "import megatron.core" 2>/dev/null || "$PY" -m pip install -q --no-deps .whl/*.whl
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > "$OUT/gpu.txt" || true
status=0
step() { echo "== $(date +%T) $*"; "$PY" "$@" || { echo "FAILED: $*"; status=1; }; }
step benchmarks/gemm_probe.py --out "$OUT/gemm_probe.json"
part() { [[ " $PARTS " == *" $1 "* ]]; }
if part check; then
  # the log goes to a file: a call's returned output is cut to its tail
  step -m pytest -v -p no:cacheprovider tests/test_torch_fusions.py \
    tests/test_sparse_kernels.py tests/test_fused_selection.py tests/test_fused_norm_loss.py \
    -k cuda > "$OUT/check.log" 2>&1
  grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/check.log"
fi
if part kernels; then
  step benchmarks/bench_kernels.py --out "$OUT/kernels.json"
fi
if part step; then
  # TinyLlama at micro-batch 16 with megatron_sat's torch fusions and without; at 4
  # (host-bound); SAT's memory saving spent on micro-batch 32 (runs out of memory: the
  # fp32 logits); the Llama-2-7B layer shape at as many layers as fit dense (12) and
  # micro-batch 4, one log line per 4 iterations
  for flags in tuned tuned-megatron; do
    step benchmarks/bench_step.py --shape tinyllama --micro-batch-size 16 \
      --global-batch-size 32 --flags "$flags" --out "$OUT/step_tinyllama_mbs16_$flags.json"
  done
  step benchmarks/bench_step.py --shape tinyllama --micro-batch-size 4 --global-batch-size 32 \
    --out "$OUT/step_tinyllama_mbs4.json"
  step benchmarks/bench_step.py --shape tinyllama --micro-batch-size 32 --global-batch-size 32 \
    --block 2 --cycles 1 --out "$OUT/step_tinyllama_mbs32.json"
  step benchmarks/bench_step.py --shape llama2-7b-8l --layers 12 --name llama2-7b-12l \
    --micro-batch-size 4 --global-batch-size 8 --block 8 --log-interval 4 \
    --out "$OUT/step_llama2_7b_12l_mbs4_log4.json"
fi
if part profile; then  # where the GPU time goes: two SAT and two dense iterations each
  step benchmarks/bench_step.py --shape tinyllama --micro-batch-size 16 --global-batch-size 32 \
    --profile --out "$OUT/profile_tinyllama_mbs16.json"
  step benchmarks/bench_step.py --shape llama2-7b-8l --micro-batch-size 4 --global-batch-size 8 \
    --block 8 --log-interval 4 --cycles 3 --profile --out "$OUT/profile_llama2_7b_8l_mbs4.json"
fi
if part lors; then  # target 5
  step benchmarks/bench_lors.py --shape tinyllama --iters 300 --lors-start 200 \
    --micro-batch-size 16 --global-batch-size 16 --out "$OUT/lors_tinyllama.json"
fi
if part layers; then  # SAT vs dense vs a dense layer of the kept width, selection, syncs
  step benchmarks/bench_layers.py --batch 16 --no-profile --out "$OUT/layers_tinyllama_b16.json"
  step benchmarks/bench_layers.py --batch 4 --rates 0.5 --out "$OUT/layers_tinyllama_b4.json"
fi
exit $status
