# shellcheck shell=bash disable=SC2034  # read by common.sh, which sources this file
# Llama-2-7B (Touvron et al. 2023): 32 layers, d 4096, 32 heads (MHA), SwiGLU ffn 11008.
MODEL_ARGS=(--num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008
            --num-attention-heads 32)
# Layout on 8 x H100 80GB nodes: TP 2 with sequence parallelism inside a GPU pair, DP 4
# per node. At TP 1 the unsharded weights and fp32 gradients alone take 40 GB and one
# 4096-token sequence about 20 GB of activations; TP 2 + SP halves both (about 30 GB of
# state with the distributed optimizer on one node, 11 GB of activations per sequence).
LAYOUT_TP=2
LAYOUT_PP=1
LAYOUT_MICRO_BATCH=1
LAYOUT_SEQUENCE_PARALLEL=1
LAYOUT_DISTRIBUTED_OPTIMIZER=1
LAYOUT_RECOMPUTE=none
