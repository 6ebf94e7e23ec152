"""Multi-GPU correctness and scaling (marker ``gpu``; see ``multi_gpu.py`` and
docs/multi-gpu.md). Skipped without CUDA devices, unless ``GPU_TEST_CPU=1`` rehearses the
suite on CPU. A check whose layouts need more GPUs than are visible is skipped.

fp32 checks pass when the layout matches the 1-GPU run within ``multi_gpu.TOLERANCE``
(the control when it does not); bf16 checks pass when their launches ran and logged the
right iterations and omission rates, and report their drift in the summary."""

from __future__ import annotations

import math

import pytest

import multi_gpu

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(multi_gpu.visible_devices() < 1,
                       reason="no CUDA device (GPU_TEST_CPU=1 rehearses the suite on CPU)"),
]


def _skip_if_too_few_gpus(needed: int) -> None:
    visible = multi_gpu.visible_devices()
    if needed > visible:
        pytest.skip(f"needs {needed} GPUs, {visible} visible")


@pytest.mark.parametrize("check", multi_gpu.CHECKS, ids=lambda c: c.name)
def test_check(suite, check):
    _skip_if_too_few_gpus(check.gpus())
    if not multi_gpu.selected(check):
        pytest.skip("not in GPU_TEST_CONFIGS / GPU_TEST_PRECISIONS")
    result = next(r for r in suite["checks"] if r["name"] == check.name)
    if not result["passed"]:
        launches = suite["launches"]
        logs = [launches[n]["log"] for n in check.launches if launches[n]["log"]]
        pytest.fail(result["message"] + (f" (logs: {', '.join(logs)})" if logs else ""))


@pytest.mark.parametrize("launch", multi_gpu.SCALE_LAUNCHES, ids=lambda s: s.name)
def test_scaling_measured(suite, launch):
    _skip_if_too_few_gpus(launch.gpus)
    if not multi_gpu.scaling_enabled():
        pytest.skip("GPU_TEST_SCALING=0")
    row = next(r for r in suite["scaling"] if r["layout"] == launch.name)
    log = suite["launches"][f"scale-{launch.name}"]["log"]
    assert row["ok"], f"scale-{launch.name}: {row['skipped'] or 'failed'}, see {log}"
    for phase, rate in (("sat", 0.5), ("dense", 0.0)):
        stats = row[phase]
        assert stats["omission_rate"] == [rate], (phase, stats)
        assert stats["iterations"] > 0 and math.isfinite(stats["tokens_per_s"]), (phase, stats)
