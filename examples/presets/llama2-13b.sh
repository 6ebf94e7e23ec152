# shellcheck shell=bash disable=SC2034  # read by common.sh, which sources this file
# Llama-2-13B (Touvron et al. 2023): 40 layers, d 5120, 40 heads (MHA), SwiGLU ffn 13824.
MODEL_ARGS=(--num-layers 40 --hidden-size 5120 --ffn-hidden-size 13824
            --num-attention-heads 40)
# Layout on 8 x H100 80GB nodes: TP 4 with sequence parallelism, DP 2 per node (40 heads
# and ffn 13824 split evenly; SAT keeps 5 of each rank's 10 heads at r = 0.5). About 40 GB
# of weights, gradients and optimizer state on one node (less with more nodes, as the
# distributed optimizer shards over DP) and 7 GB of activations per sequence.
LAYOUT_TP=4
LAYOUT_PP=1
LAYOUT_MICRO_BATCH=1
LAYOUT_SEQUENCE_PARALLEL=1
LAYOUT_DISTRIBUTED_OPTIMIZER=1
LAYOUT_RECOMPUTE=none
