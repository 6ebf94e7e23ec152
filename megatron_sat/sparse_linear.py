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

A layer turns its index into a :class:`KeptSlice`: the kept slice of the weight and the
slice's weight gradient. Both are paid for out of one memory budget: the activations the
layer omits, which a dense layer would keep for its backward (:meth:`KeptSlice._budget`).
The gathered slice, (1 - r) of the weight in the compute dtype, is held from the forward
to the backward where that budget covers it, and gathered again in the backward where not
(at low r: the Llama-2-7B layers at r = 0.1 would otherwise peak above dense). With
``--sat-selection-scope iteration`` one selection serves the N micro-batches of an
iteration (the weights do not change within one), so a held slice serves all of them: one
gather per iteration, released after the N-th backward. Where what is left of the budget
allows, the weight gradient is summed over the micro-batches in a compact fp32 buffer by
the GEMMs themselves (``beta = 1``) and handed to ``main_grad`` once after the N-th
backward; the buffer costs (1 - r) of the layer's weight in fp32 while the iteration runs.

Gradients: :class:`SubsetMatmul` computes the weight gradient of the kept slice only. When
megatron's DDP gives the weight a ``main_grad`` buffer, the slice is added straight into it
(:mod:`megatron_sat.fused_scatter`) and no full-size weight gradient exists; omitted
rows/columns get exactly zero. Without DDP (unit tests, plain torch) a dense ``.grad`` is
returned instead, at every backward. After :func:`attach_to_megatron_ddp`, the first
slice handed to ``main_grad`` in an iteration is written instead of added: megatron's DDP
has just zeroed ``main_grad`` (its ``zero_grad_buffer`` marks the weights
``sat_main_grad_zeroed``), and a dense forward of the layer, whose gradient megatron then
adds, clears the mark. DDP's ``finish_grad_sync`` then checks that no summed slice was
left behind.
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

# KeptSlices holding a summed gradient not yet in main_grad (see attach_to_megatron_ddp)
_UNFLUSHED: set["KeptSlice"] = set()


class KeptSlice:
    """One layer's kept rows (``dim`` 0) or columns (``dim`` 1) ``index`` for one selection,
    serving ``micro_batches`` forward/backward passes (the micro-batches of an iteration
    with ``--sat-selection-scope iteration``, else 1).

    ``weight`` is that slice of the layer's weight (Eq. 9-10 multiply only it), gathered
    at construction. The first forward decides whether it is held until the last backward
    or gathered again for each pass (:meth:`forward_slice`). The slice's weight gradient
    goes to ``main_grad`` either after every backward, or summed in a compact buffer of
    ``main_grad``'s dtype and handed over once after the last: that buffer (kept x other
    x 4 bytes) lives while the later micro-batches run. Held slice and sum are each used
    only where this layer's own omitted activations still pay for them
    (:meth:`_budget`)."""

    def __init__(self, weight: torch.Tensor, index: torch.Tensor, dim: int,
                 micro_batches: int = 1):
        self.index, self.dim, self.micro_batches = index, dim, micro_batches
        self._omitted = weight.shape[dim] - index.numel()
        self.weight: torch.Tensor | None = self.gather(weight)
        self._budget_left: int | None = None  # bytes; set by the first forward
        self._grad: torch.Tensor | None = None
        self._summing = False
        self._backwards = 0
        self._done = False

    @property
    def spent(self) -> bool:
        """Whether all its backward passes ran (its weight slice is released)."""
        return self._done

    def abandon(self) -> None:
        """Release the slice and its sum without handing it over (an abandoned iteration)."""
        self.weight, self._grad, self._done = None, None, True

    def gather(self, weight: torch.Tensor) -> torch.Tensor:
        """The kept rows or columns of ``weight``, copied (no autograd)."""
        with torch.no_grad():
            return weight.index_select(self.dim, self.index)

    def forward_slice(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The slice for a forward of input ``x``. The first forward decides whether the
        slice is held for the backward passes (and later micro-batches): where this
        layer's omitted activations at ``x``'s token count cover it. Otherwise it is
        released after this forward and each later pass gathers its own."""
        kept = self.slice_of(weight)
        if self._budget_left is None:
            budget = self._budget(x.numel() // x.shape[-1], x.element_size())
            holds = budget >= kept.numel() * kept.element_size()
            self._budget_left = budget - (kept.numel() * kept.element_size() if holds else 0)
            if not holds:
                self.weight = None
        return kept

    def slice_of(self, weight: torch.Tensor) -> torch.Tensor:
        """The held slice of ``weight``, or a fresh gather where none is held."""
        return self.weight if self.weight is not None else self.gather(weight)

    def _budget(self, tokens: int, activation_bytes: int) -> int:
        """Bytes of the activations this layer omits in a micro-batch of ``tokens``, which
        a dense layer would keep for its backward: a kept-rows layer's omitted outputs, a
        kept-columns layer's omitted inputs. What SAT holds for this layer beyond them
        would raise its peak above dense's. The slice alone fits where r >= about
        hidden / (tokens + hidden): 0.2 for Llama-2-7B at 16k tokens per micro-batch
        (the last LORS ladder, r = 0.1, gathers again), 0.06 for TinyLlama at 32k."""
        return tokens * self._omitted * activation_bytes

    def add_gradient(self, weight: torch.Tensor, gy_t: torch.Tensor,
                     x: torch.Tensor) -> torch.Tensor | None:
        """The kept slice's gradient ``gy_t @ x`` of full-size ``weight``: into
        ``main_grad`` (megatron DDP; returns None, or a placeholder ``.grad`` with
        ``--overlap-grad-reduce``), or returned as a dense ``.grad`` without it."""
        self._backwards += 1
        last = self._backwards >= self.micro_batches
        if last:
            self.weight, self._done = None, True
        main_grad = getattr(weight, "main_grad", None)
        if main_grad is None:
            return torch.zeros_like(weight).index_add_(self.dim, self.index,
                                                       torch.matmul(gy_t, x))
        if self._backwards == 1:
            self._summing = not last and self._summing_pays(main_grad)
        if self._summing:
            self._add_to_sum(gy_t, x, main_grad.dtype)
            if last:
                self._hand_over(weight, main_grad, self._grad)
                self._grad = None
                _UNFLUSHED.discard(self)
            else:
                _UNFLUSHED.add(self)
        else:
            self._hand_over(weight, main_grad, _product(gy_t, x, main_grad.dtype))
        if hasattr(weight, "grad_added_to_main_grad"):
            weight.grad_added_to_main_grad = True
        if runtime.dummy_wgrad_enabled():
            return torch.empty_like(weight)
        return None

    def _summing_pays(self, main_grad: torch.Tensor) -> bool:
        """Whether the compact sum (kept x other x the sum's bytes) fits in what the held
        slice left of the budget (:meth:`_budget`, set by the first forward). TinyLlama
        at 32k tokens per micro-batch: summed at r >= 0.2, not at r = 0.1."""
        kept_elements = self.index.numel() * main_grad.shape[1 - self.dim]
        return self._budget_left >= kept_elements * main_grad.element_size()

    def _add_to_sum(self, gy_t: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> None:
        """``self._grad += gy_t @ x`` in ``dtype``; on a GPU fp32 accumulation by the GEMM
        (beta = 1): never rounded to bf16, no extra pass."""
        if self._grad is None:
            self._grad = _product(gy_t, x, dtype)
        elif _gemm_result_in(gy_t, x, dtype):
            torch.addmm(self._grad, gy_t, x, out_dtype=dtype, out=self._grad)
        else:
            self._grad.add_(_product(gy_t, x, dtype))

    def _hand_over(self, weight: torch.Tensor, main_grad: torch.Tensor,
                   grad_kept: torch.Tensor) -> None:
        """Into ``main_grad``: written if megatron's DDP zeroed it since anything was added
        (``sat_main_grad_zeroed``), else added."""
        zeroed = getattr(weight, "sat_main_grad_zeroed", False)
        weight.sat_main_grad_zeroed = False
        scatter_kept(main_grad, self.dim, self.index, grad_kept, accumulate=not zeroed)


def _gemm_result_in(gy_t: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the GEMM itself produces (or accumulates into) ``dtype`` from lower-precision
    operands: CUDA's ``out_dtype`` GEMMs, no rounding to bf16 and no cast pass."""
    return gy_t.is_cuda and x.dtype != dtype


def _product(gy_t: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``gy_t @ x`` in ``dtype``; on a GPU a half-precision GEMM with an fp32 result."""
    if _gemm_result_in(gy_t, x, dtype):
        return torch.mm(gy_t, x, out_dtype=dtype)
    return torch.matmul(gy_t, x).to(dtype)


class SubsetMatmul(torch.autograd.Function):
    """y = x @ W_kept^T with W_kept = W.index_select(kept.dim, kept.index).

    dim 0 keeps rows (output neurons), dim 1 keeps columns (input features). W_kept comes
    from ``kept``: held from the forward where the layer's omitted activations pay for it,
    else gathered again in the backward (:meth:`KeptSlice.forward_slice`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, kept: KeptSlice):
        ctx.save_for_backward(x, weight)
        ctx.kept = kept
        return torch.matmul(x, kept.forward_slice(weight, x).t())

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad_y, ctx.kept.slice_of(weight))
        grad_w = None
        if ctx.needs_input_grad[1]:
            gy = grad_y.reshape(-1, grad_y.shape[-1])
            grad_w = ctx.kept.add_gradient(weight, gy.t(), x.reshape(-1, x.shape[-1]))
        return grad_x, grad_w, None


def attach_to_megatron_ddp() -> None:
    """Hook SAT into megatron DDP (idempotent):

    * ``zero_grad_buffer`` (called at the start of every training iteration) marks its
      parameters ``sat_main_grad_zeroed``, so that the first kept slice handed to
      ``main_grad`` in the iteration is written rather than added, and drops the sums of
      an iteration abandoned midway (checked below), so none carries into this one;
    * ``finish_grad_sync`` (before the optimizer step) raises if a kept slice's summed
      gradient never reached ``main_grad``: the iteration ran fewer backward passes than
      the micro-batch count SAT was told (``runtime.set_micro_batches``);
    * ``enable_forward_pre_hook`` (``--overlap-param-gather``): a SAT block reads the
      weights of its ``sat_scored_linears()`` to score neurons before those layers'
      forwards, whose pre-hooks wait for the weights' all-gather; the block's own
      pre-hook now waits for them first.
    """
    from megatron.core.distributed import DistributedDataParallel

    zero, finish = DistributedDataParallel.zero_grad_buffer, \
        DistributedDataParallel.finish_grad_sync
    enable = DistributedDataParallel.enable_forward_pre_hook
    if getattr(zero, "_sat_attached", False):
        return

    def zero_grad_buffer(self):
        zero(self)
        for param in self.module.parameters():
            param.sat_main_grad_zeroed = True
        for kept in _UNFLUSHED:
            kept.abandon()
        _UNFLUSHED.clear()

    def finish_grad_sync(self, *args, **kwargs):
        if _UNFLUSHED:
            counts = sorted({(k._backwards, k.micro_batches) for k in _UNFLUSHED})
            raise RuntimeError(
                f"SAT: kept-slice weight gradients were summed over {counts} (backward "
                "passes, micro-batches expected) and never reached main_grad; the "
                "iteration ran fewer backward passes than its micro-batch count. Report "
                "this with your schedule flags; --sat-selection-scope microbatch avoids "
                "the summation")
        return finish(self, *args, **kwargs)

    def enable_forward_pre_hook(self):
        enable(self)
        wait_for_params = self._make_forward_pre_hook()

        def before_scoring(module, *unused):
            for layer in (module, *module.sat_scored_linears()):
                wait_for_params(layer)

        handles = self.remove_forward_pre_hook_handles
        for module in self.module.modules():
            if hasattr(module, "sat_scored_linears"):
                handles[module].remove()
                handles[module] = module.register_forward_pre_hook(before_scoring)

    zero_grad_buffer._sat_attached = True
    DistributedDataParallel.zero_grad_buffer = zero_grad_buffer
    DistributedDataParallel.finish_grad_sync = finish_grad_sync
    DistributedDataParallel.enable_forward_pre_hook = enable_forward_pre_hook


@contextmanager
def keep(*pairs, reuse: bool = False):
    """``with keep((layer, index), ...)``: the layers compute only ``index`` for this block.

    ``reuse``: one selection serves every micro-batch of the iteration (the same index
    objects, unchanged weights), so each layer keeps its :class:`KeptSlice` until it is
    handed another index object."""
    with ExitStack() as stack:
        for layer, index in pairs:
            layer.kept, layer.reuse_kept = index, reuse
            stack.callback(setattr, layer, "kept", None)
        yield


class _SparseLinear:
    """What the two SAT layers share: their :class:`KeptSlice` for the current ``kept``.
    A forward without grad (the first pass of activation recompute) keeps nothing."""

    kept: torch.Tensor | None = None
    reuse_kept = False
    _slice: KeptSlice | None = None

    def kept_slice(self, dim: int) -> KeptSlice:
        if (self._slice is not None and self._slice.index is self.kept
                and not self._slice.spent):
            return self._slice
        reused = self.reuse_kept and torch.is_grad_enabled()
        kept = KeptSlice(self.weight, self.kept, dim,
                         runtime.micro_batches() if reused else 1)
        self._slice = kept if reused else None
        return kept


class SATColumnParallelLinear(_SparseLinear, ColumnParallelLinear):
    """ColumnParallelLinear that can compute a subset of its local output rows."""

    def forward(self, input_: torch.Tensor, *args, **kwargs):
        if self.kept is None:
            self.weight.sat_main_grad_zeroed = False  # megatron adds this gradient
            return super().forward(input_, *args, **kwargs)
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True,
                                                     group=self.tp_group)
        else:
            x = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        y = SubsetMatmul.apply(x, self.weight, self.kept_slice(0))
        bias = self.bias.index_select(0, self.kept) if self.bias is not None else None
        if bias is not None and not self.skip_bias_add:
            return y + bias, None
        return y, bias


class SATRowParallelLinear(_SparseLinear, RowParallelLinear):
    """RowParallelLinear that can read a subset of its local input columns."""

    def forward(self, input_: torch.Tensor, *args, **kwargs):
        if self.kept is None:
            self.weight.sat_main_grad_zeroed = False  # megatron adds this gradient
            return super().forward(input_, *args, **kwargs)
        y = SubsetMatmul.apply(input_, self.weight, self.kept_slice(1))
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, group=self.tp_group)
        else:
            y = reduce_from_tensor_model_parallel_region(y, group=self.tp_group)
        if self.bias is not None and not self.skip_bias_add:
            return y + self.bias, None
        return y, self.bias
