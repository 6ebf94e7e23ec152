"""What the sparse MLP and the sparse attention share: when to sparsify, and the draw.

A block is sparse only in training mode and when the current rate (Eq. 11, or the
constant rate) is above 0; otherwise it runs megatron-core's dense code unchanged, so
evaluation, inference and r = 0 are exactly stock megatron-core.

Data parallelism (``--sat-dp-selection``): with ``local`` (default) each data-parallel
rank scores and samples on its own micro-batch, like dropout, so across the
data-parallel group more neurons receive gradient each step. With ``shared`` the scores
are averaged over the data-parallel group (one all-reduce of a few thousand floats per
block) and the noise is the same on every data-parallel rank, so all ranks train one
sub-network.

``--sat-selection-scope``: with ``iteration`` (default) a block draws once per training
iteration and its later micro-batches reuse the draw, so they score nothing, and the
layers reuse the kept weight slices they gathered for it
(:func:`~megatron_sat.sparse_linear.keep`); with ``microbatch`` every micro-batch draws.

Selection runs as one Triton kernel per block on a GPU (:mod:`megatron_sat.fused_selection`)
and as torch operations otherwise, or everywhere with ``--sat-selection-kernel torch``.

The input statistic of Eq. 5 (:func:`~megatron_sat.importance.input_statistic`) is the
maxip token mean of the block's input, which is the output of the layer norm before it;
that norm can compute the mean in its own pass and offer it (:mod:`megatron_sat.norm`). An
offer counts only for the very tensor it was made for, so anything megatron put between the
norm and the block makes the block compute the statistic itself.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_sat.config import SATConfig
from megatron_sat.importance import input_statistic
from megatron_sat.runtime import SelectionState, get_iteration
from megatron_sat.schedule import omission_rate_at
from megatron_sat.selection import select

try:
    from megatron_sat import fused_selection
except ImportError:  # Triton is not installed: the torch path everywhere
    fused_selection = None


class SparseBlock:
    """Selection policy of one SAT module (``module_id`` 0: MLP, 1: attention)."""

    def __init__(self, cfg: SATConfig, module_id: int, tp_group, sequence_parallel: bool,
                 layer_number: int = 0):
        self.cfg = cfg
        self.module_id = module_id
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel
        self.method = "sampling" if cfg.metric == "uniform" else cfg.selection
        self._offer: tuple[weakref.ref, torch.Tensor] | None = None
        self.set_layer_number(layer_number)

    def set_layer_number(self, layer_number: int) -> None:
        """The global layer number keys the selection noise, so layers draw independently."""
        self.state = SelectionState(self.cfg.seed, layer_number, self.module_id,
                                    self.cfg.selection_scope)

    def rate(self, training: bool) -> float:
        """The omission rate for this forward; 0 means run dense."""
        return omission_rate_at(self.cfg, get_iteration()) if training else 0.0

    def wants_token_mean(self, training: bool) -> bool:
        """Whether the next forward draws a selection scored by maxip on the whole sequence
        (not a sequence-parallel shard), so that its input's token mean is worth an offer."""
        return (self.cfg.metric == "maxip" and not self.sequence_parallel
                and self.rate(training) > 0.0 and not self.state.drawn())

    def offer_token_mean(self, output: torch.Tensor, mean: torch.Tensor) -> None:
        """The token mean of ``output``, computed by the norm that produced it."""
        self._offer = (weakref.ref(output), mean)

    def statistic(self, z: torch.Tensor) -> torch.Tensor | None:
        """Eq. 5's d-vector for input ``z``: the offered mean if it was made for ``z``."""
        offer, self._offer = self._offer, None
        if offer is not None and offer[0]() is z:
            return offer[1]
        sp_group = self.tp_group if self.sequence_parallel else None
        return input_statistic(self.cfg.metric, z, sp_group)

    def fused(self, scores: torch.Tensor, *dims: int) -> bool:
        """Whether selection on ``scores`` (laid out as ``dims``) runs the Triton kernels."""
        return (self.cfg.selection_kernel == "auto" and fused_selection is not None
                and fused_selection.supports(scores, *dims))

    def pick(self, scores: torch.Tensor, n_keep: int, seed: int,
             shift: int | None = None) -> torch.Tensor:
        """Top-k or Gumbel-top-k over the last dim of ``scores`` (see ``selection.select``)."""
        fn = fused_selection.select if self.fused(scores, *scores.shape) else select
        return fn(scores, n_keep, self.method, self.cfg.temperature, self.cfg.score_scale,
                  seed, shift)

    @property
    def reuses_selection(self) -> bool:
        """Whether a selection serves several forwards (iteration scope), so that the
        layers keep the weight slices they gather for it."""
        return self.cfg.selection_scope == "iteration"

    def draw(self, scores_fn: Callable[[], torch.Tensor],
             choose: Callable[[torch.Tensor, int], object]) -> object:
        """This forward's selection: ``choose(scores_fn(), seed)``, drawn once per
        iteration or per micro-batch (``--sat-selection-scope``)."""
        shared = self.cfg.dp_selection == "shared"

        def fresh(seed):
            scores = scores_fn()
            if shared and _dp_size() > 1:
                scores = scores.float()
                dist.all_reduce(scores, group=parallel_state.get_data_parallel_group())
                scores /= _dp_size()
            return choose(scores, seed)

        tp_rank = dist.get_rank(self.tp_group) if self.tp_group is not None else 0
        dp_rank = 0 if shared else _dp_rank()
        return self.state.indices(fresh, (tp_rank, dp_rank))


def _dp_size() -> int:
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_data_parallel_world_size()


def _dp_rank() -> int:
    if not parallel_state.model_parallel_is_initialized():
        return 0
    return parallel_state.get_data_parallel_rank()

