"""The throughput logger of ``pretrain_sat.py`` (on by default).

Every ``--log-interval`` iterations the last rank prints one line next to megatron's::

    [sat] iteration 40 | omission rate 0.300 | tokens/s 81920.0 (per GPU 81920.0) |
    model TFLOP/s per GPU 301.2 (dense-equivalent 402.7) | MFU 30.5% of 989 |
    peak memory 41.20 GiB

(one line in the log) and writes the same values to megatron's TensorBoard writer (tags
``throughput/<field>``, step = iteration) and, as one JSON object per interval, to a JSONL
file (``--sat-throughput-jsonl``; by default ``throughput.jsonl`` in ``--tensorboard-dir``,
else in ``--save``; appended to on resume). The fields (:class:`ThroughputRecord`):

* ``iteration``: iterations done, as in megatron's line of the same number.
* ``iterations``, ``seconds``: the interval since the previous line.
* ``tokens_per_s``: the tokens of the interval's global batches (batch size x sequence
  length, summed over its iterations) / seconds; ``_per_gpu`` divides by the world size.
* ``model_flops``, ``model_tflops_per_gpu``: the model FLOPs actually computed, summed over
  the interval's iterations each at its own omission rate (LORS lowers the rate inside an
  interval), per second and GPU. Counted as in :mod:`megatron_sat.flops`.
* ``dense_equivalent_tflops_per_gpu``: the dense model's FLOPs for the same tokens, per
  second and GPU: what a dense run would have to sustain to be as fast.
* ``mfu``: ``model_tflops_per_gpu`` over the peak (``--sat-peak-tflops``, or known from
  the GPU name for bf16/fp16 runs); ``None`` ("n/a") when unknown, on CPU and for fp32.
* ``omission_rate``: the rate of the last iteration done.
* ``peak_memory_gib``: ``torch.cuda.max_memory_allocated`` of the reporting rank (the
  last: the last pipeline stage) since the start; ``None`` on CPU.

Timing: the clock reads (after a GPU synchronise) at the start of the first forward of
an iteration, so an interval holds whole iterations: forward, backward, the optimizer
step, data loading, megatron's own logging, and any evaluation or checkpoint save that
falls inside it. The first interval includes the warm-up (allocator, kernel autotuning)
and is reported as measured. Iterations after the last multiple of the log interval are
not reported, because no iteration starts after them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable, Sequence

import torch
from megatron.core.num_microbatches_calculator import get_current_global_batch_size

from megatron_sat.config import SATConfig
from megatron_sat.flops import ModelShape, step_flops

# Dense bf16/fp16 tensor-core peak per GPU in TFLOP/s (datasheets, without 2:4 sparsity).
# The first name contained in the device name wins.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0),
               ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))

# Written to TensorBoard as throughput/<field>.
TENSORBOARD_FIELDS = ("tokens_per_s", "tokens_per_s_per_gpu", "model_tflops_per_gpu",
                      "dense_equivalent_tflops_per_gpu", "mfu", "omission_rate",
                      "peak_memory_gib")


@dataclass(frozen=True)
class ThroughputRecord:
    """One log interval (see the module docstring for the fields)."""

    iteration: int
    iterations: int
    seconds: float
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    model_flops: int
    model_tflops_per_gpu: float
    dense_equivalent_tflops_per_gpu: float
    mfu: float | None
    peak_tflops: float | None
    omission_rate: float
    peak_memory_gib: float | None
    time: float  # Unix time of the line

    def line(self) -> str:
        mfu = "n/a" if self.mfu is None else f"{100 * self.mfu:.1f}% of {self.peak_tflops:g}"
        memory = "n/a" if self.peak_memory_gib is None else f"{self.peak_memory_gib:.2f} GiB"
        return (f"[sat] iteration {self.iteration} | omission rate {self.omission_rate:.3f} | "
                f"tokens/s {self.tokens_per_s:.1f} (per GPU {self.tokens_per_s_per_gpu:.1f}) | "
                f"model TFLOP/s per GPU {self.model_tflops_per_gpu:.4g} (dense-equivalent "
                f"{self.dense_equivalent_tflops_per_gpu:.4g}) | MFU {mfu} | "
                f"peak memory {memory}")


Sink = Callable[[ThroughputRecord], None]


def synchronized_clock() -> float:
    """``time.perf_counter`` once the GPU has finished the work queued so far."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_memory_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


class ThroughputMeter:
    """Times log intervals and sums the tokens and FLOPs of their iterations.

    Args:
        tokens_per_iteration: the current global batch size x sequence length (megatron's
            ``--rampup-batch-size`` changes it between iterations).
        world_size: GPUs (processes) sharing the work.
        log_interval: report when an iteration that is a multiple of it starts.
        flops_per_token: model FLOPs (forward + backward) per token at an omission rate.
        peak_tflops: peak TFLOP/s of one GPU for the MFU, or None.
        sinks: where records go; none on ranks that do not report (then it does nothing).
        clock, peak_memory: injectable for tests.
    """

    def __init__(self, *, tokens_per_iteration: Callable[[], int], world_size: int,
                 log_interval: int, flops_per_token: Callable[[float], int],
                 peak_tflops: float | None, sinks: Sequence[Sink],
                 clock: Callable[[], float] = synchronized_clock,
                 peak_memory: Callable[[], float | None] = peak_memory_gib):
        self.tokens_per_iteration = tokens_per_iteration
        self.world_size = world_size
        self.log_interval = log_interval
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.sinks = tuple(sinks)
        self._clock, self._peak_memory = clock, peak_memory
        self._iteration: int | None = None
        self._rate = 0.0
        self._mark: tuple[int, float] | None = None  # (iteration, clock) of the interval start
        self._tokens = self._flops = 0  # of the iterations started since the mark

    def start_iteration(self, iteration: int, rate: float) -> ThroughputRecord | None:
        """Call at every micro-batch with the 0-based iteration and its omission rate.

        At the start of iteration n, n iterations are done; when n is a multiple of the
        log interval, the interval up to here is reported and returned.
        """
        if not self.sinks or iteration == self._iteration:
            return None
        record = None
        if self._mark is None:
            self._mark = (iteration, self._clock())
        elif iteration % self.log_interval == 0 and iteration > self._mark[0]:
            now = self._clock()
            record = self._record(iteration, now - self._mark[1])
            for sink in self.sinks:
                sink(record)
            self._mark, self._tokens, self._flops = (iteration, now), 0, 0
        tokens = self.tokens_per_iteration()
        self._iteration, self._rate = iteration, rate
        self._tokens += tokens
        self._flops += tokens * self.flops_per_token(rate)
        return record

    def _record(self, iteration: int, seconds: float) -> ThroughputRecord:
        per_gpu_second = 1.0 / (seconds * self.world_size)
        model_tflops = self._flops * per_gpu_second / 1e12
        return ThroughputRecord(
            iteration=iteration,
            iterations=iteration - self._mark[0],
            seconds=seconds,
            tokens_per_s=self._tokens / seconds,
            tokens_per_s_per_gpu=self._tokens * per_gpu_second,
            model_flops=self._flops,
            model_tflops_per_gpu=model_tflops,
            dense_equivalent_tflops_per_gpu=self._tokens * self.flops_per_token(0.0)
            * per_gpu_second / 1e12,
            mfu=None if self.peak_tflops is None else model_tflops / self.peak_tflops,
            peak_tflops=self.peak_tflops,
            omission_rate=self._rate,
            peak_memory_gib=self._peak_memory(),
            time=time.time(),
        )


# ----------------------------------------------------------------------------- sinks


def print_line(record: ThroughputRecord) -> None:
    print(record.line(), flush=True)


class JsonlSink:
    """Appends one JSON object per record to ``path`` (creating its directory)."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def __call__(self, record: ThroughputRecord) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(record)) + "\n")


class TensorBoardSink:
    """Writes the :data:`TENSORBOARD_FIELDS` that have a value as ``throughput/<field>``."""

    def __init__(self, writer):
        self.writer = writer

    def __call__(self, record: ThroughputRecord) -> None:
        for field in TENSORBOARD_FIELDS:
            value = getattr(record, field)
            if value is not None:
                self.writer.add_scalar(f"throughput/{field}", value, record.iteration)


# ----------------------------------------------------------------------------- from args


def detect_peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU known by name, else None."""
    return next((peak for key, peak in PEAK_TFLOPS if key in device_name), None)


def peak_tflops_from_args(args: argparse.Namespace) -> tuple[float | None, str]:
    """The MFU peak and where it comes from (for the start-up line)."""
    if args.sat_peak_tflops is not None:
        return args.sat_peak_tflops, "--sat-peak-tflops"
    if not torch.cuda.is_available():
        return None, "no GPU"
    name = torch.cuda.get_device_name()
    if not (args.bf16 or args.fp16):
        return None, f"{name} in fp32: set --sat-peak-tflops"
    peak = detect_peak_tflops(name)
    return peak, name if peak is not None else f"unknown GPU {name!r}: set --sat-peak-tflops"


def jsonl_path_from_args(args: argparse.Namespace) -> str | None:
    """``--sat-throughput-jsonl``, else throughput.jsonl in --tensorboard-dir or --save."""
    if args.sat_throughput_jsonl:
        return args.sat_throughput_jsonl
    directory = args.tensorboard_dir or args.save
    return os.path.join(directory, "throughput.jsonl") if directory else None


def meter_from_args(args: argparse.Namespace, sat_config: SATConfig,
                    tensorboard_writer) -> ThroughputMeter:
    """The meter of a ``pretrain_sat.py`` run; build it once megatron has initialised
    (the FLOPs need the padded vocabulary; ``tensorboard_writer`` is megatron's writer
    or None).

    Only the last rank reports (it holds megatron's TensorBoard writer and the loss)."""
    shape = ModelShape.from_args(args)
    flops_per_token = partial(step_flops, shape, 1, gqa_mode=sat_config.gqa_mode,
                              modules=sat_config.modules,
                              channel_multiple=sat_config.channel_multiple)
    peak, peak_source = peak_tflops_from_args(args)
    sinks: list[Sink] = []
    if args.rank == args.world_size - 1:
        sinks.append(print_line)
        if tensorboard_writer is not None:
            sinks.append(TensorBoardSink(tensorboard_writer))
        path = jsonl_path_from_args(args)
        if path:
            sinks.append(JsonlSink(path))
        peak_text = "n/a" if peak is None else f"{peak:g} TFLOP/s per GPU"
        print(f"[sat] throughput logger: dense model FLOPs per token {flops_per_token(0.0)} "
              f"(forward + backward = 3 x forward, causal attention counted half); "
              f"MFU peak {peak_text} ({peak_source}); JSONL {path or 'off'}", flush=True)
    return ThroughputMeter(
        tokens_per_iteration=lambda: get_current_global_batch_size() * args.seq_length,
        world_size=args.world_size, log_interval=args.log_interval,
        flops_per_token=flops_per_token, peak_tflops=peak, sinks=sinks)
