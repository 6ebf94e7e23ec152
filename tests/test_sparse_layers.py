"""SAT's sparse MLP and attention against dense references, at TP=1 and TP=2 (torchrun, gloo).

The heavy lifting is in ``tests/layer_worker.py``; each TP size is one torchrun launch
whose per-case records are asserted here.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sat.config import SELECTION_SCOPES

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # fp32 module vs float64 reference, values of order 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tp: int, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp(f"layers_tp{tp}") / "records.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp}",
           f"--master-port={free_port()}", str(ROOT / "tests" / "layer_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {r["case"]: r for r in json.loads(out.read_text())}


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def records(request, tmp_path_factory):
    return request.param, _launch(request.param, tmp_path_factory)


def _sparse_cases(recs):
    return [r for r in recs.values() if "errors" in r]


def test_sparse_layers_match_dense_masked_reference(records):
    tp, recs = records
    cases = _sparse_cases(recs)
    # MHA, GQA heads mode, GQA groups mode, SwiGLU, GeLU(+bias), wanda, magnitude, SwiGLU
    # at r = 0.3 with --sat-channel-multiple 8; SP at TP2
    assert len(cases) == (8 if tp == 1 else 13)
    for r in cases:
        assert r["scale"] > 0.05, r["case"]  # the comparison is on non-trivial values
        for name, err in r["errors"].items():
            assert err < TOL, (r["case"], name, err)


def test_omitted_neurons_get_exactly_zero_gradient(records):
    _, recs = records
    for r in _sparse_cases(recs):
        assert r["nonzero_omitted_grads"] == 0, r["case"]


def test_each_rank_keeps_floor_of_its_local_neurons(records):
    _, recs = records
    for r in _sparse_cases(recs):
        assert r["kept"] == r["expected_kept"], r["case"]
        if "groups" in r["case"]:
            assert r["kv_groups_computed"] * 2 == 4 // (2 if "tp2" in r["case"] else 1)


def test_sequence_parallel_selects_the_same_neurons(records):
    """The SP statistic is all-reduced, so selection does not depend on SP."""
    tp, recs = records
    if tp == 1:
        pytest.skip("sequence parallelism needs TP > 1")
    for case in ("mlp tp2 sp{} swiglu maxip", "attn tp2 sp{} h8g4 heads maxip",
                 "attn tp2 sp{} h8g4 groups maxip"):
        assert recs[case.format(0)]["selection"] == recs[case.format(1)]["selection"], case


def test_rate_zero_matches_stock_megatron_attention(records):
    tp, recs = records
    assert recs[f"stock attention tp{tp}"]["max_error"] < 1e-5


def test_rate_zero_gpt_model_equals_stock_megatron_gpt(records):
    """Same parameters (names, shapes, values) and, up to kernel rounding, same logits and
    gradients as megatron-core's stock local GPT layer spec."""
    tp, recs = records
    r = recs[f"stock gpt model tp{tp}"]
    assert r["same_params"] and r["num_params"] > 10
    assert r["max_rel_error"] < 1e-5


def test_layer_norms_hand_their_token_mean_to_the_maxip_blocks(records):
    """With the SAT layer spec, the four SAT blocks of a two-layer GPTModel take maxip's
    token mean from the norm before them (none computes it) and train exactly as when each
    computes it itself; under sequence parallelism (a shard's mean) all four compute it."""
    tp, recs = records
    cases = [r for r in recs.values() if r["case"].startswith("token mean")]
    assert len(cases) == (2 if tp > 1 else 1)
    for r in cases:
        sp = r["case"].endswith("sp1")
        assert r["computed_unlinked"] == 4, r
        assert r["computed_linked"] == (4 if sp else 0), r
        assert r["logits_scale"] > 0.1, r
        assert r["max_difference"] == 0.0, r


@pytest.mark.parametrize("scope", SELECTION_SCOPES)
def test_recompute_reuses_indices_and_gives_identical_gradients(records, scope):
    tp, recs = records
    r = recs[f"recompute tp{tp} {scope}"]
    assert r["max_error"] == 0.0
    assert r["draws"] == [1, 1]


def test_micro_batches_accumulate_in_megatron_ddp_grad_buffer(records):
    """The first SAT micro-batch after ``zero_grad_buffer`` writes its kept slice, later
    ones add; a dense micro-batch first, or a new iteration, is handled (see
    ``ddp_accumulation_case``)."""
    _, recs = records
    for scope in SELECTION_SCOPES:
        for seq in (8, 32):
            cases = [r for r in recs.values() if r["case"].startswith("ddp accumulation")
                     and f" {scope} seq{seq} iteration " in r["case"]]
            assert len(cases) == 3
            assert [r["micro_batches"] for r in cases] == [
                ["sat", "sat"], ["dense", "sat"], ["sat", "sat", "sat"]]
            summed = scope == "iteration" and seq == 32
            for r in cases:
                n_sat = r["micro_batches"].count("sat")
                # iteration scope: one selection; at seq 32 main_grad untouched until the
                # last SAT micro-batch hands over the sum; else a hand-over each
                assert r["one_selection"] == (scope == "iteration" or n_sat == 1), r["case"]
                if r["micro_batches"][0] == "sat":
                    assert r["main_grad_zero_after_each_sat_micro_batch"] == (
                        [True] * (n_sat - 1) + [False] if summed
                        else [False] * n_sat), r["case"]
    # --mlp-chunks-for-training 2: the MLP runs twice per micro-batch; one selection,
    # and each run hands its slice over (a slice counting micro-batches would be short)
    chunked = [r for r in recs.values() if " chunks2 " in r["case"]]
    assert len(chunked) == 3
    for r in chunked:
        assert r["one_selection"], r["case"]
        if r["micro_batches"][0] == "sat":
            assert r["main_grad_zero_after_each_sat_micro_batch"] == [False] * len(
                r["micro_batches"]), r["case"]
    for r in [r for r in recs.values() if r["case"].startswith("ddp accumulation")]:
        assert r["marked_zeroed"], r["case"]
        assert r["scale"] > 0.05, r["case"]
        assert set(r["main_grad_errors"]) == {"linear_fc1.weight", "linear_fc2.weight"}
        for name, err in r["main_grad_errors"].items():
            assert err < TOL, (r["case"], name, err)
