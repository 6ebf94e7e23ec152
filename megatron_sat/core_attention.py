"""Core attention on fused kernels, for any number of heads (used by Eq. 9).

megatron-core's local ``DotProductAttention`` materialises the [b * heads, s, s] score
matrix and runs out of memory at real sizes; without Transformer Engine megatron-core
has no fused attention for training. This module calls flash-attn when it is installed
(and the inputs are fp16/bf16 on a GPU), else torch's ``scaled_dot_product_attention``,
which dispatches to flash / cuDNN / memory-efficient kernels and handles grouped-query
attention with ``enable_gqa``.

The head count is read from the tensors, so the SAT attention can hand it any subset of
heads: query [sq, b, nq, hn], key and value [sk, b, nkv, hn] with nq a multiple of nkv.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

try:  # optional accelerator
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None


class SDPAttention(MegatronModule):
    """Drop-in for megatron-core's core attention (same constructor and call)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("SDPAttention does not support context parallelism")
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention_bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        dropout = self.dropout if self.training else 0.0
        sq, b = query.shape[:2]
        if dropout > 0.0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = self._attend(query, key, value, attention_mask, causal, dropout)
        else:
            out = self._attend(query, key, value, attention_mask, causal, dropout)
        return out.reshape(sq, b, -1)

    def _attend(self, q, k, v, mask, causal, dropout):
        """[s, b, h, d] in, [s, b, h, d] out."""
        if (flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
                and (causal or mask is None)):
            out = flash_attn_func(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                  dropout_p=dropout, softmax_scale=self.softmax_scale,
                                  causal=causal)
            return out.transpose(0, 1)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, h, s, d]
        attn_mask = None if causal or mask is None else ~mask  # megatron: True = masked out
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=causal,
            scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
        return out.permute(2, 0, 1, 3)
