"""The multi-GPU suite's verdicts (tests/gpu/multi_gpu.py ``compare``) on synthetic curves:
the criterion itself runs in CI, where the GPU launches cannot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))

import multi_gpu  # noqa: E402
from megatron_sat.schedule import omission_rate_at  # noqa: E402

S = multi_gpu.GPU  # 30 iterations, LORS from 15
CHECKS = {check.name: check for check in multi_gpu.CHECKS}


def _outcome(name: str, offsets: dict[int, float] | None = None, dense: bool = False):
    """A launch that logged a smooth loss curve, times (1 + offset) at some iterations."""
    offsets = offsets or {}
    lors = multi_gpu._lors(S)
    iters = range(1, S.iters + 1)
    loss = {i: (9.0 - 0.1 * i) * (1 + offsets.get(i, 0.0)) for i in iters}
    grad = {i: 5.0 + 0.01 * i for i in iters}
    rate = {i: 0.0 if dense else omission_rate_at(lors, i - 1) for i in iters}
    return multi_gpu.Outcome(name, 1, [], returncode=0, loss=loss, grad_norm=grad, rate=rate)


def _judge(check_name: str, offsets: dict[int, float], dense: bool = False) -> dict:
    check = CHECKS[check_name]
    outcomes = {check.reference: _outcome(check.reference, dense=dense),
                check.run: _outcome(check.run, offsets, dense=dense)}
    return multi_gpu.compare(check, outcomes, S)


def test_identical_curves_pass():
    assert _judge("tp2 vs 1 GPU", {})["passed"]
    assert _judge("dp2-distopt vs 1 GPU", {})["passed"]


@pytest.mark.parametrize("name", ["tp2 vs 1 GPU", "dp2-distopt vs 1 GPU"])
def test_a_difference_at_the_first_iteration_fails_every_layout(name):
    result = _judge(name, {1: 1e-4})  # 10x the first-iteration tolerance
    assert not result["passed"] and "at iteration" in result["message"]


def test_data_parallel_sparse_mlp_is_judged_over_its_first_iterations():
    check = CHECKS["dp2-distopt vs 1 GPU"]
    assert check.flip_prone and not CHECKS["tp2 vs 1 GPU"].flip_prone
    assert not CHECKS["dense-dp2-distopt vs 1 GPU"].flip_prone
    # a near-tie flip after the window: reported as drift, not a failure
    late = {i: 2e-2 for i in range(multi_gpu.FLIP_WINDOW + 7, S.iters + 1)}
    result = _judge(check.name, late)
    assert result["passed"], result["message"]
    assert result["drift"].startswith("after a selection flip")
    # the same drift inside the window fails
    early = {multi_gpu.FLIP_WINDOW: 1e-3}
    result = _judge(check.name, early)
    assert not result["passed"] and f"iterations 1-{multi_gpu.FLIP_WINDOW}" in result["message"]


def test_late_drift_fails_layouts_that_do_not_flip():
    late = {i: 2e-2 for i in range(12, S.iters + 1)}
    assert not _judge("tp2 vs 1 GPU", late)["passed"]
    assert not _judge("dense-dp2-distopt vs 1 GPU", late, dense=True)["passed"]


def test_wrong_omission_rates_fail():
    check = CHECKS["tp2 vs 1 GPU"]
    outcomes = {check.reference: _outcome(check.reference),
                check.run: _outcome(check.run, dense=True)}  # logs r = 0 throughout
    result = multi_gpu.compare(check, outcomes, S)
    assert not result["passed"] and "differ from LORS" in result["message"]


def test_the_overlapped_param_gather_is_judged_against_the_same_layout_without_it(tmp_path):
    """The overlap launch passes megatron's two overlap flags and is compared with 1 GPU and
    with its twin without them; a selection drawn on weights still being gathered (a
    changed loss from iteration 2) fails."""
    launch = multi_gpu.BY_NAME["dp2-distopt-overlap"]
    args = multi_gpu.correctness_args(launch, S, tmp_path)
    twin = multi_gpu.correctness_args(multi_gpu.BY_NAME["dp2-distopt"], S, tmp_path)
    assert {"--overlap-grad-reduce", "--overlap-param-gather",
            "--use-distributed-optimizer"} <= set(args)
    assert multi_gpu._last(args, "--ddp-bucket-size") == "1000"  # a bucket per weight
    assert not {"--overlap-grad-reduce", "--overlap-param-gather"} & set(twin)
    name = "dp2-distopt-overlap vs dp2-distopt"
    assert CHECKS[name].reference == "dp2-distopt" and "dp2-distopt-overlap vs 1 GPU" in CHECKS
    assert CHECKS["dp2-distopt-overlap-bf16 vs dp2-distopt-bf16"].reference == "dp2-distopt-bf16"
    assert _judge(name, {})["passed"]
    assert not _judge(name, {2: 1e-4})["passed"]


def test_layouts_draw_per_micro_batch_unless_checked_in_the_iteration_scope(tmp_path):
    """A DP rank scores its own first micro-batch in the iteration scope, so DP layouts are
    compared per micro-batch; the iteration configs run only TP and PP layouts."""
    for launch in multi_gpu.LAUNCHES:
        scope = multi_gpu._last(multi_gpu.correctness_args(launch, S, tmp_path),
                                "--sat-selection-scope")
        assert scope == ("iteration" if launch.config.startswith("iteration") else
                         "microbatch"), launch.name
        assert not (scope == "iteration" and launch.dp > 1), launch.name
    layouts = {(l.tp, l.pp) for l in multi_gpu.LAUNCHES if l.config.startswith("iteration")}
    assert layouts == {(1, 1), (2, 1), (1, 2)}
