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
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_sat.config import SATConfig
from megatron_sat.runtime import SelectionState, get_iteration
from megatron_sat.schedule import omission_rate_at
from megatron_sat.selection import select


class SparseBlock:
    """Selection policy of one SAT module (``module_id`` 0: MLP, 1: attention)."""

    def __init__(self, cfg: SATConfig, module_id: int, tp_group, layer_number: int = 0):
        self.cfg = cfg
        self.module_id = module_id
        self.tp_group = tp_group
        self.method = "sampling" if cfg.metric == "uniform" else cfg.selection
        self.set_layer_number(layer_number)

    def set_layer_number(self, layer_number: int) -> None:
        """The global layer number keys the selection noise, so layers draw independently."""
        self.state = SelectionState(self.cfg.seed, layer_number, self.module_id)

    def rate(self, training: bool) -> float:
        """The omission rate for this forward; 0 means run dense."""
        return omission_rate_at(self.cfg, get_iteration()) if training else 0.0

    def pick(self, scores: torch.Tensor, n_keep: int, gen: torch.Generator) -> torch.Tensor:
        """Top-k or Gumbel-top-k over the last dim of ``scores``."""
        return select(scores, n_keep, self.method, self.cfg.temperature, self.cfg.score_scale,
                      gen)

    def draw(self, scores_fn: Callable[[], torch.Tensor],
             choose: Callable[[torch.Tensor, torch.Generator], object],
             device: torch.device) -> object:
        """This micro-batch's selection: ``choose(scores_fn(), generator)``, drawn once."""
        shared = self.cfg.dp_selection == "shared"

        def fresh(gen):
            scores = scores_fn()
            if shared and _dp_size() > 1:
                dist.all_reduce(scores, group=parallel_state.get_data_parallel_group())
                scores /= _dp_size()
            return choose(scores, gen)

        tp_rank = dist.get_rank(self.tp_group) if self.tp_group is not None else 0
        dp_rank = 0 if shared else _dp_rank()
        return self.state.indices(fresh, device, (tp_rank, dp_rank))


def _dp_size() -> int:
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_data_parallel_world_size()


def _dp_rank() -> int:
    if not parallel_state.model_parallel_is_initialized():
        return 0
    return parallel_state.get_data_parallel_rank()

