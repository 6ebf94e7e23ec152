"""Tests of megatron_sat/config.py and megatron_sat/arguments.py: every bad setting is
refused with a message naming the flag to change; valid settings pass; every ``--sat-*``
flag lands in its field of :class:`SATConfig`."""

from __future__ import annotations

import argparse
import math

import pytest

from megatron_sat.arguments import add_sat_arguments, sat_config_from_args
from megatron_sat.config import SATConfig, SATConfigError

# A small model: 8 heads in 8 groups (MHA), FFN 64.
MHA = dict(num_attention_heads=8, num_query_groups=8, ffn_hidden_size=64)
# GQA: 8 query heads in 2 kv groups.
GQA = dict(num_attention_heads=8, num_query_groups=2, ffn_hidden_size=64)


@pytest.mark.parametrize("kw,flag", [
    (dict(omission_rate=1.0), "--sat-omission-rate"),
    (dict(omission_rate=-0.1), "--sat-omission-rate"),
    (dict(omission_rate=float("nan")), "--sat-omission-rate"),
    (dict(omission_rate=0.5, metric="l1"), "--sat-metric"),
    (dict(omission_rate=0.5, selection="bernoulli"), "--sat-selection"),
    (dict(omission_rate=0.5, score_scale="zscore"), "--sat-score-scale"),
    (dict(omission_rate=0.5, gqa_mode="kv"), "--sat-gqa-mode"),
    (dict(omission_rate=0.5, dp_selection="global"), "--sat-dp-selection"),
    (dict(omission_rate=0.5, selection_kernel="cuda"), "--sat-selection-kernel"),
    (dict(omission_rate=0.5, selection_scope="step"), "--sat-selection-scope"),
    (dict(omission_rate=0.5, modules=("mlp", "embedding")), "--sat-modules"),
    (dict(omission_rate=0.5, modules=()), "--sat-modules"),
    (dict(omission_rate=0.5, temperature=0.0), "--sat-temperature"),
    (dict(omission_rate=0.5, temperature=-1.0), "--sat-temperature"),
    (dict(omission_rate=0.5, temperature=math.inf), "--sat-temperature"),
    (dict(omission_rate=0.5, temperature=math.nan), "--sat-temperature"),
    (dict(omission_rate=0.5, lors_start=10), "--train-iters"),
    (dict(omission_rate=0.5, lors_start=10, train_iters=10), "--sat-lors-start"),
    (dict(omission_rate=0.5, lors_start=11, train_iters=10), "--sat-lors-start"),
    (dict(omission_rate=0.5, lors_start=-1, train_iters=10), "--sat-lors-start"),
    (dict(omission_rate=0.5, lors_start=5, train_iters=10, lors_ladders=0), "--sat-lors-ladders"),
    (dict(omission_rate=0.5, channel_multiple=0), "--sat-channel-multiple"),
    (dict(omission_rate=0.5, channel_multiple=8.0), "--sat-channel-multiple"),
])
def test_validate_rejects(kw, flag):
    with pytest.raises(SATConfigError) as err:
        SATConfig(**kw).validate()
    assert flag in str(err.value)
    assert isinstance(err.value, ValueError)


def test_lors_start_without_train_iters_names_both_flags():
    with pytest.raises(SATConfigError, match="--sat-lors-start.*--train-iters"):
        SATConfig(omission_rate=0.5, lors_start=10).validate()


@pytest.mark.parametrize("kw", [
    dict(),                                             # dense default
    dict(omission_rate=0.0, metric="uniform"),
    dict(omission_rate=0.5),
    dict(omission_rate=0.999, metric="wanda", selection="topk", score_scale="raw"),
    dict(omission_rate=0.5, metric="magnitude", temperature=1e-4, score_scale="minmax"),
    dict(omission_rate=0.5, lors_start=0, train_iters=1),
    dict(omission_rate=0.5, lors_start=2000, train_iters=3000, lors_ladders=5),
    dict(omission_rate=0.96, lors_start=600, train_iters=1200, lors_ladders=1),
    dict(omission_rate=0.5, gqa_mode="groups", dp_selection="shared", modules=("attention",)),
])
def test_validate_accepts(kw):
    cfg = SATConfig(**kw)
    assert cfg.validate() is cfg


def test_enabled():
    assert not SATConfig().enabled
    assert SATConfig(omission_rate=0.1).enabled


def _model_error(cfg: SATConfig, **shape) -> str:
    with pytest.raises(SATConfigError) as err:
        cfg.validate_model(**shape)
    return str(err.value)


def test_heads_not_divisible_by_tp():
    msg = _model_error(SATConfig(omission_rate=0.5), num_attention_heads=6, num_query_groups=6,
                       ffn_hidden_size=64, tp_size=4)
    assert "--num-attention-heads" in msg and "--tensor-model-parallel-size" in msg


def test_groups_not_divisible_by_tp():
    msg = _model_error(SATConfig(omission_rate=0.5), num_attention_heads=8, num_query_groups=2,
                       ffn_hidden_size=64, tp_size=4)
    assert "--num-query-groups" in msg and "--tensor-model-parallel-size" in msg


def test_ffn_not_divisible_by_tp():
    msg = _model_error(SATConfig(omission_rate=0.5), num_attention_heads=8, num_query_groups=8,
                       ffn_hidden_size=66, tp_size=4)
    assert "--ffn-hidden-size" in msg and "--tensor-model-parallel-size" in msg


def test_shape_checked_even_when_dense():
    # A bad split is refused even at r = 0 (SAT off).
    _model_error(SATConfig(), num_attention_heads=6, num_query_groups=6, ffn_hidden_size=64,
                 tp_size=4)


def test_zero_heads_kept_mha():
    # 8 heads / TP 2 = 4 heads per rank; floor(4 * 0.1) = 0. The MLP keeps floor(32 * 0.1) = 3.
    msg = _model_error(SATConfig(omission_rate=0.9), tp_size=2, **MHA)
    assert "--sat-omission-rate" in msg and "4 heads" in msg
    assert "--sat-gqa-mode" not in msg  # no GQA hint for MHA
    # The same rate without attention is fine: only the MLP is checked.
    SATConfig(omission_rate=0.9, modules=("mlp",)).validate_model(tp_size=2, **MHA)
    # And at TP 1 there are 8 heads: floor(0.8) = 0 still; r = 0.8 keeps floor(1.6) = 1 at TP 1.
    _model_error(SATConfig(omission_rate=0.9), tp_size=1, **MHA)
    SATConfig(omission_rate=0.8).validate_model(tp_size=1, **MHA)


def test_zero_groups_kept_suggests_heads_mode():
    # GQA, 2 groups / TP 2 = 1 group per rank; gqa_mode groups keeps floor(1 * 0.5) = 0.
    msg = _model_error(SATConfig(omission_rate=0.5, gqa_mode="groups"), tp_size=2, **GQA)
    assert "--sat-omission-rate" in msg and "kv groups" in msg
    assert "--sat-gqa-mode heads" in msg
    # heads mode keeps floor(4 * 0.5) = 2 query heads of the rank's one group.
    SATConfig(omission_rate=0.5, gqa_mode="heads").validate_model(tp_size=2, **GQA)


def test_zero_query_heads_per_group_kept():
    # heads mode, 4 query heads per group: r = 0.8 keeps floor(0.8) = 0 per group.
    msg = _model_error(SATConfig(omission_rate=0.8, gqa_mode="heads"), tp_size=1, **GQA)
    assert "--sat-omission-rate" in msg and "query heads per kv group" in msg
    # groups mode at TP 1 keeps floor(2 * 0.2) = 0 groups as well ...
    _model_error(SATConfig(omission_rate=0.8, gqa_mode="groups"), tp_size=1, **GQA)
    # ... but r = 0.5 keeps 1 of 2 groups.
    SATConfig(omission_rate=0.5, gqa_mode="groups").validate_model(tp_size=1, **GQA)


def test_zero_mlp_channels_kept():
    msg = _model_error(SATConfig(omission_rate=0.9), num_attention_heads=8, num_query_groups=8,
                       ffn_hidden_size=16, tp_size=4)  # 4 channels per rank, floor(0.4) = 0
    assert "--sat-omission-rate" in msg and "MLP" in msg
    SATConfig(omission_rate=0.9, modules=("attention",)).validate_model(
        num_attention_heads=40, num_query_groups=40, ffn_hidden_size=16, tp_size=4)


def test_validate_model_runs_validate():
    with pytest.raises(SATConfigError, match="--sat-metric"):
        SATConfig(omission_rate=0.5, metric="x").validate_model(tp_size=1, **MHA)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_valid_models_pass(tp):
    cfg = SATConfig(omission_rate=0.5)
    # 16 heads / TP 8 = 2 heads per rank, floor(2 * 0.5) = 1 kept.
    assert cfg.validate_model(num_attention_heads=16, num_query_groups=16, ffn_hidden_size=64,
                              tp_size=tp) is cfg
    SATConfig(omission_rate=0.5, gqa_mode="heads").validate_model(
        num_attention_heads=32, num_query_groups=8, ffn_hidden_size=11008, tp_size=tp)
    # 8 heads / TP 8 = 1 head per rank: floor(0.5) = 0 is refused, but r = 0 is fine.
    if tp == 8:
        _model_error(cfg, tp_size=tp, **MHA)
        SATConfig().validate_model(tp_size=tp, **MHA)


# ------------------------------------------------------------------ argparse layer

def _parser():
    p = argparse.ArgumentParser(prog="pretrain_sat.py")
    add_sat_arguments(p)
    # megatron's own flags that sat_config_from_args reads
    p.add_argument("--train-iters", type=int, default=None)
    p.add_argument("--seed", type=int, default=1234)
    return p


@pytest.mark.parametrize("argv,flag", [
    (["--sat-omission-rate", "1.0"], "--sat-omission-rate"),
    (["--sat-omission-rate", "-0.1"], "--sat-omission-rate"),
    (["--sat-omission-rate", "half"], "--sat-omission-rate"),
    (["--sat-temperature", "0"], "--sat-temperature"),
    (["--sat-temperature", "-2"], "--sat-temperature"),
    (["--sat-metric", "l1"], "--sat-metric"),
    (["--sat-selection", "x"], "--sat-selection"),
    (["--sat-score-scale", "x"], "--sat-score-scale"),
    (["--sat-gqa-mode", "x"], "--sat-gqa-mode"),
    (["--sat-dp-selection", "x"], "--sat-dp-selection"),
    (["--sat-selection-kernel", "triton"], "--sat-selection-kernel"),
    (["--sat-selection-scope", "step"], "--sat-selection-scope"),
    (["--sat-modules", "embedding"], "--sat-modules"),
])
def test_parser_rejects_with_exit_2(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(argv)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_parser_defaults():
    args = _parser().parse_args([])
    cfg = sat_config_from_args(args)
    assert cfg == SATConfig()
    assert not cfg.enabled


def test_every_flag_maps_to_its_field():
    args = _parser().parse_args([
        "--sat-omission-rate", "0.75", "--sat-metric", "wanda", "--sat-selection", "topk",
        "--sat-temperature", "0.3", "--sat-score-scale", "minmax", "--sat-lors-start", "40",
        "--sat-lors-ladders", "3", "--sat-gqa-mode", "groups", "--sat-dp-selection", "shared",
        "--sat-modules", "attention", "attention", "mlp", "--train-iters", "100",
        "--seed", "77", "--sat-selection-kernel", "torch", "--sat-selection-scope",
        "microbatch"])
    cfg = sat_config_from_args(args)
    assert cfg == SATConfig(omission_rate=0.75, metric="wanda", selection="topk",
                            temperature=0.3, score_scale="minmax", lors_start=40,
                            lors_ladders=3, train_iters=100, gqa_mode="groups",
                            dp_selection="shared", modules=("attention", "mlp"), seed=77,
                            selection_kernel="torch", selection_scope="microbatch")


def test_sat_config_from_args_validates():
    args = _parser().parse_args(["--sat-omission-rate", "0.5", "--sat-lors-start", "10"])
    with pytest.raises(SATConfigError, match="--train-iters"):
        sat_config_from_args(args)
    args = _parser().parse_args(["--sat-lors-ladders", "0", "--sat-lors-start", "1",
                                 "--train-iters", "5"])
    with pytest.raises(SATConfigError, match="--sat-lors-ladders"):
        sat_config_from_args(args)
