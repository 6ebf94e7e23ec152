# shellcheck shell=bash disable=SC2034  # read by common.sh, which sources this file
# TinyLlama-1.1B (Zhang et al. 2024): 22 layers, d 2048, 32 query heads in 4 kv groups,
# SwiGLU ffn 5632. The paper's first continual pre-training (§3.1).
MODEL_ARGS=(--num-layers 22 --hidden-size 2048 --ffn-hidden-size 5632
            --num-attention-heads 32 --group-query-attention --num-query-groups 4)
# Layout on 8 x H100 80GB nodes: data parallel only (DP = all GPUs). 1.1B parameters cost
# 6 bytes each unsharded (bf16 weight, fp32 main_grad) plus 12 bytes sharded by the
# distributed optimizer: about 8 GB on one node. 2 x 4096 tokens per micro-batch are the
# 8192 tokens per micro-batch measured on one H100 (docs/performance.md).
LAYOUT_TP=1
LAYOUT_PP=1
LAYOUT_MICRO_BATCH=2
LAYOUT_SEQUENCE_PARALLEL=0
LAYOUT_DISTRIBUTED_OPTIMIZER=1
LAYOUT_RECOMPUTE=none
