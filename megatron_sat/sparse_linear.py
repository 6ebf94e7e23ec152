"""Tensor-parallel linear layers that compute only the kept rows or columns.

This is the one place where a rank's weight shard is sliced for SAT.

* :class:`SATColumnParallelLinear` (``linear_fc1``, ``linear_qkv``): the local weight shard
  is [out_local, in]; SAT keeps a subset of its *rows* (output neurons).
* :class:`SATRowParallelLinear` (``linear_fc2``, ``linear_proj``): the local shard is
  [out, in_local]; SAT keeps the *columns* that read the kept neurons.

Both are megatron-core's own layers (same parameters, sharding and checkpoints) and behave
exactly like them unless the owning SAT block sets ``kept`` for one forward with
:func:`keep`. Indices are local to the rank, so no index crosses ranks; the only
communication is megatron's usual one (all-reduce, or all-gather/reduce-scatter with
sequence parallelism), on tensors that are already narrower.

Gradients: :class:`SubsetMatmul` computes the weight gradient of the kept slice only. When
megatron's DDP gives the weight a ``main_grad`` buffer, the slice is added straight into it
(:mod:`megatron_sat.fused_scatter`) and no full-size weight gradient exists; omitted
rows/columns get exactly zero. Without DDP (unit tests, plain torch) a dense ``.grad`` is
returned instead. After :func:`track_zeroed_main_grads`, the first micro-batch of an
iteration writes the slice instead of adding it: megatron's DDP has just zeroed
``main_grad`` (its ``zero_grad_buffer`` marks the weights ``sat_main_grad_zeroed``), and a
dense forward of the layer, whose gradient megatron then adds, clears the mark.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region,
                                                    reduce_from_tensor_model_parallel_region,
                                                    reduce_scatter_to_sequence_parallel_region)

from megatron_sat import runtime
from megatron_sat.fused_scatter import scatter_kept


class SubsetMatmul(torch.autograd.Function):
    """y = x @ W_kept^T with W_kept = W.index_select(dim, index).

    dim 0 keeps rows (output neurons), dim 1 keeps columns (input features). The gathered
    W_kept is saved for the backward pass rather than gathered again: it is (1 - r) of the
    layer's weight in the compute dtype, small next to the layer's saved activations.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, dim: int):
        kept = weight.index_select(dim, index)
        ctx.save_for_backward(x, weight, index, kept)
        ctx.dim = dim
        return torch.matmul(x, kept.t())

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, index, kept = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad_y, kept)
        grad_w = None
        if ctx.needs_input_grad[1]:
            gy = grad_y.reshape(-1, grad_y.shape[-1])
            grad_w = _accumulate_weight_grad(weight, ctx.dim, index, gy.t(),
                                             x.reshape(-1, x.shape[-1]))
        return grad_x, grad_w, None, None


def _accumulate_weight_grad(weight, dim, index, gy_t, x):
    """Add the kept slice's weight gradient ``gy_t @ x`` into ``weight.main_grad`` (fp32,
    megatron DDP), or return a dense ``.grad`` holding it when there is no ``main_grad``."""
    main_grad = getattr(weight, "main_grad", None)
    if main_grad is None:
        return torch.zeros_like(weight).index_add_(dim, index, torch.matmul(gy_t, x))
    if main_grad.is_cuda and x.dtype != main_grad.dtype:
        # a half-precision GEMM with an fp32 result: no rounding to bf16, no cast pass
        grad_kept = torch.mm(gy_t, x, out_dtype=main_grad.dtype)
    else:
        grad_kept = torch.matmul(gy_t, x).to(main_grad.dtype)
    zeroed = getattr(weight, "sat_main_grad_zeroed", False)
    weight.sat_main_grad_zeroed = False
    scatter_kept(main_grad, dim, index, grad_kept, accumulate=not zeroed)
    if hasattr(weight, "grad_added_to_main_grad"):
        weight.grad_added_to_main_grad = True
    if runtime.dummy_wgrad_enabled():
        return torch.empty_like(weight)
    return None


def track_zeroed_main_grads() -> None:
    """Make megatron DDP's ``zero_grad_buffer`` (called at the start of every training
    iteration) mark its parameters ``sat_main_grad_zeroed``, so that the first kept-slice
    gradient of the iteration is written rather than added. Idempotent."""
    from megatron.core.distributed import DistributedDataParallel

    zero = DistributedDataParallel.zero_grad_buffer
    if getattr(zero, "_sat_marks_zeroed", False):
        return

    def zero_grad_buffer(self):
        zero(self)
        for param in self.module.parameters():
            param.sat_main_grad_zeroed = True

    zero_grad_buffer._sat_marks_zeroed = True
    DistributedDataParallel.zero_grad_buffer = zero_grad_buffer


@contextmanager
def keep(*pairs):
    """``with keep((layer, index), ...)``: the layers compute only ``index`` for this block."""
    with ExitStack() as stack:
        for layer, index in pairs:
            layer.kept = index
            stack.callback(setattr, layer, "kept", None)
        yield


class SATColumnParallelLinear(ColumnParallelLinear):
    """ColumnParallelLinear that can compute a subset of its local output rows."""

    kept: torch.Tensor | None = None

    def forward(self, input_: torch.Tensor, *args, **kwargs):
        if self.kept is None:
            self.weight.sat_main_grad_zeroed = False  # megatron adds this gradient
            return super().forward(input_, *args, **kwargs)
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True,
                                                     group=self.tp_group)
        else:
            x = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        y = SubsetMatmul.apply(x, self.weight, self.kept, 0)
        bias = self.bias.index_select(0, self.kept) if self.bias is not None else None
        if bias is not None and not self.skip_bias_add:
            return y + bias, None
        return y, bias


class SATRowParallelLinear(RowParallelLinear):
    """RowParallelLinear that can read a subset of its local input columns."""

    kept: torch.Tensor | None = None

    def forward(self, input_: torch.Tensor, *args, **kwargs):
        if self.kept is None:
            self.weight.sat_main_grad_zeroed = False  # megatron adds this gradient
            return super().forward(input_, *args, **kwargs)
        y = SubsetMatmul.apply(input_, self.weight, self.kept, 1)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, group=self.tp_group)
        else:
            y = reduce_from_tensor_model_parallel_region(y, group=self.tp_group)
        if self.bias is not None and not self.skip_bias_add:
            return y + self.bias, None
        return y, self.bias
