"""Tests of the throughput logger (megatron_sat/throughput.py), its flags, and
tools/plot_throughput.py: interval arithmetic with a fake clock across a rate change, the
JSONL and TensorBoard outputs read back, and one end-to-end ``pretrain_sat.py`` run whose
logged FLOPs are checked against a hand count."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from _launch import REPO, pretrain, read_tensorboard
from megatron_sat.arguments import add_sat_arguments
from megatron_sat.throughput import (JsonlSink, TensorBoardSink, ThroughputMeter,
                                     ThroughputRecord, detect_peak_tflops,
                                     jsonl_path_from_args)

sys.path.insert(0, str(REPO / "tools"))
import plot_throughput  # noqa: E402

# FLOPs per token at each rate (any function of the rate will do): 1000 tokens per
# iteration then make 600, 800 and 1000 TFLOP per iteration.
FLOPS = {0.5: 6 * 10**11, 0.25: 8 * 10**11, 0.0: 10**12}


class FakeClock:
    def __init__(self, times: list[float]):
        self.times = list(times)
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.times.pop(0)


def make_meter(clock, sinks, tokens=lambda: 1000) -> ThroughputMeter:
    return ThroughputMeter(tokens_per_iteration=tokens, world_size=2, log_interval=4,
                           flops_per_token=FLOPS.__getitem__, peak_tflops=1000.0, sinks=sinks,
                           clock=clock, peak_memory=lambda: 1.5)


def test_interval_sums_the_flops_of_each_iteration_at_its_own_rate():
    records: list[ThroughputRecord] = []
    clock = FakeClock([10.0, 14.0, 16.0])
    meter = make_meter(clock, [records.append])
    # iterations 0-3 at rates 0.5, 0.5, 0.25, 0.25 (two micro-batches each), then dense
    for iteration, rate in [(0, 0.5), (1, 0.5), (2, 0.25), (3, 0.25), (4, 0.0), (5, 0.0),
                            (6, 0.0), (7, 0.0), (8, 0.0)]:
        for _ in range(2):
            meter.start_iteration(iteration, rate)
    assert clock.reads == 3  # the clock (a GPU synchronise) is read only at log points
    first, second = records
    # 4 iterations in 4 s, 2 GPUs: 4000 tokens / 4 s = 1000 tokens/s, 500 per GPU.
    # Computed: 600 + 600 + 800 + 800 = 2800 TFLOP / (4 s * 2 GPUs) = 350 TFLOP/s per GPU;
    # dense-equivalent 4 * 1000 / 8 = 500; MFU 350 / 1000.
    assert (first.iteration, first.iterations, first.seconds) == (4, 4, 4.0)
    assert first.tokens_per_s == 1000.0 and first.tokens_per_s_per_gpu == 500.0
    assert first.model_flops == 2800 * 10**12
    assert first.model_tflops_per_gpu == pytest.approx(350.0)
    assert first.dense_equivalent_tflops_per_gpu == pytest.approx(500.0)
    assert first.mfu == pytest.approx(0.35) and first.peak_tflops == 1000.0
    assert first.omission_rate == 0.25  # of the last iteration done (3)
    assert first.peak_memory_gib == 1.5
    # iterations 4-7, dense, in 2 s: 2000 tokens/s; computed = dense-equivalent = 1000.
    assert (second.iteration, second.iterations, second.seconds) == (8, 4, 2.0)
    assert second.tokens_per_s == 2000.0
    assert second.model_tflops_per_gpu == pytest.approx(1000.0)
    assert second.dense_equivalent_tflops_per_gpu == pytest.approx(1000.0)
    assert second.omission_rate == 0.0


def test_resumed_run_starts_its_first_interval_at_the_resume_iteration():
    records: list[ThroughputRecord] = []
    meter = make_meter(FakeClock([0.0, 3.0]), [records.append])
    for iteration in range(6, 9):  # resumed at 6: 6 and 7 done at the start of 8
        meter.start_iteration(iteration, 0.5)
    assert [(r.iteration, r.iterations, r.model_flops) for r in records] == \
        [(8, 2, 1200 * 10**12)]


def test_batch_size_ramp_up_counts_each_iteration_at_its_own_batch():
    records: list[ThroughputRecord] = []
    batches = iter([1000, 1000, 2000, 2000, 3000])  # asked once per iteration
    meter = make_meter(FakeClock([0.0, 2.0]), [records.append], tokens=lambda: next(batches))
    for iteration in range(5):
        meter.start_iteration(iteration, 0.5)
    (first,) = records
    assert first.tokens_per_s == 6000 / 2.0
    assert first.model_flops == 6000 * 6 * 10**11
    assert first.dense_equivalent_tflops_per_gpu == pytest.approx(6000 * 1.0 / 4)


def test_rank_without_sinks_does_nothing():
    clock = FakeClock([])
    meter = make_meter(clock, [])
    for iteration in range(9):
        assert meter.start_iteration(iteration, 0.0) is None
    assert clock.reads == 0


def record(iteration: int, mfu: float | None, memory: float | None) -> ThroughputRecord:
    return ThroughputRecord(
        iteration=iteration, iterations=2, seconds=0.5, tokens_per_s=4096.0,
        tokens_per_s_per_gpu=2048.0, model_flops=3 * 10**14, model_tflops_per_gpu=300.0,
        dense_equivalent_tflops_per_gpu=400.0, mfu=mfu, peak_tflops=None if mfu is None else 989.0,
        omission_rate=0.25, peak_memory_gib=memory, time=1.0)


def test_line_keeps_the_sat_format():
    assert record(10, 0.3033, 41.2).line() == (
        "[sat] iteration 10 | omission rate 0.250 | tokens/s 4096.0 (per GPU 2048.0) | "
        "model TFLOP/s per GPU 300 (dense-equivalent 400) | MFU 30.3% of 989 | "
        "peak memory 41.20 GiB")
    assert record(10, None, None).line().endswith("| MFU n/a | peak memory n/a")


def test_jsonl_appends_across_a_resume(tmp_path):
    path = tmp_path / "new-dir" / "throughput.jsonl"
    JsonlSink(str(path))(record(2, None, None))
    JsonlSink(str(path))(record(4, 0.5, 3.0))  # a resumed run opens the same file again
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [2, 4]
    assert lines[0]["mfu"] is None and lines[1]["mfu"] == 0.5
    assert lines[1]["model_flops"] == 3 * 10**14
    assert lines[1]["dense_equivalent_tflops_per_gpu"] == 400.0


def test_tensorboard_scalars_read_back(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path))
    sink = TensorBoardSink(writer)
    sink(record(2, None, None))
    sink(record(4, 0.5, 3.0))
    writer.close()
    assert read_tensorboard(tmp_path, "throughput/tokens_per_s") == {2: 4096.0, 4: 4096.0}
    assert read_tensorboard(tmp_path, "throughput/model_tflops_per_gpu") == {2: 300.0, 4: 300.0}
    assert read_tensorboard(tmp_path, "throughput/dense_equivalent_tflops_per_gpu")[4] == 400.0
    assert read_tensorboard(tmp_path, "throughput/omission_rate") == {2: 0.25, 4: 0.25}
    assert read_tensorboard(tmp_path, "throughput/mfu") == {4: 0.5}  # None is not written
    assert read_tensorboard(tmp_path, "throughput/peak_memory_gib") == {4: 3.0}


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA GeForce RTX 4090", None)])
def test_peak_from_the_gpu_name(name, peak):
    assert detect_peak_tflops(name) == peak


def parse(flags: list[str]) -> argparse.Namespace:
    return add_sat_arguments(argparse.ArgumentParser(prog="pretrain_sat.py")).parse_args(flags)


def test_logger_flags_and_jsonl_default(tmp_path):
    args = parse([])
    assert args.sat_peak_tflops is None and args.sat_throughput_jsonl is None
    args.tensorboard_dir, args.save = "tb", "ckpt"
    assert jsonl_path_from_args(args) == "tb/throughput.jsonl"
    args.tensorboard_dir = None
    assert jsonl_path_from_args(args) == "ckpt/throughput.jsonl"
    args.save = None
    assert jsonl_path_from_args(args) is None
    args = parse(["--sat-peak-tflops", "400", "--sat-throughput-jsonl", "x.jsonl"])
    assert args.sat_peak_tflops == 400.0 and jsonl_path_from_args(args) == "x.jsonl"


@pytest.mark.parametrize("flags,message", [
    (["--sat-peak-tflops", "0"], "argument --sat-peak-tflops: 0.0 must be > 0"),
    (["--sat-throughput-jsonl", "{tmp}"], "argument --sat-throughput-jsonl: {tmp} is a directory"),
])
def test_bad_logger_flags_fail_naming_the_flag(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        parse([f.format(tmp=tmp_path) for f in flags])
    assert exit_info.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


# ----------------------------------------------------------------------------- plot tool


def fake_run(directory: Path, tokens_per_s: dict[int, float], loss: dict[int, float]) -> Path:
    directory.mkdir()
    for iteration, value in tokens_per_s.items():
        JsonlSink(str(directory / "throughput.jsonl"))(
            ThroughputRecord(**{**record(iteration, None, None).__dict__,
                                "tokens_per_s": value}))
    writer = SummaryWriter(log_dir=str(directory))
    for step, value in loss.items():
        writer.add_scalar("lm loss", value, step)
    writer.close()
    return directory


def test_plot_two_runs(tmp_path):
    dense = fake_run(tmp_path / "dense", {2: 1000.0, 4: 1100.0}, {1: 5.0, 2: 4.0, 3: 3.5})
    sat = fake_run(tmp_path / "sat", {2: 1800.0, 4: 1900.0}, {1: 5.0, 2: 4.2, 3: 3.7})
    assert plot_throughput.load_run(sat, None).tokens_per_s == {2: 1800.0, 4: 1900.0}
    assert plot_throughput.load_run(sat / "throughput.jsonl", "x").loss[2] == pytest.approx(4.2)
    out = tmp_path / "plots" / "throughput.png"
    plot_throughput.main([str(dense), str(sat), "--label", "dense", "SAT r=0.5",
                          "--out", str(out)])
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert sorted(p.name for p in out.parent.iterdir()) == ["throughput.png"]  # no temp left


@pytest.mark.parametrize("argv,message", [
    (["{dense}", "{missing}"], "RUN {missing}: no such file or directory"),
    (["{dense}", "{empty}"], "{empty}: neither throughput.jsonl records nor 'lm loss'"),
    (["{dense}", "--label", "a", "b"], "--label got 2 names for 1 runs"),
])
def test_plot_bad_input_fails_without_output(tmp_path, capsys, argv, message):
    paths = {"dense": fake_run(tmp_path / "dense", {2: 1.0}, {1: 5.0}),
             "missing": tmp_path / "missing", "empty": tmp_path / "empty"}
    paths["empty"].mkdir()
    out = tmp_path / "out.png"
    with pytest.raises(SystemExit) as exit_info:
        plot_throughput.main([a.format(**paths) for a in argv] + ["--out", str(out)])
    assert exit_info.value.code == 2
    assert message.format(**paths) in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_pretrain_logs_throughput_with_hand_counted_flops(tmp_path):
    """TP = 2, SAT r = 0.5 with LORS (T = 12, eta = 2, L = 3), a line every 2 iterations.

    Tiny GPT (tests/_launch.py): 2 layers, h = 64, 4 heads of d = 16 in 2 kv groups, ffn 128,
    sequence 64, vocab 256 (padded: 256), 4 sequences = 256 tokens per iteration.
    Rates by iteration (Eq. 11): 0, 1: 1/2; 2: 1/3; 3-5: 1/6; 6-: 0.
    Kept per TP rank (1 kv group of 2 query heads, 64 channels): query heads floor(2 (1 - r))
    = 1 for every r > 0, K/V in full; channels floor(64 (1 - r)) = 32, 42, 53 for r = 1/2,
    1/3, 1/6. Per token and layer (2 FLOPs per multiply-add):
      attention: qkv 2*64*16*(q + 2*2), scores + PV 2*64*16*q, proj 2*16*q*64 -> 20480 at
      q = 2 (total over both ranks), 32768 dense; MLP 2*64*f*3 = 384 f.
    """
    per_token = {rate: 2 * (attention + 384 * ffn) + 2 * 64 * 256  # 2 layers + LM head
                 for rate, attention, ffn in [(0.5, 20480, 64), (1 / 3, 20480, 84),
                                              (1 / 6, 20480, 106), (0.0, 32768, 128)]}
    rates = [0.5, 0.5, 1 / 3, 1 / 6, 1 / 6, 1 / 6] + [0.0] * 6
    tb = tmp_path / "tensorboard"
    run = pretrain(2, ["--tensor-model-parallel-size", "2", "--log-interval", "2",
                       "--sat-omission-rate", "0.5", "--sat-lors-start", "2",
                       "--sat-lors-ladders", "3", "--attention-dropout", "0",
                       "--hidden-dropout", "0"], tb)
    assert run.returncode == 0, run.output[-6000:]
    lines = [json.loads(line) for line in (tb / "throughput.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [2, 4, 6, 8, 10]
    for line in lines:
        done = range(line["iteration"] - 2, line["iteration"])
        assert line["model_flops"] == sum(3 * 256 * per_token[rates[i]] for i in done)
        assert line["omission_rate"] == pytest.approx(rates[line["iteration"] - 1])
        assert line["mfu"] is None and line["peak_memory_gib"] is None  # CPU
        assert line["tokens_per_s"] == pytest.approx(2 * 256 / line["seconds"])
        assert line["tokens_per_s_per_gpu"] == pytest.approx(line["tokens_per_s"] / 2)
    assert sorted(read_tensorboard(tb, "throughput/tokens_per_s")) == [2, 4, 6, 8, 10]
    assert "[sat] iteration 4 | omission rate 0.167 | tokens/s " in run.output
    assert run.output.count("[sat] throughput logger: dense model FLOPs per token "
                            f"{3 * per_token[0.0]} ") == 1  # the last rank only
