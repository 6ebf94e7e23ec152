"""``pretrain_sat.py`` with the omission rate alternating between r and 0 (benchmarks only).

Iterations come in blocks of ``SAT_BENCH_BLOCK`` (environment): the first block trains at
``--sat-omission-rate``, the next dense, and so on. ``SAT_BENCH_TRITON=0`` turns off
megatron-sat's Triton SwiGLU (runtime width) for an A/B comparison: megatron's compiled
SwiGLU runs instead. SAT and dense phases then interleave
in one process, so slow drifts of the GPU (clocks, temperature, a neighbour) hit both
alike. Everything else is ``pretrain_sat.py`` unchanged: the rate is read wherever the
entry point and the sparse blocks read Eq. 11.

    SAT_BENCH_BLOCK=4 torchrun benchmarks/alternating_rate.py <pretrain_sat.py flags>
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import megatron_sat.block  # noqa: E402
import pretrain_sat  # noqa: E402

BLOCK = int(os.environ["SAT_BENCH_BLOCK"])


def alternating_rate(cfg, iteration: int) -> float:
    """r in even blocks of BLOCK iterations, 0 in odd ones (0-based ``iteration``)."""
    return cfg.omission_rate if cfg.enabled and (iteration // BLOCK) % 2 == 0 else 0.0


megatron_sat.block.omission_rate_at = alternating_rate
pretrain_sat.omission_rate_at = alternating_rate
if os.environ.get("SAT_BENCH_TRITON") == "0":
    import megatron_sat.swiglu

    megatron_sat.swiglu.install = lambda: None

if __name__ == "__main__":
    pretrain_sat.main()
