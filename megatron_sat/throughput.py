"""Throughput line of ``pretrain_sat.py``: tokens/s and the current omission rate.

Megatron's own log line has the loss and the iteration time but neither tokens/s nor
SAT's rate. :class:`ThroughputMeter` is told each iteration as it starts (from the
forward step) and, every ``log_interval`` iterations, prints on the last rank::

    [sat] iteration 40 | omission rate 0.300 | tokens/s 1234.5 (per GPU 617.3)

Tokens/s counts the global batch (global batch size x sequence length) over the wall
time between log lines, so it includes the optimizer step and data loading.
"""

from __future__ import annotations

import time

import torch.distributed as dist


class ThroughputMeter:
    def __init__(self, tokens_per_iteration: int, log_interval: int, world_size: int):
        self.tokens_per_iteration = tokens_per_iteration
        self.log_interval = log_interval
        self.world_size = world_size
        self._iteration: int | None = None
        self._rate = 0.0
        self._mark: tuple[int, float] | None = None

    def start_iteration(self, iteration: int, rate: float) -> None:
        """Call at every micro-batch with the 0-based iteration and its rate.

        Logs like megatron: at the start of 0-based iteration n, n iterations are done;
        the rate shown is that of the last one done (megatron's line shows their mean).
        """
        if iteration == self._iteration:
            return
        self._iteration, done_rate, self._rate = iteration, self._rate, rate
        now = time.perf_counter()
        if self._mark is None:
            self._mark = (iteration, now)
            return
        done = iteration - self._mark[0]
        if iteration % self.log_interval == 0 and done > 0:
            tokens_s = done * self.tokens_per_iteration / (now - self._mark[1])
            if not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1:
                print(f"[sat] iteration {iteration} | omission rate {done_rate:.3f} | tokens/s "
                      f"{tokens_s:.1f} (per GPU {tokens_s / self.world_size:.1f})", flush=True)
            self._mark = (iteration, now)
