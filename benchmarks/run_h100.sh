#!/usr/bin/env bash
# The performance suite on one H100 (docs/performance.md quotes its JSON):
#   bash benchmarks/run_h100.sh [OUT_DIR]
# Installs a carried megatron-core wheel if megatron is missing (GPU hosts have no network).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-benchmarks/results}}
PY=${PY:-python3}
mkdir -p "$OUT"
"$PY" -c "import megatron.core" 2>/dev/null || "$PY" -m pip install -q --no-deps .whl/*.whl
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > "$OUT/gpu.txt" || true
status=0
step() { echo "== $(date +%T) $*"; "$PY" "$@" || { echo "FAILED: $*"; status=1; }; }
# whole step: TinyLlama at micro-batch 4 (profiled), 8 and 16; Llama-2-7B layers at 1
step benchmarks/bench_step.py --shape tinyllama --micro-batch-size 4 --global-batch-size 32 \
  --sat-iters 14 --profile --out "$OUT/step_tinyllama_mbs4.json"
for mbs in 16; do
  step benchmarks/bench_step.py --shape tinyllama --micro-batch-size "$mbs" \
    --global-batch-size 32 --out "$OUT/step_tinyllama_mbs$mbs.json"
done
step benchmarks/bench_step.py --shape llama2-7b-8l --micro-batch-size 1 --global-batch-size 8 \
  --out "$OUT/step_llama2_7b_8l_mbs1.json"
# a whole LORS run against dense (target 5)
step benchmarks/bench_lors.py --shape tinyllama --iters 300 --lors-start 200 \
  --micro-batch-size 16 --global-batch-size 16 --out "$OUT/lors_tinyllama.json"
# layers: SAT vs dense vs a dense layer of the kept width, selection cost, host syncs
step benchmarks/bench_layers.py --batch 16 --no-profile --out "$OUT/layers_tinyllama_b16.json"
step benchmarks/bench_layers.py --batch 4 --rates 0.5 --out "$OUT/layers_tinyllama_b4.json"
exit $status
