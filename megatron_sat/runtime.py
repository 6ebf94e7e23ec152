"""Per-step SAT state: the training iteration, the current rate, and index reuse.

* The training loop tells SAT its iteration with :func:`set_iteration` (``pretrain_sat.py``
  does it in its forward step). The rate is then ``omission_rate_at(cfg, iteration)``.
* Each sparse module owns a :class:`SelectionState`. Indices are drawn once per micro-batch
  forward. When activation recompute (``--recompute-granularity full`` or a recomputed
  MLP) runs the forward a second time, the first pass ran under ``torch.no_grad`` and
  queued its indices; the recompute pass (grad enabled) takes them back in order, so
  forward, recompute and backward all use one selection.
* The selection noise is keyed for every draw by a seed mixed from (seed, iteration,
  layer, module, micro-batch, tensor-parallel rank, data-parallel rank unless the
  selection is shared). A run resumed from a checkpoint therefore draws the same
  neurons as the uninterrupted run without saving any RNG state.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import torch

_iteration = 0
_dummy_wgrad = False


def set_iteration(iteration: int) -> None:
    """Record megatron's 0-based training iteration (the step being trained)."""
    global _iteration
    _iteration = int(iteration)


def get_iteration() -> int:
    return _iteration


def set_dummy_wgrad(enabled: bool) -> None:
    """With megatron DDP's ``--overlap-grad-reduce``, the grad-ready hook asserts that a
    parameter received a ``.grad``. Sparse layers write their weight gradient straight into
    ``main_grad``; when this is on they also hand autograd an uninitialised placeholder
    (an allocation, no computation), as megatron-core's own fused wgrad path does."""
    global _dummy_wgrad
    _dummy_wgrad = bool(enabled)


def dummy_wgrad_enabled() -> bool:
    return _dummy_wgrad


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), stable across processes."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class SelectionState:
    """Draw-once-per-forward bookkeeping of one sparse module."""

    def __init__(self, seed: int, layer_number: int, module_id: int):
        self._key = (seed, layer_number, module_id)
        self._pending: deque[tuple[int, object]] = deque()
        self._draws_iteration = -1
        self._draws = 0
        self.last: object = None  # the most recent selection, for logging and tests

    def indices(self, draw: Callable[[int], object], rank_key: tuple[int, ...]) -> object:
        """Return this micro-batch's selection, drawing it with ``draw(seed)`` if new."""
        it = get_iteration()
        if torch.is_grad_enabled():
            while self._pending and self._pending[0][0] != it:
                self._pending.popleft()  # stale: an abandoned no-grad forward
            if self._pending:
                self.last = self._pending.popleft()[1]
                return self.last
        if self._draws_iteration != it:
            self._draws_iteration, self._draws = it, 0
        seed = _mix(*self._key, it, self._draws, *rank_key)
        self._draws += 1
        self.last = draw(seed)
        if not torch.is_grad_enabled():
            self._pending.append((it, self.last))
        return self.last
