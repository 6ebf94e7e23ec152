"""Tests of megatron_sat/flops.py against independent counts.

* Hand counts: small shapes whose kept widths and FLOPs are worked out below with integer
  arithmetic (floor(n_local (1 - r)) per tensor-parallel rank, 2 FLOPs per multiply-add).
* megatron-core's own ``num_floating_point_operations`` (what ``--log-throughput``
  prints) for the dense step, from parsed megatron flags.
* The SAT attention's own head choice (``SATSelfAttention.choose_heads``) for the kept
  head and kv-group counts.
* The 6N rule with the published parameter counts of TinyLlama-1.1B and Llama-2-7B for
  the ideal speedup.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch
from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding
from megatron.training.arguments import add_megatron_arguments
from megatron.training.training import num_floating_point_operations

from megatron_sat.arguments import add_sat_arguments
from megatron_sat.attention import HeadLayout, SATSelfAttention
from megatron_sat.block import SparseBlock
from megatron_sat.config import SATConfig
from megatron_sat.flops import (KeptWidth, ModelShape, forward_flops_per_token, ideal_speedup,
                                kept_width, padded_vocab_size, step_flops)

# GQA: 2 layers, h = 32, 16 query heads of d = 2 in 4 kv groups (4 per group), ffn 20,
# sequence 8, vocab 64.
GQA = ModelShape(num_layers=2, hidden_size=32, ffn_hidden_size=20, num_attention_heads=16,
                 num_query_groups=4, kv_channels=2, seq_length=8, padded_vocab_size=64)
# GQA with 3 query heads per group: 12 heads of d = 2 in 4 groups, h = 24.
GQA3 = ModelShape(num_layers=2, hidden_size=24, ffn_hidden_size=20, num_attention_heads=12,
                  num_query_groups=4, kv_channels=2, seq_length=8, padded_vocab_size=64)
# MHA: h = 48, 12 heads of d = 4, each its own group.
MHA = ModelShape(num_layers=2, hidden_size=48, ffn_hidden_size=20, num_attention_heads=12,
                 num_query_groups=12, kv_channels=4, seq_length=8, padded_vocab_size=64)


def with_tp(shape: ModelShape, tp: int, **changes) -> ModelShape:
    return ModelShape(**{**shape.__dict__, "tp_size": tp, **changes})


# (shape, gqa mode, TP, rate) -> kept (query heads, kv groups, ffn), by hand:
KEPT = [
    # MLP, ffn 20. TP1: floor(20 * 0.75) = 15, floor(10) = 10, floor(5) = 5.
    # TP2: 10 per rank: floor(7.5) = 7 -> 14, floor(5) = 5 -> 10, floor(2.5) = 2 -> 4.
    # GQA heads mode: each of the 4 groups keeps floor(4 (1 - r)) of its 4 query heads
    # (3, 2, 1); K/V of all 4 groups. The same at TP2 (2 groups per rank).
    (GQA, "heads", 1, 0.0, (16, 4, 20)),
    (GQA, "heads", 1, 0.25, (12, 4, 15)),
    (GQA, "heads", 1, 0.5, (8, 4, 10)),
    (GQA, "heads", 1, 0.75, (4, 4, 5)),
    (GQA, "heads", 2, 0.25, (12, 4, 14)),
    (GQA, "heads", 2, 0.5, (8, 4, 10)),
    (GQA, "heads", 2, 0.75, (4, 4, 4)),
    # GQA groups mode: floor(4 (1 - r)) = 3, 2, 1 whole groups of 4 heads.
    # TP2: 2 groups per rank: floor(1.5) = 1 -> 2 groups, floor(1) = 1 -> 2 groups.
    (GQA, "groups", 1, 0.25, (12, 3, 15)),
    (GQA, "groups", 1, 0.5, (8, 2, 10)),
    (GQA, "groups", 1, 0.75, (4, 1, 5)),
    (GQA, "groups", 2, 0.25, (8, 2, 14)),
    (GQA, "groups", 2, 0.5, (8, 2, 10)),
    # GQA3 heads mode: floor(3 * 0.75) = 2 and floor(1.5) = 1 per group (not floor(12 (1 - r))
    # = 9, 6 over all heads). groups mode: floor(4 (1 - r)) = 3, 2, 1 groups of 3 heads;
    # TP2: 2 groups per rank, floor(1.5) = floor(1) = 1 -> 2 groups.
    (GQA3, "heads", 1, 0.25, (8, 4, 15)),
    (GQA3, "heads", 1, 0.5, (4, 4, 10)),
    (GQA3, "heads", 2, 0.5, (4, 4, 10)),
    (GQA3, "groups", 1, 0.25, (9, 3, 15)),
    (GQA3, "groups", 1, 0.75, (3, 1, 5)),
    (GQA3, "groups", 2, 0.25, (6, 2, 14)),
    # MHA (both modes): floor(12 (1 - r)) = 9, 6, 3 heads with their K/V.
    # TP2: 6 per rank: floor(4.5) = 4 -> 8, floor(3) = 3 -> 6, floor(1.5) = 1 -> 2.
    (MHA, "heads", 1, 0.0, (12, 12, 20)),
    (MHA, "heads", 1, 0.25, (9, 9, 15)),
    (MHA, "groups", 1, 0.5, (6, 6, 10)),
    (MHA, "heads", 1, 0.75, (3, 3, 5)),
    (MHA, "heads", 2, 0.25, (8, 8, 14)),
    (MHA, "groups", 2, 0.5, (6, 6, 10)),
    (MHA, "heads", 2, 0.75, (2, 2, 4)),
]


@pytest.mark.parametrize("shape,mode,tp,rate,expected", KEPT)
def test_kept_widths_by_hand(shape, mode, tp, rate, expected):
    assert kept_width(with_tp(shape, tp), rate, gqa_mode=mode) == KeptWidth(*expected)


@pytest.mark.parametrize("shape,mode,tp,rate,expected",
                         [case for case in KEPT if case[3] > 0])
def test_kept_heads_match_the_sat_attention(shape, mode, tp, rate, expected):
    """The counts SATSelfAttention.choose_heads keeps on one rank, times TP."""
    groups_local = shape.num_query_groups // tp
    q_per_group = shape.num_attention_heads // shape.num_query_groups
    layout = HeadLayout(groups_local, q_per_group, shape.kv_channels, torch.device("cpu"))
    fake = SimpleNamespace(sat=SparseBlock(SATConfig(omission_rate=rate, gqa_mode=mode,
                                                     selection="topk"), 1, tp_group=None,
                                             sequence_parallel=False),
                           head_layout=lambda device: layout,
                           num_query_groups_per_partition=groups_local,
                           q_per_group=q_per_group,
                           hidden_size_per_attention_head=shape.kv_channels)
    row_scores = torch.randn(groups_local * (q_per_group + 2) * shape.kv_channels)
    selection = SATSelfAttention.choose_heads(fake, row_scores, rate, seed=0)
    kept = kept_width(with_tp(shape, tp), rate, gqa_mode=mode)
    assert tp * selection.heads().numel() == kept.query_heads
    assert tp * selection.groups == kept.kv_groups
    assert selection.qkv_rows.numel() == selection.groups * (selection.queries + 2) * \
        shape.kv_channels


def hand_forward_per_token(shape: ModelShape, q_heads: int, kv_groups: int, ffn: int) -> int:
    """Forward FLOPs per token, one matrix product at a time (2 FLOPs per multiply-add)."""
    h, d, s = shape.hidden_size, shape.kv_channels, shape.seq_length
    per_layer = [
        2 * h * (q_heads * d),  # Q rows of linear_qkv
        2 * h * (kv_groups * d) * 2,  # K and V rows of linear_qkv
        q_heads * 2 * (s // 2) * d,  # QK^T: a query meets s / 2 keys on average (causal)
        q_heads * 2 * (s // 2) * d,  # softmax(QK^T) V
        2 * (q_heads * d) * h,  # linear_proj
        2 * h * ffn * (3 if shape.swiglu else 2),  # gate + up + down, or fc1 + fc2
    ]
    return shape.num_layers * sum(per_layer) + 2 * h * shape.padded_vocab_size  # + LM head


@pytest.mark.parametrize("swiglu", [True, False], ids=["swiglu", "gelu"])
@pytest.mark.parametrize("shape,mode,tp,rate,expected", KEPT)
def test_forward_flops_by_hand(shape, mode, tp, rate, expected, swiglu):
    shape = with_tp(shape, tp, swiglu=swiglu)
    got = forward_flops_per_token(shape, rate, gqa_mode=mode)
    assert got.total == hand_forward_per_token(shape, *expected)
    assert got.lm_head == 2 * shape.hidden_size * 64


def test_pinned_totals():
    """Fully worked numbers for GQA (per token, forward):

    dense, SwiGLU: qkv 2*32*(32+2*8) = 3072, scores + PV 2*8*32 = 512, proj 2*32*32 = 2048,
    MLP 2*32*20*3 = 3840 -> 9472 per layer, x 2 layers = 18944, + LM head 2*32*64 = 4096
    = 23040. GeLU MLP 2*32*20*2 = 2560 -> 8192 x 2 + 4096 = 20480.
    r = 0.5, heads mode: qkv 2*32*(16+16) = 2048, scores 256, proj 1024, MLP 2*32*10*3 =
    1920 -> 5248 x 2 + 4096 = 14592. groups mode: qkv 2*32*(16+8) = 1536 -> 13568.
    MLP only: 3072+512+2048+1920 = 7552 x 2 + 4096 = 19200.
    attention only: 2048+256+1024+3840 = 7168 x 2 + 4096 = 18432.
    """
    assert forward_flops_per_token(GQA).total == 23040
    assert forward_flops_per_token(with_tp(GQA, 1, swiglu=False)).total == 20480
    assert forward_flops_per_token(GQA, 0.5).total == 14592
    assert forward_flops_per_token(GQA, 0.5, gqa_mode="groups").total == 13568
    assert forward_flops_per_token(GQA, 0.5, modules=("mlp",)).total == 19200
    assert forward_flops_per_token(GQA, 0.5, modules=("attention",)).total == 18432
    # An iteration: forward + backward = 3 x forward, over every token of the global batch.
    assert step_flops(GQA, tokens=4 * 8) == 3 * 32 * 23040
    assert step_flops(GQA, tokens=4 * 8, rate=0.5) == 3 * 32 * 14592


@pytest.mark.parametrize("vocab,divisible,tp", [(256, 128, 1), (257, 128, 1), (32000, 128, 2),
                                                (50257, 128, 8), (100, 64, 3)])
def test_padded_vocab_matches_megatron(vocab, divisible, tp):
    args = SimpleNamespace(make_vocab_size_divisible_by=divisible,
                           tensor_model_parallel_size=tp, rank=1)
    assert padded_vocab_size(vocab, divisible, tp) == vocab_size_with_padding(vocab, args)


def megatron_args(flags: list[str], padded_vocab: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    args = add_sat_arguments(add_megatron_arguments(parser)).parse_args(flags)
    args.kv_channels = args.hidden_size // args.num_attention_heads  # as validate_args does
    args.padded_vocab_size = padded_vocab
    return args


TINYLLAMA_FLAGS = ["--num-layers", "22", "--hidden-size", "2048", "--ffn-hidden-size", "5632",
                   "--num-attention-heads", "32", "--group-query-attention",
                   "--num-query-groups", "4", "--seq-length", "2048", "--swiglu"]


@pytest.mark.parametrize("flags", [
    TINYLLAMA_FLAGS,
    ["--num-layers", "4", "--hidden-size", "4096", "--ffn-hidden-size", "11008",
     "--num-attention-heads", "32", "--seq-length", "4096", "--swiglu"],
    ["--num-layers", "3", "--hidden-size", "768", "--ffn-hidden-size", "3072",
     "--num-attention-heads", "12", "--seq-length", "1024", "--tensor-model-parallel-size", "2"],
], ids=["tinyllama-gqa-swiglu", "llama2-mha-swiglu", "gpt2-mha-gelu-tp2"])
def test_dense_step_matches_megatron_log_throughput(flags):
    args = megatron_args(flags, padded_vocab=padded_vocab_size(32000, 128, 2))
    shape = ModelShape.from_args(args)
    batch = 8
    assert step_flops(shape, batch * args.seq_length) == \
        num_floating_point_operations(args, batch)


def test_shape_from_args_reads_gqa_and_mlp_kind():
    args = megatron_args(TINYLLAMA_FLAGS + ["--tensor-model-parallel-size", "2"], 32000)
    assert ModelShape.from_args(args) == ModelShape(
        num_layers=22, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=32,
        num_query_groups=4, kv_channels=64, seq_length=2048, padded_vocab_size=32000,
        swiglu=True, tp_size=2)
    args.padded_vocab_size = None
    with pytest.raises(ValueError, match="padded_vocab_size"):
        ModelShape.from_args(args)


# Published parameter counts: TinyLlama-1.1B 1,100,048,384; Llama-2-7B 6,738,415,616. Minus
# the input embedding (V h) and the norms (2 per layer + final, h each) they are the
# matrix parameters N that every token multiplies once: forward = 2 N + core attention.
TINYLLAMA = ModelShape(num_layers=22, hidden_size=2048, ffn_hidden_size=5632,
                       num_attention_heads=32, num_query_groups=4, kv_channels=64,
                       seq_length=2048, padded_vocab_size=32000)
LLAMA2_7B = ModelShape(num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
                       num_attention_heads=32, num_query_groups=32, kv_channels=128,
                       seq_length=4096, padded_vocab_size=32000)


def matrix_params(published: int, shape: ModelShape) -> int:
    h = shape.hidden_size
    return published - shape.padded_vocab_size * h - (2 * shape.num_layers + 1) * h


def test_dense_forward_is_twice_the_published_matrix_parameters_plus_attention():
    for published, shape in [(1_100_048_384, TINYLLAMA), (6_738_415_616, LLAMA2_7B)]:
        # QK^T and PV over half of the s x s scores: 2 * 2 * (s / 2) * (heads * d) per layer
        q_width = shape.num_attention_heads * shape.kv_channels
        core = shape.num_layers * 2 * shape.seq_length * q_width
        assert forward_flops_per_token(shape).total == 2 * matrix_params(published, shape) + core


def test_ideal_speedup_at_half_rate_by_hand():
    # TinyLlama, heads mode, r = 0.5: per layer Q, O and the core attention halve (16 of 32
    # query heads), K/V stay (4 groups), the MLP halves (2816 of 5632); the LM head stays.
    h, s, f, layers, vocab = 2048, 2048, 5632, 22, 32000
    dense_layer = 2 * h * (2048 + 512) + 2 * s * 2048 + 2 * 2048 * h + 6 * h * f
    sparse_layer = 2 * h * (1024 + 512) + 2 * s * 1024 + 2 * 1024 * h + 6 * h * 2816
    expected = (layers * dense_layer + 2 * h * vocab) / (layers * sparse_layer + 2 * h * vocab)
    assert ideal_speedup(TINYLLAMA, 0.5) == pytest.approx(expected, rel=1e-12)
    assert 1.85 <= ideal_speedup(TINYLLAMA, 0.5) <= 1.86  # 1.854
    # groups mode drops half of the 4 kv groups' K/V too
    assert 1.88 <= ideal_speedup(TINYLLAMA, 0.5, gqa_mode="groups") <= 1.90  # 1.890

    # Llama-2-7B (MHA): everything in a layer halves; only the LM head does not.
    h, s, f, vocab = 4096, 4096, 11008, 32000
    layer = 2 * h * 3 * h + 2 * s * h + 2 * h * h + 6 * h * f
    for layers, low, high in [(8, 1.86, 1.88), (32, 1.96, 1.97)]:  # 1.870, 1.964
        expected = (layers * layer + 2 * h * vocab) / (layers * layer / 2 + 2 * h * vocab)
        shape = ModelShape(**{**LLAMA2_7B.__dict__, "num_layers": layers})
        assert ideal_speedup(shape, 0.5) == pytest.approx(expected, rel=1e-12)
        assert low <= ideal_speedup(shape, 0.5) <= high


def test_ideal_speedup_grows_with_the_rate_and_is_one_when_dense():
    assert ideal_speedup(TINYLLAMA, 0.0) == 1.0
    assert ideal_speedup(TINYLLAMA, 0.5, modules=("mlp",)) < ideal_speedup(TINYLLAMA, 0.5)
    speedups = [ideal_speedup(TINYLLAMA, r) for r in (0.25, 0.5, 0.75)]
    assert 1.0 < speedups[0] < speedups[1] < speedups[2] < 4.0


def test_kept_mlp_width_follows_the_channel_multiple():
    """TinyLlama at r = 0.2: 4,505 channels exactly, 4,480 (70 x 64) by default."""
    tiny = ModelShape(num_layers=22, hidden_size=2048, ffn_hidden_size=5632,
                      num_attention_heads=32, num_query_groups=4, kv_channels=64,
                      seq_length=2048, padded_vocab_size=32000)
    assert kept_width(tiny, 0.2).ffn == 4480
    assert kept_width(tiny, 0.2, channel_multiple=1).ffn == 4505
    dense = forward_flops_per_token(tiny)
    exact = forward_flops_per_token(tiny, 0.2, channel_multiple=1)
    rounded = forward_flops_per_token(tiny, 0.2)
    assert dense.mlp - rounded.mlp == 22 * 2 * 3 * 2048 * (5632 - 4480)
    assert exact.mlp - rounded.mlp == 22 * 2 * 3 * 2048 * 25
