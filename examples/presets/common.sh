# shellcheck shell=bash
# The one place where a preset becomes a pretrain_sat.py command line. Sourced by
# examples/train_torchrun.sh (one node) and examples/train_slurm.sbatch (many nodes); they
# differ only in the launcher put in front of the command.
#
#   sat_init "$@"   take the preset from $1 (or $PRESET), load it, check the environment and
#                   build SAT_ARGS: every pretrain_sat.py flag, the caller's extra flags last
#                   (argparse keeps the last value of a repeated flag, so they override)
#   sat_run CMD...  export the launch environment and run CMD, or print it with DRY_RUN=1
#
# Environment (see docs/multi-gpu.md):
#   PRESET                 tinyllama | llama2-7b | llama2-13b (or the first argument)
#   DENSE=1                the dense twin: --sat-omission-rate 0, no LORS
#   DATA_PATH              megatron data prefix or blend ("PREFIX" or "W1 PREFIX1 W2 PREFIX2")
#   TOKENIZER_MODEL        SentencePiece model of that data (TOKENIZER_TYPE to change the type)
#   MOCK_DATA=1            megatron's synthetic data instead (smoke tests): no DATA_PATH needed
#   CHECKPOINT_DIR         where checkpoints are saved and from where a run resumes
#   PRETRAINED_CHECKPOINT  megatron checkpoint of the base model, loaded when CHECKPOINT_DIR
#                          has none yet (iteration 0, fresh optimizer); "none": random init
#   TENSORBOARD_DIR        default: $CHECKPOINT_DIR/tensorboard
#   TP PP MICRO_BATCH SEQUENCE_PARALLEL DISTRIBUTED_OPTIMIZER RECOMPUTE
#                          override the preset's parallel layout
#   GPUS_PER_NODE          default: CUDA_VISIBLE_DEVICES, SLURM_GPUS_ON_NODE or nvidia-smi
#   PYTHON                 default: .venv/bin/python of the repository if present, else python3
#   DRY_RUN=1              print the environment and the command instead of running it

SAT_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SAT_PRESETS_DIR="$SAT_REPO/examples/presets"
# shellcheck disable=SC2034  # the launchers' entry point
SAT_SCRIPT="$SAT_REPO/pretrain_sat.py"

sat_die() {
  echo "error: $*" >&2
  exit 2
}

sat_presets() {
  local f names=()
  for f in "$SAT_PRESETS_DIR"/*.sh; do
    [[ $(basename "$f") == common.sh ]] || names+=("$(basename "$f" .sh)")
  done
  echo "${names[*]}"
}

# The value of environment variable $1, required, as a positive integer.
sat_positive_int() {
  local name=$1 value=${!1:-}
  [[ $value =~ ^[1-9][0-9]*$ ]] || sat_die "$name must be a positive integer, got '$value'"
  echo "$value"
}

# $1 in {0, 1}, named $2 in the message.
sat_flag() {
  [[ $1 == 0 || $1 == 1 ]] || sat_die "$2 must be 0 or 1, got '$1'"
}

# Variable $1 must be set; the rest of the arguments say what it is.
sat_require() {
  local name=$1
  shift
  [[ -n ${!name:-} ]] || sat_die "$name is not set: $*"
}

sat_gpus_per_node() {
  local devices
  if [[ -n ${GPUS_PER_NODE:-} ]]; then
    sat_positive_int GPUS_PER_NODE
  elif [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -r -a devices <<<"$CUDA_VISIBLE_DEVICES"
    echo "${#devices[@]}"
  elif [[ ${SLURM_GPUS_ON_NODE:-} =~ ^[1-9][0-9]*$ ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    nvidia-smi -L | grep -c '^GPU'
  else
    sat_die "cannot tell how many GPUs this node has (no nvidia-smi): set GPUS_PER_NODE"
  fi
}

sat_init() {
  if [[ $# -gt 0 && $1 != -* ]]; then
    PRESET=$1
    shift
  fi
  [[ -n ${PRESET:-} ]] ||
    sat_die "no preset: give one of: $(sat_presets) (first argument or PRESET)"
  [[ $PRESET =~ ^[A-Za-z0-9._-]+$ && -f "$SAT_PRESETS_DIR/$PRESET.sh" && $PRESET != common ]] ||
    sat_die "unknown preset '$PRESET'; choose one of: $(sat_presets)"
  # shellcheck source=examples/presets/tinyllama.sh
  source "$SAT_PRESETS_DIR/$PRESET.sh"

  DENSE=${DENSE:-0}
  sat_flag "$DENSE" DENSE
  TP=${TP:-$LAYOUT_TP}
  PP=${PP:-$LAYOUT_PP}
  MICRO_BATCH=${MICRO_BATCH:-$LAYOUT_MICRO_BATCH}
  SEQUENCE_PARALLEL=${SEQUENCE_PARALLEL:-$LAYOUT_SEQUENCE_PARALLEL}
  DISTRIBUTED_OPTIMIZER=${DISTRIBUTED_OPTIMIZER:-$LAYOUT_DISTRIBUTED_OPTIMIZER}
  RECOMPUTE=${RECOMPUTE:-$LAYOUT_RECOMPUTE}
  sat_positive_int TP >/dev/null
  sat_positive_int PP >/dev/null
  sat_positive_int MICRO_BATCH >/dev/null
  sat_flag "$SEQUENCE_PARALLEL" SEQUENCE_PARALLEL
  sat_flag "$DISTRIBUTED_OPTIMIZER" DISTRIBUTED_OPTIMIZER
  if [[ $SEQUENCE_PARALLEL == 1 && $TP == 1 ]]; then
    sat_die "SEQUENCE_PARALLEL=1 needs TP > 1"
  fi

  SAT_ARGS=("${MODEL_ARGS[@]}")
  sat_add_llama_args
  sat_add_layout_args
  sat_add_training_args
  sat_add_sat_args
  sat_add_data_args
  sat_add_checkpoint_args
  SAT_ARGS+=("$@")
}

# Llama architecture (also TinyLlama), the paper's sequence length, and the flags megatron
# needs without Transformer Engine and apex (docs/multi-gpu.md, "Flags without TE/apex").
sat_add_llama_args() {
  SAT_ARGS+=(
    --seq-length 4096 --max-position-embeddings 4096
    --normalization RMSNorm --norm-epsilon 1e-5 --swiglu
    --position-embedding-type rope --rotary-base 10000
    --untie-embeddings-and-output-weights --disable-bias-linear
    --attention-dropout 0 --hidden-dropout 0
    --no-rope-fusion --no-persist-layer-norm
    --cross-entropy-loss-fusion --cross-entropy-fusion-impl native
  )
}

sat_add_layout_args() {
  SAT_ARGS+=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
             --micro-batch-size "$MICRO_BATCH")
  [[ $SEQUENCE_PARALLEL == 0 ]] || SAT_ARGS+=(--sequence-parallel)
  if [[ $DISTRIBUTED_OPTIMIZER == 1 ]]; then
    SAT_ARGS+=(--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather)
  fi
  case $RECOMPUTE in
    none) ;;
    selective) SAT_ARGS+=(--recompute-granularity selective) ;;
    full) SAT_ARGS+=(--recompute-granularity full --recompute-method uniform
                     --recompute-num-layers 1) ;;
    *) sat_die "RECOMPUTE must be none, selective or full, got '$RECOMPUTE'" ;;
  esac
}

# The paper's continual pre-training (§3.1): batch 1024 x 4096 tokens, cosine decay from a
# peak lr of 5e-5, T = 3000 iterations. What it does not state (warm-up, final lr, Adam,
# weight decay, clipping) follows common Llama practice.
sat_add_training_args() {
  SAT_ARGS+=(
    --global-batch-size 1024 --train-iters 3000
    --lr 5e-5 --min-lr 5e-6 --lr-decay-style cosine --lr-warmup-iters 30
    --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0
    --bf16 --seed 1234
    --log-interval 1 --eval-interval 500 --eval-iters 5
  )
}

# SAT as chosen by the paper: maxip + sampling at tau 0.05, r = 0.5, LORS eta = 2000, L = 5.
sat_add_sat_args() {
  if [[ $DENSE == 1 ]]; then
    SAT_ARGS+=(--sat-omission-rate 0)
  else
    SAT_ARGS+=(--sat-omission-rate 0.5 --sat-metric maxip --sat-selection sampling
               --sat-temperature 0.05 --sat-lors-start 2000 --sat-lors-ladders 5)
  fi
}

sat_add_data_args() {
  local -a blend
  if [[ ${MOCK_DATA:-0} == 1 ]]; then
    SAT_ARGS+=(--mock-data --tokenizer-type NullTokenizer --vocab-size 32000)
    return
  fi
  sat_flag "${MOCK_DATA:-0}" MOCK_DATA
  sat_require DATA_PATH "the megatron dataset prefix (PREFIX.bin/.idx from" \
    "tools/preprocess_data.py), or a blend 'W1 PREFIX1 W2 PREFIX2'; MOCK_DATA=1 for" \
    "synthetic data"
  sat_require TOKENIZER_MODEL "the SentencePiece tokenizer.model the data was tokenized with"
  [[ -f $TOKENIZER_MODEL ]] || sat_die "TOKENIZER_MODEL=$TOKENIZER_MODEL: file not found"
  read -r -a blend <<<"$DATA_PATH"
  SAT_ARGS+=(--data-path "${blend[@]}" --split "995,5,0"
             --tokenizer-type "${TOKENIZER_TYPE:-GPTSentencePieceTokenizer}"
             --tokenizer-model "$TOKENIZER_MODEL")
}

# Resume from CHECKPOINT_DIR if it has a checkpoint, else start from PRETRAINED_CHECKPOINT
# (megatron's --pretrained-checkpoint: model weights only, iteration 0).
sat_add_checkpoint_args() {
  sat_require CHECKPOINT_DIR "the directory for this run's checkpoints (created if missing)"
  sat_require PRETRAINED_CHECKPOINT "the megatron checkpoint of the base model to continue" \
    "pre-training from, or 'none' to start from random weights"
  SAT_ARGS+=(--save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --save-interval 250
             --ckpt-format torch_dist
             --tensorboard-dir "${TENSORBOARD_DIR:-$CHECKPOINT_DIR/tensorboard}")
  if [[ $PRETRAINED_CHECKPOINT != none ]]; then
    [[ -d $PRETRAINED_CHECKPOINT ]] ||
      sat_die "PRETRAINED_CHECKPOINT=$PRETRAINED_CHECKPOINT: directory not found"
    SAT_ARGS+=(--pretrained-checkpoint "$PRETRAINED_CHECKPOINT")
  fi
}

sat_python() {
  if [[ -n ${PYTHON:-} ]]; then
    echo "$PYTHON"
  elif [[ -x $SAT_REPO/.venv/bin/python ]]; then
    echo "$SAT_REPO/.venv/bin/python"
  else
    echo python3
  fi
}

# NVLink multicast (NVLS) stays off unless set otherwise: on shared GPU hosts a program that
# uses it can put the host's GPUs out of service (docs/multi-gpu.md). CUDA_DEVICE_MAX_CONNECTIONS
# =1: megatron requires it for TP > 1 on GPUs before Blackwell (one queue orders its
# communication and compute kernels).
sat_run() {
  export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
  export TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
  export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
  local exports=(NCCL_NVLS_ENABLE TORCH_SYMM_MEM_DISABLE_MULTICAST NVSHMEM_DISABLE_NVLS)
  if [[ $TP -gt 1 ]]; then
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    exports+=(CUDA_DEVICE_MAX_CONNECTIONS)
  fi
  local mode=SAT
  [[ $DENSE == 0 ]] || mode=dense
  echo "[$PRESET, $mode] TP=$TP PP=$PP micro-batch=$MICRO_BATCH" \
       "sequence-parallel=$SEQUENCE_PARALLEL distributed-optimizer=$DISTRIBUTED_OPTIMIZER" \
       "recompute=$RECOMPUTE" >&2
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    local name
    for name in "${exports[@]}"; do
      printf 'export %s=%q\n' "$name" "${!name}"
    done
    printf '%q ' "$@"
    printf '\n'
  else
    cd "$SAT_REPO" || exit
    exec "$@"
  fi
}
