"""The sparse MLP (paper Eq. 10): MLP(X) = sigma(X W~_up) W~_down.

Neuron j of a rank is its local channel j: fc1 row j (for SwiGLU also the up row
j + f_local, since megatron stores the local fc1 shard as [gate_local; up_local]) and
fc2 column j, so a neuron never spans two tensor-parallel ranks. Each rank keeps
floor(f_local * (1 - r)) of its own channels, rounded down to a multiple of
``--sat-channel-multiple`` (64 by default; see :func:`~megatron_sat.config.kept_channels`).

A channel is scored by the fc1 row that feeds the nonlinearity sigma: the gate row for
gated units (SwiGLU/GeGLU), the only row otherwise (Eq. 4 and 10 score the column of
W_up that sigma reads).

Only the kept rows and columns are multiplied, forward and backward; megatron-core's own
activation code runs in between on the narrower tensor.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.mlp import MLP

from megatron_sat.block import SparseBlock
from megatron_sat.config import SATConfig, kept_channels
from megatron_sat.importance import neuron_scores
from megatron_sat.sparse_linear import keep


class SATMLP(MLP):
    """megatron-core MLP whose forward keeps a sampled subset of channels."""

    sat: SparseBlock

    @classmethod
    def as_mlp_submodule(cls, *args, sat_config: SATConfig, **kwargs):
        """Layer-spec hook: ``partial(SATMLP.as_mlp_submodule, submodules=..., sat_config=...)``."""
        mlp = super().as_mlp_submodule(*args, **kwargs)
        mlp.sat = SparseBlock(sat_config, module_id=0, tp_group=mlp.tp_group,
                              sequence_parallel=mlp.config.sequence_parallel)
        return mlp

    def set_layer_number(self, layer_number: int) -> None:
        """Called by megatron's TransformerLayer after construction."""
        self.sat.set_layer_number(layer_number)

    @property
    def ffn_local(self) -> int:
        rows = self.linear_fc1.weight.shape[0]
        return rows // 2 if self.config.gated_linear_unit else rows

    def forward(self, hidden_states: torch.Tensor, per_token_scale=None, **kwargs):
        rate = self.sat.rate(self.training)
        if rate == 0.0 or per_token_scale is not None:
            return super().forward(hidden_states, per_token_scale, **kwargs)
        k = self.kept(self.ffn_local, rate)
        shift = self.ffn_local if self.config.gated_linear_unit else None
        fc1_rows, fc2_columns = self.sat.draw(lambda: self.channel_scores(hidden_states),
                                              lambda s, seed: self.choose(s, k, seed, shift))
        # --mlp-chunks-for-training K runs this forward K times per micro-batch: the
        # layers' slices would count K backward passes per micro-batch, so each gathers anew
        reuse = self.sat.reuses_selection and self.config.mlp_chunks_for_training <= 1
        with keep((self.linear_fc1, fc1_rows), (self.linear_fc2, fc2_columns), reuse=reuse):
            return super().forward(hidden_states, **kwargs)

    def sat_scored_linears(self) -> tuple:
        """The layers whose weights :meth:`channel_scores` reads (see
        ``sparse_linear.attach_to_megatron_ddp``)."""
        return (self.linear_fc1,)

    def choose(self, scores: torch.Tensor, k: int, seed: int,
               shift: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 8: (``linear_fc1`` rows, ``linear_fc2`` columns) of the k kept channels; a
        gated unit's rows are the kept gate rows, then the same channels' up rows."""
        rows = self.sat.pick(scores, k, seed, shift)
        return rows, rows[:k]

    def kept(self, channels: int, rate: float) -> int:
        """Channels kept of this rank's ``channels`` (rounded to ``--sat-channel-multiple``)."""
        return kept_channels(channels, rate, self.sat.cfg.channel_multiple)

    def channel_scores(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Eq. 5 score of every local channel, from the rows that feed sigma."""
        return neuron_scores(self.sat.cfg.metric, self.linear_fc1.weight[: self.ffn_local],
                             self.sat.statistic(hidden_states))
