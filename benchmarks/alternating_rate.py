"""``pretrain_sat.py`` with the omission rate alternating between r and 0 (benchmarks only).

Iterations come in blocks of ``SAT_BENCH_BLOCK`` (environment): the first block trains at
``--sat-omission-rate``, the next dense, and so on. ``SAT_BENCH_TRITON=0`` turns off
megatron-sat's Triton SwiGLU (runtime width) for an A/B comparison: megatron's compiled
SwiGLU runs instead. SAT and dense phases then interleave
in one process, so slow drifts of the GPU (clocks, temperature, a neighbour) hit both
alike. Everything else is ``pretrain_sat.py`` unchanged: the rate is read wherever the
entry point and the sparse blocks read Eq. 11.

Each block's peak allocated memory is printed when the next block starts (and at exit)
as ``[bench] block K rate R peak allocated M MB``, and the peak is reset: the blocks
share one process, so megatron's cumulative ``max allocated`` cannot tell the phases
apart: its two reports (after iteration 1 and at the next log line) both fall in the
first block, and only the first one's maximum predates Adam's moments, which the first
optimizer step allocates. The ``[sat]`` logger's ``peak memory`` then runs from the last
reset, not from the run's start. The reset comes at the next block's first rate read,
just before the logger closes the interval that ends the block, so that interval's line
shows the peak since the reset, not the block's.

    SAT_BENCH_BLOCK=4 torchrun benchmarks/alternating_rate.py <pretrain_sat.py flags>
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import megatron_sat.block  # noqa: E402
import pretrain_sat  # noqa: E402

BLOCK = int(os.environ["SAT_BENCH_BLOCK"])


_block: tuple[int, float] | None = None  # the block running and its rate


def alternating_rate(cfg, iteration: int) -> float:
    """r in even blocks of BLOCK iterations, 0 in odd ones (0-based ``iteration``)."""
    global _block
    block = iteration // BLOCK
    rate = cfg.omission_rate if cfg.enabled and block % 2 == 0 else 0.0
    if _block is None or _block[0] != block:
        report_block_peak()
        _block = (block, rate)
    return rate


@atexit.register
def report_block_peak() -> None:
    """Print the ending block's peak allocated memory and start the next block's."""
    if not torch.cuda.is_available():
        return
    if _block is not None:
        print(f"[bench] block {_block[0]} rate {_block[1]:.9f} peak allocated "
              f"{torch.cuda.max_memory_allocated() / 2**20:.2f} MB", flush=True)
    torch.cuda.reset_peak_memory_stats()


megatron_sat.block.omission_rate_at = alternating_rate
pretrain_sat.omission_rate_at = alternating_rate
if os.environ.get("SAT_BENCH_TRITON") == "0":
    import megatron_sat.swiglu

    megatron_sat.swiglu.install = lambda: None

if __name__ == "__main__":
    pretrain_sat.main()
