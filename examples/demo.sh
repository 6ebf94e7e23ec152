#!/usr/bin/env bash
# A real, tiny SAT continual-pre-training run on the demo data (make data builds it):
# a 4-layer Llama-shaped model, SAT at r = 0.5 with maxip + sampling, LORS from iteration
# 30 in 3 ladders, 50 iterations, then a checkpoint in runs/demo/checkpoint.
# Runs on the GPU when there is one, else on CPU (gloo). Extra arguments are passed on to
# pretrain_sat.py, e.g. `make demo DEMO_ARGS="--sat-metric wanda"`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/demo}
OUT=${OUT:-runs/demo}
mkdir -p "$OUT"

MODEL=(
  --num-layers 4 --hidden-size 128 --ffn-hidden-size 352
  --num-attention-heads 8 --group-query-attention --num-query-groups 2
  --seq-length 128 --max-position-embeddings 128
  --normalization RMSNorm --swiglu --position-embedding-type rope --no-rope-fusion
  --untie-embeddings-and-output-weights --disable-bias-linear --no-persist-layer-norm
  --attention-dropout 0 --hidden-dropout 0
)
DATA_ARGS=(
  --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$DATA/tokenizer.model"
  --train-data-path "$DATA/train_text_document" --valid-data-path "$DATA/valid_text_document"
)
TRAIN=(
  --micro-batch-size 4 --global-batch-size 8 --train-iters 50
  --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 5 --weight-decay 0.01
  --clip-grad 1.0 --seed 1234
  --log-interval 5 --eval-interval 25 --eval-iters 2
  --save "$OUT/checkpoint" --save-interval 50 --ckpt-format torch_dist
  --tensorboard-dir "$OUT/tensorboard"
)
SAT=(
  --sat-omission-rate 0.5 --sat-metric maxip --sat-selection sampling
  --sat-temperature 0.05 --sat-lors-start 30 --sat-lors-ladders 3
)
exec "$PY" -m torch.distributed.run --nproc-per-node 1 --master-port "${MASTER_PORT:-29517}" \
  pretrain_sat.py "${MODEL[@]}" "${DATA_ARGS[@]}" "${TRAIN[@]}" "${SAT[@]}" "$@"
