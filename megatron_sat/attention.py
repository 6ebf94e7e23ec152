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

from megatron_sat.block import SparseBlock
from megatron_sat.config import SATConfig, kept_count
from megatron_sat.importance import head_scores, input_statistic, neuron_scores
from megatron_sat.sparse_linear import keep


class HeadLayout:
    """Where a rank's heads live: index tables built once per module and device.

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


class HeadSelection:
    """Kept kv groups [G] and, inside each, the kept query heads [G, kq] (local indices)."""

    def __init__(self, groups: torch.Tensor, queries: torch.Tensor, layout: HeadLayout):
        self.groups, self.queries, self.layout = groups, queries, layout

    def qkv_rows(self) -> torch.Tensor:
        """Local ``linear_qkv`` rows: per kept group its kept Q heads, then its K and V."""
        q = self.layout.q_rows[self.groups[:, None], self.queries]
        return torch.cat([q.flatten(1), self.layout.kv_rows[self.groups]], dim=1).reshape(-1)

    def proj_columns(self) -> torch.Tensor:
        """Local ``linear_proj`` columns of the kept query heads, in the same head order."""
        return self.layout.proj_columns[self.groups[:, None], self.queries].reshape(-1)


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
        sel = self.sat.draw(lambda: self.head_scores(hidden_states),
                            lambda s, g: self.choose_heads(s, rate, g), hidden_states.device)
        with keep((self.linear_qkv, sel.qkv_rows()), (self.linear_proj, sel.proj_columns())):
            self._layout = tuple(sel.queries.shape)  # (kept groups, kept queries per group)
            try:
                return super().forward(hidden_states, attention_mask, *args, **kwargs)
            finally:
                self._layout = None

    def head_scores(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Eq. 5-7: [groups_local, q_per_group] scores of the local query heads."""
        metric = self.sat.cfg.metric
        sp_group = self.tp_group if self.config.sequence_parallel else None
        stat = input_statistic(metric, hidden_states, sp_group)
        rows = neuron_scores(metric, self.linear_qkv.weight, stat)
        return head_scores(rows, self.num_query_groups_per_partition, self.q_per_group,
                           self.hidden_size_per_attention_head)

    def head_layout(self, device: torch.device) -> HeadLayout:
        if self._heads is None or self._heads.all_groups.device != device:
            self._heads = HeadLayout(self.num_query_groups_per_partition, self.q_per_group,
                                     self.hidden_size_per_attention_head, device)
        return self._heads

    def choose_heads(self, scores: torch.Tensor, rate: float,
                     gen: torch.Generator) -> HeadSelection:
        groups, qpg = scores.shape
        layout = self.head_layout(scores.device)
        if qpg > 1 and self.sat.cfg.gqa_mode == "heads":
            queries = self.sat.pick(scores, kept_count(qpg, rate), gen)
            return HeadSelection(layout.all_groups, queries, layout)
        kept = self.sat.pick(scores.mean(dim=1), kept_count(groups, rate), gen)
        return HeadSelection(kept, layout.all_queries.expand(kept.numel(), qpg), layout)

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
