"""The benchmarks' own bookkeeping: which iterations are timed, the alternating rate, and
the charging of GPU idle gaps to host ops (``benchmarks/``)."""

from __future__ import annotations

import atexit
import importlib
import json
import sys
from pathlib import Path

import pytest

from megatron_sat.config import SATConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_lors  # noqa: E402
from bench_step import phase_peaks, timed_iterations  # noqa: E402
from profile_summary import (_enclosing_ops, _gaps, _idle_by_op, _idle_by_pass,  # noqa: E402
                             _timeline, phase_of, summarize)


def test_timed_iterations_skip_warmup_and_the_first_after_each_switch():
    rates = {i: (0.5 if (i - 1) // 3 % 2 == 0 else 0.0) for i in range(1, 19)}
    # blocks: 1-3 SAT, 4-6 dense, 7-9 SAT, 10-12 dense, 13-15 SAT, 16-18 dense
    assert timed_iterations(rates, first=7) == [8, 9, 11, 12, 14, 15, 17, 18]


def test_timed_windows_with_a_log_interval_skip_the_first_window_after_a_switch():
    # blocks of 8, logged every 4 iterations: windows (0, 4], (4, 8], ... ; 3 cycles
    rates = {i: (0.5 if (i - 1) // 8 % 2 == 0 else 0.0) for i in range(4, 49, 4)}
    assert timed_iterations(rates, first=17, interval=4) == [24, 32, 40, 48]


def test_lors_windows_start_after_the_warmup():
    rows = [(1, 900.0, 0.5), (10, 300.0, 0.5), (20, 280.0, 0.5), (30, 350.0, 0.3)]
    assert bench_lors.windows(rows, first=4, interval=10) == [
        {"iterations": [11, 20], "ms": 280.0, "rate": 0.5},
        {"iterations": [21, 30], "ms": 350.0, "rate": 0.3}]
    # megatron's line after iteration 1 does not restart the window: 10 covers 1-10
    assert bench_lors.windows(rows, first=1, interval=10)[0]["iterations"] == [1, 10]
    assert len(bench_lors.windows(rows, first=1, interval=1)) == 4


def test_lors_saving_sums_the_windows_and_predicts_from_eq_11(monkeypatch, tmp_path):
    """Synthetic logs (every 10 iterations, 40 iterations, eta 20, 2 ladders): the SAT
    run takes exactly the FLOPs-predicted time, so its saving is 100% of the prediction;
    a window whose logged rate disagrees with Eq. 11 is refused."""
    from megatron_sat.flops import step_flops
    from megatron_sat.schedule import lors_rate

    shape = bench_lors.shape_of(bench_lors.SHAPES["tinyllama"])
    tokens = 16 * 2048
    rates = {t: lors_rate(t, 0.5, 20, 40, 2) for t in range(1, 41)}
    assert sorted(set(rates.values())) == [0.0, 0.25, 0.5]

    def log(scale, sat, skew=0.0):
        rows = [(1, 5000.0, rates[1] if sat else 0.0)]
        for end in range(10, 41, 10):
            window = range(end - 9, end + 1)
            ms = sum(step_flops(shape, tokens, rates[t] if sat else 0.0) for t in window)
            mean = sum(rates[t] for t in window) / 10 if sat else 0.0
            rows.append((end, scale * ms / 10, mean + skew))
        return rows

    def run(skew):
        logs = iter([log(1e-12, False), log(1e-12, True, skew)])
        monkeypatch.setattr(bench_lors, "launch", lambda *args: next(logs))
        monkeypatch.setattr(sys, "argv", ["bench_lors", "--iters", "40", "--lors-start", "20",
                                          "--lors-ladders", "2", "--micro-batch-size", "16",
                                          "--global-batch-size", "16",
                                          "--out", str(tmp_path / "lors.json")])
        bench_lors.main()
        return json.loads((tmp_path / "lors.json").read_text())

    got = run(0.0)
    assert got["timed_iterations"] == [11, 40]
    assert abs(got["saving_vs_predicted"] - 1.0) < 1e-9
    want = 1 - sum(step_flops(shape, tokens, rates[t]) for t in range(11, 41)) / (
        30 * step_flops(shape, tokens, 0.0))
    assert abs(got["flops_predicted_saving"] - want) < 1e-12 and want > 0.15
    assert list(got["by_rate"]) == ["0.5", "0.0"]  # windows of one rate throughout
    with pytest.raises(RuntimeError, match="Eq. 11 gives"):
        run(0.01)


def _import_alternating_rate(monkeypatch, block: int):
    """A fresh import of ``alternating_rate.py`` with ``block`` iterations per block; the
    launcher patches both modules' ``omission_rate_at``, restored after the test, and
    registers an exit hook, dropped (a test calls it itself)."""
    import megatron_sat.block
    import pretrain_sat

    for mod in (megatron_sat.block, pretrain_sat):
        monkeypatch.setattr(mod, "omission_rate_at", mod.omission_rate_at)
    monkeypatch.delitem(sys.modules, "alternating_rate", raising=False)
    monkeypatch.setenv("SAT_BENCH_BLOCK", str(block))
    module = importlib.import_module("alternating_rate")
    monkeypatch.delitem(sys.modules, "alternating_rate")
    atexit.unregister(module.report_block_peak)
    return module


def test_alternating_rate_flips_every_block(monkeypatch):
    import megatron_sat.block
    import pretrain_sat

    module = _import_alternating_rate(monkeypatch, 4)
    cfg = SATConfig(omission_rate=0.5)
    got = [module.alternating_rate(cfg, i) for i in range(12)]
    assert got == [0.5] * 4 + [0.0] * 4 + [0.5] * 4
    assert module.alternating_rate(SATConfig(omission_rate=0.0), 0) == 0.0
    assert megatron_sat.block.omission_rate_at is module.alternating_rate
    assert pretrain_sat.omission_rate_at is module.alternating_rate


def test_each_block_reports_its_own_peak_memory(monkeypatch, capsys):
    """A block's peak is printed when the next block starts and then reset, so a dense
    block's peak is not the SAT block's before it (megatron's cumulative report was)."""
    module = _import_alternating_rate(monkeypatch, 2)
    peak = {"mb": 0.0}
    torch = module.torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: peak["mb"] * 2**20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: peak.update(mb=0.0))
    cfg = SATConfig(omission_rate=0.5)
    # iteration -> the peak it reaches; the rate is read several times per iteration
    for iteration, mb in enumerate([100.0, 120.0, 300.0, 250.0, 110.0]):
        for _ in range(3):
            module.alternating_rate(cfg, iteration)
        peak["mb"] = max(peak["mb"], mb)
    module.report_block_peak()  # what atexit does
    log = capsys.readouterr().out
    blocks, peaks = phase_peaks(log, 0.5)
    assert [(b["block"], b["rate"], b["peak_allocated_mb"]) for b in blocks] == [
        (0, 0.5, 120.0), (1, 0.0, 300.0), (2, 0.5, 110.0)]
    assert peaks == {"sat": 120.0 / 1024, "dense": 300.0 / 1024}
    assert phase_peaks("", 0.5)[1] == {"sat": None, "dense": None}


def test_enclosing_ops_are_nested_outermost_first():
    ops = [{"name": "outer", "ts": 0, "dur": 100}, {"name": "inner", "ts": 10, "dur": 20},
           {"name": "next", "ts": 50, "dur": 10}]
    assert _enclosing_ops(ops, [5, 15, 40, 55, 200]) == [
        ["outer"], ["outer", "inner"], ["outer"], ["outer", "next"], []]


def test_idle_gaps_are_charged_to_the_op_that_launched_the_next_kernel():
    ops = {1: [{"name": "ProfilerStep#3", "ts": 0, "dur": 1000},
               {"name": "SubsetMatmul", "ts": 100, "dur": 50},
               {"name": "aten::mm", "ts": 120, "dur": 5},
               {"name": "aten::sort", "ts": 300, "dur": 5}]}
    kernels = [{"ts": 0, "dur": 100, "args": {"correlation": 1}},
               {"ts": 130, "dur": 10, "args": {"correlation": 2}},   # gap 30 us
               {"ts": 145, "dur": 5, "args": {"correlation": 3}},    # gap 5 us: ignored
               {"ts": 400, "dur": 5, "args": {"correlation": 4}}]    # gap 250 us
    launches = {1: {"tid": 1, "ts": 1}, 2: {"tid": 1, "ts": 121}, 3: {"tid": 1, "ts": 122},
                4: {"tid": 1, "ts": 301}}
    gaps = _gaps(kernels, launches, ops)
    assert gaps == [(100, 30, ["SubsetMatmul", "aten::mm"]), (150, 250, ["aten::sort"])]
    assert _idle_by_op(gaps) == {"aten::sort": 0.25, "SubsetMatmul": 0.03}
    backward = [(0, 40, ["autograd::engine::evaluate_function: MmBackward0", "aten::mm"])]
    assert _idle_by_pass(gaps + backward) == {"forward/other": 0.28, "backward": 0.04}
    line = _timeline(kernels, launches, gaps, 0, 1000, slices=4)
    # slice 0 [0, 250): busy 100 + 10 + 5 us, leads -1, 9, 23 us; slice 1: the kernel at 400
    assert line["busy_fraction"] == [0.46, 0.02, 0.0, 0.0]
    assert line["median_host_lead_ms"][:2] == [0.009, 0.099]
    assert line["largest_gaps"][0] == {"at_ms": 0.15, "gap_ms": 0.25, "host_ops": ["aten::sort"]}


def test_phase_of_a_window_follows_the_next_logged_iteration():
    rates = {4: 0.5, 8: 0.0, 12: 0.5}  # --log-interval 4: window means
    assert [phase_of(i, rates) for i in (1, 4, 5, 8, 9, 11, 12, 13)] == \
        ["sat", "sat", "dense", "dense", "sat", "sat", "sat", "dense"]


def test_summary_follows_the_gpu_when_the_host_runs_a_step_ahead(tmp_path):
    """Step 2's host range ends before step 1's kernels do: kernels are charged to the
    step that launched them, and span, idle and lead are the GPU's."""
    def cpu(name, ts, dur):
        return {"ph": "X", "cat": "user_annotation", "name": name, "ts": ts, "dur": dur,
                "tid": 1}

    def launch(corr, ts):
        return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts,
                "dur": 1, "tid": 1, "args": {"correlation": corr}}

    def kernel(corr, name, ts, dur):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur,
                "args": {"correlation": corr}}

    events = [cpu("ProfilerStep#11", 0, 100), cpu("ProfilerStep#12", 100, 100),
              # the GPU's track spans each step's kernels: longer, and not the host's range
              dict(cpu("ProfilerStep#11", 50, 450), cat="gpu_user_annotation"),
              dict(cpu("ProfilerStep#12", 500, 250), cat="gpu_user_annotation"),
              launch(1, 10), launch(2, 20), launch(3, 110), launch(4, 120),
              kernel(1, "nvjet_gemm", 50, 300), kernel(2, "_rms_norm_forward", 400, 100),
              kernel(3, "nvjet_gemm", 500, 200), kernel(4, "indexFuncLargeIndex", 700, 50)]
    trace = tmp_path / "rank-0.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    steps = summarize(trace, {12: 0.5, 16: 0.0})["steps"]
    assert [s["phase"] for s in steps] == ["sat", "sat"]
    first, second = steps
    assert first["by_category_ms"] == {"matmul": 0.3, "norm/reduction": 0.1}
    assert second["by_category_ms"] == {"matmul": 0.2, "index gather/scatter": 0.05}
    assert first["wall_ms"] == 0.1 and first["gpu_span_ms"] == 0.45  # 50..500 us
    assert first["gpu_busy_ms"] == 0.4 and first["host_lead_ms"] == 0.05
    assert first["gpu_idle_fraction"] == pytest.approx(1 - 0.4 / 0.45)
    assert second["gpu_span_ms"] == 0.25 and second["host_lead_ms"] == 0.4
    assert second["gpu_idle_fraction"] == 0.0
