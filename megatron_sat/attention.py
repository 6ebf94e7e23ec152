"""The sparse self-attention (paper Eq. 9): MHA(X) = Concat(head_pi1..head_pik) W~_O.

SAT works at head granularity. Head scores come from Eq. 5-7 on the fused QKV rows of
this rank (see :func:`~megatron_sat.importance.head_scores`). Only the kept heads' Q/K/V
rows of ``linear_qkv`` and their columns of ``linear_proj`` are multiplied, and the core
attention runs on the kept heads only.

Grouped-query attention (``--sat-gqa-mode``):

* ``heads`` (default): every kv group of the rank keeps floor(q_per_group * (1 - r)) of
  its query heads, chosen from that group's head scores; K and V are computed in full.
  Attention FLOPs (scores and the Q/O projections) shrink by r, K/V projections do not.
  It works at any tensor-parallel size, because the unit is a query head.
* ``groups``: whole kv groups are kept or dropped, floor(groups_local * (1 - r)) of them,
  scored by the mean of their heads' scores; K and V of dropped groups are skipped too.
  It saves a little more, but needs at least 2 kv groups per rank at r = 0.5.

For multi-head attention (one head per group) both modes select heads, with their K/V.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.attention import SelfAttention

from megatron_sat.block import SparseBlock, fused_selection
from megatron_sat.config import SATConfig, kept_count
from megatron_sat.importance import head_scores, neuron_scores
from megatron_sat.selection import select
from megatron_sat.sparse_linear import keep


class HeadLayout:
    """Where a rank's heads live: index tables built once per module and device (the
    torch path; the Triton kernel computes the same lists directly).

    megatron-core lays out the local ``linear_qkv`` rows per kv group: the group's query
    heads, then its key head, then its value head, ``head_dim`` rows each; the local
    ``linear_proj`` columns follow the query heads in order. The tables turn a selection
    into rows and columns with one indexing kernel each (instead of a dozen small ones).
    """

    def __init__(self, groups: int, q_per_group: int, head_dim: int, device: torch.device):
        rows = torch.arange(groups * (q_per_group + 2) * head_dim, device=device)
        rows = rows.view(groups, q_per_group + 2, head_dim)
        self.q_rows = rows[:, :q_per_group]  # [G, q_per_group, head_dim]
        self.kv_rows = rows[:, q_per_group:].reshape(groups, 2 * head_dim)
        self.proj_columns = torch.arange(groups * q_per_group * head_dim,
                                         device=device).view(groups, q_per_group, head_dim)
        self.all_groups = torch.arange(groups, device=device)
        self.all_queries = torch.arange(q_per_group, device=device)

    def index_lists(self, groups: torch.Tensor,
                    queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``linear_qkv`` rows, ``linear_proj`` columns) of kept kv groups [G'] and the
        kept query heads inside each [G', kq]: per kept group its kept Q heads, then its
        K and V; the projection columns in the same head order."""
        q = self.q_rows[groups[:, None], queries]
        qkv = torch.cat([q.flatten(1), self.kv_rows[groups]], dim=1).reshape(-1)
        return qkv, self.proj_columns[groups[:, None], queries].reshape(-1)


class HeadSelection:
    """The kept heads of one attention block on this rank, as the layers' index lists.

    ``groups`` kv groups are computed, each with ``queries`` of its query heads.
    """

    def __init__(self, qkv_rows: torch.Tensor, proj_columns: torch.Tensor, groups: int,
                 queries: int, head_dim: int):
        self.qkv_rows, self.proj_columns = qkv_rows, proj_columns
        self.groups, self.queries, self.head_dim = groups, queries, head_dim

    def heads(self) -> torch.Tensor:
        """Local indices of the kept query heads, [groups, queries]."""
        first_columns = self.proj_columns[:: self.head_dim]
        return (first_columns // self.head_dim).view(self.groups, self.queries)


class SATSelfAttention(SelfAttention):
    """megatron-core SelfAttention whose forward keeps a sampled subset of heads."""

    def __init__(self, *args, sat_config: SATConfig, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.attention_output_gate or self.config.fused_single_qkv_rope:
            raise ValueError("SAT attention supports neither attention_output_gate nor "
                             "fused_single_qkv_rope")
        if self.config.num_query_groups < self.world_size:
            raise ValueError("SAT attention needs --num-query-groups >= "
                             "--tensor-model-parallel-size")
        self.sat = SparseBlock(sat_config, module_id=1, tp_group=self.tp_group,
                               sequence_parallel=self.config.sequence_parallel,
                               layer_number=self.layer_number)
        self._layout: tuple[int, int] | None = None
        self._heads: HeadLayout | None = None

    @property
    def q_per_group(self) -> int:
        return self.num_attention_heads_per_partition // self.num_query_groups_per_partition

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        rate = self.sat.rate(self.training)
        if rate == 0.0:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        sel = self.sat.draw(lambda: self.row_scores(hidden_states),
                            lambda s, seed: self.choose_heads(s, rate, seed))
        with keep((self.linear_qkv, sel.qkv_rows), (self.linear_proj, sel.proj_columns),
                  reuse=self.sat.reuses_selection):
            self._layout = (sel.groups, sel.queries)
            try:
                return super().forward(hidden_states, attention_mask, *args, **kwargs)
            finally:
                self._layout = None

    def sat_scored_linears(self) -> tuple:
        """The layers whose weights :meth:`row_scores` reads (see
        ``sparse_linear.attach_to_megatron_ddp``)."""
        return (self.linear_qkv,)

    def row_scores(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Eq. 5 score of every local ``linear_qkv`` row (Eq. 6-7 are in ``choose_heads``)."""
        return neuron_scores(self.sat.cfg.metric, self.linear_qkv.weight,
                             self.sat.statistic(hidden_states))

    def head_layout(self, device: torch.device) -> HeadLayout:
        if self._heads is None or self._heads.all_groups.device != device:
            self._heads = HeadLayout(self.num_query_groups_per_partition, self.q_per_group,
                                     self.hidden_size_per_attention_head, device)
        return self._heads

    def choose_heads(self, row_scores: torch.Tensor, rate: float, seed: int) -> HeadSelection:
        """Eq. 6-8: the kept heads from the QKV row scores, in ``--sat-gqa-mode``."""
        groups, qpg = self.num_query_groups_per_partition, self.q_per_group
        head_dim = self.hidden_size_per_attention_head
        by_groups = qpg == 1 or self.sat.cfg.gqa_mode == "groups"
        k = kept_count(groups if by_groups else qpg, rate)
        how = (self.sat.method, self.sat.cfg.temperature, self.sat.cfg.score_scale, seed)
        if self.sat.fused(row_scores, groups, qpg + 2, head_dim):
            qkv, proj = fused_selection.select_heads(row_scores, groups, qpg, head_dim, k,
                                                     by_groups, *how)
        else:
            layout = self.head_layout(row_scores.device)
            scores = head_scores(row_scores, groups, qpg, head_dim)
            if by_groups:
                kept = select(scores.mean(dim=1), k, *how)
                qkv, proj = layout.index_lists(kept, layout.all_queries.expand(k, qpg))
            else:
                qkv, proj = layout.index_lists(layout.all_groups, select(scores, k, *how))
        return HeadSelection(qkv, proj, *((k, qpg) if by_groups else (groups, k)), head_dim)

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None,
                                    output_gate=False, split_qkv=True):
        if self._layout is None:
            return super().get_query_key_value_tensors(
                hidden_states, key_value_states, output_gate=output_gate, split_qkv=split_qkv)
        groups, q_kept = self._layout
        hn = self.hidden_size_per_attention_head
        mixed, _ = self.linear_qkv(hidden_states)
        mixed = mixed.view(*mixed.shape[:-1], groups, (q_kept + 2) * hn)
        query, key, value = torch.split(mixed, [q_kept * hn, hn, hn], dim=3)
        query = query.reshape(query.size(0), query.size(1), -1, hn)
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        if self.k_layernorm is not None:
            key = self.k_layernorm(key)
        return query, key, value
