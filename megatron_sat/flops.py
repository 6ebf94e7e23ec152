"""Model FLOPs of one training iteration of the GPT that ``pretrain_sat.py`` builds, dense
and under SAT at omission rate r.

Conventions (the same for the dense and the sparse count, so their ratio is the ideal
speedup):

* **Model FLOPs, not hardware FLOPs.** Only the matrix products the model needs are
  counted; activation recompute and SAT's selection (a d-vector statistic and one
  matrix-vector product per block and micro-batch) are not. Every position of every
  sequence is a token (megatron's GPT datasets pack documents: no padding).
* **A multiply-add is 2 FLOPs**, and **forward + backward = 3 x forward**: the backward
  pass computes the gradient of the input and of the weight, each as costly as the
  forward product.
* **Causal attention counts half of the score matrix**: per sequence of length s and per
  query head of width d, QK^T and softmax(QK^T)V cost 2 * 2 * s^2 * d / 2 = 2 s^2 d
  forward. This is what a causal flash kernel (torch SDPA with ``is_causal``, flash-attn)
  computes, and it is megatron-core's convention (``num_floating_point_operations``,
  printed with ``--log-throughput``), so the numbers compare with megatron's. PaLM
  (Chowdhery et al., 2022, App. B) counts the full s^2 matrix instead; at s = 2048 and
  the TinyLlama shape that would add 8% to the dense count. s^2 / 2 is used rather than
  the exact s (s + 1) / 2 entries, as megatron does.
* **Counted per layer:** the fused QKV projection, the core attention of the query heads,
  the output projection, the MLP (SwiGLU: gate, up and down matrices; GeLU: two), and
  once the LM head over megatron's padded vocabulary (its logits are computed for the
  padding columns too).
* **Not counted:** embeddings (a lookup, no product), RMSNorm/LayerNorm, rotary
  embeddings, the activation function, the attention softmax and the cross-entropy:
  elementwise work of O(h + f + heads * s) per layer and O(V) per token, against O(h^2)
  and O(hV) for the products; about 0.2% at the TinyLlama shape (mostly the softmax).

SAT (``megatron_sat/mlp.py``, ``attention.py``) multiplies only the kept neurons; the
kept counts here are the implementation's own (:func:`~megatron_sat.config.kept_count`
per tensor-parallel rank: floor(n_local * (1 - r)) on each of the ``tp`` ranks):

* MLP: each rank keeps floor(f / tp * (1 - r)) channels (gate, up and down, or fc1/fc2),
  rounded down to a multiple of ``channel_multiple`` (:func:`~megatron_sat.config.kept_channels`).
* Attention, ``--sat-gqa-mode heads`` with more than one query head per kv group: every kv
  group keeps floor(q_per_group * (1 - r)) query heads; K and V are computed in full.
* Attention, ``groups`` mode, or multi-head attention (one head per group): each rank keeps
  floor(groups / tp * (1 - r)) kv groups with all their query heads and their K/V.
* The core attention runs on the kept query heads (against their groups' K/V), so its
  cost scales with the kept query heads; the output projection reads their columns.

A block left out of ``--sat-modules`` stays dense; at r = 0 every block is dense.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from megatron_sat.config import CHANNEL_MULTIPLE, GQA_MODES, MODULES, kept_channels, kept_count

FMA = 2  # FLOPs per multiply-add
FORWARD_BACKWARD = 3  # forward + input gradient + weight gradient


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs of a Llama-style megatron-core GPT depend on."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int  # head dimension d
    seq_length: int
    padded_vocab_size: int
    swiglu: bool = True  # gated MLP (3 matrices); False: GeLU MLP (2 matrices)
    tp_size: int = 1  # tensor-parallel size: SAT keeps floor(n_local (1 - r)) per rank

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ModelShape":
        """The shape of megatron's parsed and validated args.

        ``args.padded_vocab_size`` is set when megatron builds the tokenizer (inside
        ``pretrain()``); before that, build the shape with :func:`padded_vocab_size`.
        """
        if args.padded_vocab_size is None:
            raise ValueError("args.padded_vocab_size is not set yet: megatron sets it when "
                             "it builds the tokenizer; build ModelShape after that")
        if getattr(args, "num_experts", None) or getattr(args, "mtp_num_layers", None):
            raise ValueError("FLOPs of MoE (--num-experts) and multi-token prediction "
                             "(--mtp-num-layers) layers are not modelled")
        return cls(
            num_layers=args.num_layers,
            hidden_size=args.hidden_size,
            ffn_hidden_size=args.ffn_hidden_size,
            num_attention_heads=args.num_attention_heads,
            num_query_groups=(args.num_query_groups if args.group_query_attention
                              else args.num_attention_heads),
            kv_channels=args.kv_channels or args.hidden_size // args.num_attention_heads,
            seq_length=args.seq_length,
            padded_vocab_size=args.padded_vocab_size,
            swiglu=bool(args.swiglu),
            tp_size=args.tensor_model_parallel_size,
        )


def padded_vocab_size(vocab_size: int, divisible_by: int = 128, tp_size: int = 1) -> int:
    """Megatron's padding: up to a multiple of ``--make-vocab-size-divisible-by`` x TP."""
    multiple = divisible_by * tp_size
    return math.ceil(vocab_size / multiple) * multiple


@dataclass(frozen=True)
class KeptWidth:
    """The widths one layer multiplies, summed over the tensor-parallel ranks."""

    query_heads: int
    kv_groups: int  # K and V heads computed
    ffn: int  # MLP channels


def kept_width(shape: ModelShape, rate: float = 0.0, *, gqa_mode: str = GQA_MODES[0],
               modules: tuple[str, ...] = MODULES,
               channel_multiple: int = CHANNEL_MULTIPLE) -> KeptWidth:
    """What SAT keeps at ``rate`` (see the module docstring); the full widths at r = 0."""
    tp = shape.tp_size
    heads, groups, ffn = shape.num_attention_heads, shape.num_query_groups, shape.ffn_hidden_size
    if rate > 0.0 and "mlp" in modules:
        ffn = tp * kept_channels(ffn // tp, rate, channel_multiple)
    if rate > 0.0 and "attention" in modules:
        q_per_group = heads // groups
        if q_per_group > 1 and gqa_mode == "heads":
            heads = groups * kept_count(q_per_group, rate)
        else:
            groups = tp * kept_count(groups // tp, rate)
            heads = groups * q_per_group
    return KeptWidth(query_heads=heads, kv_groups=groups, ffn=ffn)


@dataclass(frozen=True)
class TokenFlops:
    """Forward FLOPs per token of the whole model, by part (layers summed)."""

    qkv: int
    core_attention: int
    attention_proj: int
    mlp: int
    lm_head: int

    @property
    def total(self) -> int:
        return self.qkv + self.core_attention + self.attention_proj + self.mlp + self.lm_head


def forward_flops_per_token(shape: ModelShape, rate: float = 0.0, *,
                            gqa_mode: str = GQA_MODES[0], modules: tuple[str, ...] = MODULES,
                            channel_multiple: int = CHANNEL_MULTIPLE) -> TokenFlops:
    """Forward FLOPs per token at omission rate ``rate`` (0: dense)."""
    kept = kept_width(shape, rate, gqa_mode=gqa_mode, modules=modules,
                      channel_multiple=channel_multiple)
    h, d, n = shape.hidden_size, shape.kv_channels, shape.num_layers
    q_width, kv_width = kept.query_heads * d, kept.kv_groups * d
    mlp_matrices = 3 if shape.swiglu else 2
    return TokenFlops(
        qkv=n * FMA * h * (q_width + 2 * kv_width),
        # QK^T and PV: each FMA * (s / 2) * d per query head and token (causal half);
        # 2 * FMA * s is even, so the division is exact
        core_attention=n * 2 * FMA * shape.seq_length * q_width // 2,
        attention_proj=n * FMA * q_width * h,
        mlp=n * FMA * mlp_matrices * h * kept.ffn,
        lm_head=FMA * h * shape.padded_vocab_size,
    )


def step_flops(shape: ModelShape, tokens: int, rate: float = 0.0, *,
               gqa_mode: str = GQA_MODES[0], modules: tuple[str, ...] = MODULES,
               channel_multiple: int = CHANNEL_MULTIPLE) -> int:
    """Model FLOPs (forward + backward) of one iteration over ``tokens`` tokens (the
    global batch times the sequence length) at omission rate ``rate``; r = 0 is the dense
    step."""
    per_token = forward_flops_per_token(shape, rate, gqa_mode=gqa_mode, modules=modules,
                                        channel_multiple=channel_multiple)
    return FORWARD_BACKWARD * tokens * per_token.total


def ideal_speedup(shape: ModelShape, rate: float, *, gqa_mode: str = GQA_MODES[0],
                  modules: tuple[str, ...] = MODULES,
                  channel_multiple: int = CHANNEL_MULTIPLE) -> float:
    """Dense FLOPs over SAT FLOPs at ``rate``: the speedup if time followed FLOPs."""
    dense = forward_flops_per_token(shape).total
    sparse = forward_flops_per_token(shape, rate, gqa_mode=gqa_mode, modules=modules,
                                     channel_multiple=channel_multiple).total
    return dense / sparse
