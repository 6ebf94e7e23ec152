"""Per-step SAT state: the training iteration, the current rate, and index reuse.

* The training loop tells SAT its iteration with :func:`set_iteration` (``pretrain_sat.py``
  does it in its forward step). The rate is then ``omission_rate_at(cfg, iteration)``.
* Each sparse module owns a :class:`SelectionState`. With ``--sat-selection-scope
  iteration`` (the default) it draws once per training iteration, on the iteration's first
  micro-batch forward, and hands every later forward of the iteration (the other
  micro-batches, a recompute pass) that same selection object. With ``microbatch`` it
  draws once per micro-batch forward; when activation recompute (``--recompute-granularity
  full`` or a recomputed MLP) runs the forward a second time, the first pass ran under
  ``torch.no_grad`` and queued its indices, and the recompute pass (grad enabled) takes
  them back in order, so forward, recompute and backward all use one selection.
* The selection noise is keyed for every draw by a seed mixed from (seed, iteration,
  layer, module, draw number within the iteration, tensor-parallel rank, data-parallel
  rank unless the selection is shared). A run resumed from a checkpoint therefore draws
  the same neurons as the uninterrupted run without saving any RNG state, and an
  iteration's first draw is the same in both scopes.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import torch

_iteration = 0
_micro_batches = 1
_dummy_wgrad = False


def set_iteration(iteration: int) -> None:
    """Record megatron's 0-based training iteration (the step being trained)."""
    global _iteration
    _iteration = int(iteration)


def get_iteration() -> int:
    return _iteration


def set_micro_batches(count: int) -> None:
    """Record how many micro-batches (backward passes of each layer) the current iteration
    runs; ``pretrain_sat.py`` passes megatron's ``get_num_microbatches()``. A selection
    reused by them (``--sat-selection-scope iteration``) sums its kept weight gradients
    over that many backward passes before handing them to ``main_grad``."""
    global _micro_batches
    if int(count) < 1:
        raise ValueError(f"an iteration runs at least one micro-batch, got {count}")
    _micro_batches = int(count)


def micro_batches() -> int:
    return _micro_batches


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
    """Draw-once bookkeeping of one sparse module: per iteration or per micro-batch."""

    def __init__(self, seed: int, layer_number: int, module_id: int,
                 scope: str = "microbatch"):
        self._key = (seed, layer_number, module_id)
        self.scope = scope
        self._pending: deque[tuple[int, object]] = deque()
        self._draws_iteration = -1
        self._draws = 0
        self.last: object = None  # the most recent selection, for logging and tests

    def drawn(self) -> bool:
        """Whether the next forward reuses a selection already drawn (iteration scope)."""
        return self.scope == "iteration" and self._draws_iteration == get_iteration()

    def indices(self, draw: Callable[[int], object], rank_key: tuple[int, ...]) -> object:
        """Return this forward's selection, drawing it with ``draw(seed)`` if new."""
        it = get_iteration()
        if self.scope == "iteration":
            if not self.drawn():
                self._draws_iteration = it
                self.last = draw(_mix(*self._key, it, 0, *rank_key))
            return self.last
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
