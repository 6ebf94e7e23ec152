"""The GPT layer spec with SAT's sparse attention (Eq. 9) and sparse MLP (Eq. 10).

It is megatron-core's local (Transformer-Engine-free) GPT layer with these swaps:

=====================  ==========================================================
submodule              SAT module
=====================  ==========================================================
layer                  :class:`SATTransformerLayer` (links each norm to its block)
self_attention         :class:`~megatron_sat.attention.SATSelfAttention`
linear_qkv / fc1       :class:`~megatron_sat.sparse_linear.SATColumnParallelLinear`
linear_proj / fc2      :class:`~megatron_sat.sparse_linear.SATRowParallelLinear`
core_attention         :class:`~megatron_sat.core_attention.SDPAttention`
mlp                    :class:`~megatron_sat.mlp.SATMLP`
norms                  :class:`~megatron_sat.norm.TorchNorm` (sequence-parallel capable)
=====================  ==========================================================

Parameter names and sharding are megatron-core's, so checkpoints are interchangeable
with the stock local spec. A block left out of ``--sat-modules`` uses the stock class.
The spec feeds megatron-core's ``GPTModel`` (see docs/design.md for why not HybridModel).

:func:`get_sat_block_spec` wraps it into the whole block so that the final norm is a
:class:`~megatron_sat.norm.TorchNorm` too: megatron's default final norm for a bare layer
spec cannot run with sequence parallelism without Transformer Engine or Apex.
"""

from __future__ import annotations

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                         get_num_layers_to_build)
from megatron.core.transformer.transformer_layer import (TransformerLayer,
                                                         TransformerLayerSubmodules)

from megatron_sat.attention import SATSelfAttention
from megatron_sat.config import SATConfig
from megatron_sat.core_attention import SDPAttention
from megatron_sat.mlp import SATMLP
from megatron_sat.norm import TorchNorm
from megatron_sat.sparse_linear import SATColumnParallelLinear, SATRowParallelLinear


class SATTransformerLayer(TransformerLayer):
    """megatron-core's ``TransformerLayer`` whose two norms compute the token mean that the
    SAT block after each of them scores by (maxip, Eq. 5) in their own pass, and offer it
    to that block (``TorchNorm.token_mean_sink``; see :mod:`megatron_sat.norm`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for norm, block in ((self.input_layernorm, self.self_attention),
                            (self.pre_mlp_layernorm, self.mlp)):
            if isinstance(norm, TorchNorm) and isinstance(block, (SATSelfAttention, SATMLP)):
                norm.token_mean_sink = block.sat


# a layer's two norms also hand megatron the residual (norm.py: one backward pass adds the
# residual stream's gradient); the block's final norm has no residual
_LAYER_NORM = ModuleSpec(module=TorchNorm, params={"residual_output": True})


def get_sat_layer_spec(sat_config: SATConfig, *, qk_layernorm: bool = False) -> ModuleSpec:
    """A ``TransformerLayer`` spec for megatron-core's GPTModel with SAT blocks."""
    qk_norm = TorchNorm if qk_layernorm else IdentityOp
    if "attention" in sat_config.modules:
        attention = ModuleSpec(
            module=SATSelfAttention,
            params={"attn_mask_type": AttnMaskType.causal, "sat_config": sat_config},
            submodules=SelfAttentionSubmodules(
                linear_qkv=SATColumnParallelLinear, core_attention=SDPAttention,
                linear_proj=SATRowParallelLinear, q_layernorm=qk_norm, k_layernorm=qk_norm))
    else:
        attention = ModuleSpec(
            module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(
                linear_qkv=ColumnParallelLinear, core_attention=SDPAttention,
                linear_proj=RowParallelLinear, q_layernorm=qk_norm, k_layernorm=qk_norm))
    if "mlp" in sat_config.modules:
        mlp = partial(SATMLP.as_mlp_submodule, sat_config=sat_config, submodules=MLPSubmodules(
            linear_fc1=SATColumnParallelLinear, linear_fc2=SATRowParallelLinear))
    else:
        mlp = partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(
            linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    return ModuleSpec(
        module=SATTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=_LAYER_NORM,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=_LAYER_NORM,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            # the same checkpoint keys as megatron-core's local and TE GPT specs
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            }))


def get_sat_block_spec(sat_config: SATConfig, model_config,
                       vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """The ``TransformerBlock`` submodules of this pipeline stage: its SAT layers and a
    sequence-parallel-capable final norm."""
    layer = get_sat_layer_spec(sat_config, qk_layernorm=model_config.qk_layernorm)
    count = get_num_layers_to_build(model_config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * count, layer_norm=TorchNorm)
