"""A plain-torch RMSNorm/LayerNorm for megatron layer specs, sequence-parallel capable.

Megatron-core's Transformer-Engine-free fallback, ``WrappedTorchNorm``, refuses
``--sequence-parallel``. With sequence parallelism every tensor-parallel rank normalises a
different slice of the sequence, so the norm weight gets a partial gradient on each rank.
Megatron all-reduces such gradients over the tensor-parallel group for parameters tagged
``.sequence_parallel = True`` (``finalize_model_grads``); :class:`TorchNorm` tags its own.
Its parameters are named like torch's norms (``weight``, ``bias``), so checkpoints match
those of ``WrappedTorchNorm``.

RMSNorm calls :data:`RMS_NORM`, torch's ``F.rms_norm``, which ``torch_fusions.apply``
points at the Triton kernels of :mod:`megatron_sat.fused_rmsnorm` on a GPU.

**The residual stream's gradient.** In a pre-norm layer the stream h feeds the norm and,
as the residual, the add after the attention or MLP. Its gradient is therefore the sum of
two: autograd adds them with one elementwise pass over the hidden states for each of a
layer's two norms (88 adds, 11.4 ms of the TinyLlama step at micro-batch 16 on an H100,
docs/performance.md). megatron-core's ``TransformerLayer`` accepts a norm that returns
``(output, residual)`` and then adds that residual instead of h. A layer norm built with
``residual_output=True`` (the SAT layer spec's two) returns ``(rms_norm(h), h)`` from one
autograd function when :data:`RMS_NORM_WITH_RESIDUAL` is set (by ``torch_fusions.apply``),
so both gradients arrive in its backward, which adds them: in the Triton kernel's pass on
a GPU (one read of the residual gradient instead of an add's three tensors; where the
kernels do not apply, the output alone), with torch off the GPU
(:func:`rms_norm_with_residual`, the reference, which CPU runs and tests take). Unset, or
without grad, the norm returns its output alone, as before.

**The token mean for maxip.** A layer's norm feeds a SAT block (the attention after the
input norm, the MLP after the pre-MLP norm) that scores by maxip (Eq. 5) with the mean of
the norm's output over the tokens. :class:`~megatron_sat.spec.SATTransformerLayer` makes
that block the norm's ``token_mean_sink``; when the block wants the mean for its next
forward, the norm asks :data:`RMS_NORM_WITH_RESIDUAL` for it (the Triton forward adds it up
in its own pass; :func:`rms_norm_with_residual` takes torch's mean) and offers it to the
block together with the output it belongs to. Where neither hook runs, the block computes
the mean itself.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
RMS_NORM = F.rms_norm  # F.rms_norm's signature; replaced by torch_fusions.apply
# rms_norm_with_residual's signature, returning (output, residual) or the output alone;
# set by torch_fusions.apply
RMS_NORM_WITH_RESIDUAL = None


class TokenMeanSink(Protocol):
    """A SAT block that scores with the token mean of this norm's output
    (:class:`~megatron_sat.block.SparseBlock`)."""

    def wants_token_mean(self, training: bool) -> bool: ...

    def offer_token_mean(self, output: torch.Tensor, mean: torch.Tensor) -> None: ...


class _RMSNormWithResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return F.rms_norm(x, x.shape[-1:], weight, eps), x.view_as(x)

    @staticmethod
    def backward(ctx, dy, dr):
        x, weight = ctx.saved_tensors
        with torch.enable_grad():
            x_, w_ = x.detach().requires_grad_(), weight.detach().requires_grad_()
            dx, dw = torch.autograd.grad(F.rms_norm(x_, x.shape[-1:], w_, ctx.eps), (x_, w_),
                                         dy)
        return (dx if dr is None else dx + dr), dw, None


def rms_norm_with_residual(x: torch.Tensor, normalized_shape, weight: torch.Tensor,
                           eps: float, token_mean: bool = False):
    """``(F.rms_norm(x, ...), x)`` as one autograd function: x's gradient is the norm's
    input gradient plus the second output's (the residual stream's). ``token_mean``: also
    the output's mean over all leading dimensions (fp32, torch's column mean)."""
    if tuple(normalized_shape) != tuple(x.shape[-1:]):
        raise ValueError(f"rms_norm_with_residual normalises the last dimension "
                         f"({x.shape[-1]}), not {tuple(normalized_shape)}")
    y, residual = _RMSNormWithResidual.apply(x, weight, eps)
    if not token_mean:
        return y, residual
    return y, residual, torch.mean(y.detach().reshape(-1, x.shape[-1]), dim=0,
                                   dtype=torch.float32)


class TorchNorm(torch.nn.Module):
    """``config.normalization`` (RMSNorm or LayerNorm) over the last ``hidden_size`` dims.

    Args:
        config: megatron's ``TransformerConfig``.
        hidden_size: size of the normalised (last) dimension.
        eps: added to the variance for numerical stability.
        residual_output: a layer's input or pre-MLP norm, whose input is also the layer's
            residual: return ``(output, residual)`` (see the module docstring).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5,
                 residual_output: bool = False):
        super().__init__()
        if config.normalization not in NORMALIZATIONS:
            raise ValueError(f"--normalization {config.normalization} is not supported by "
                             f"TorchNorm; choose one of: {', '.join(NORMALIZATIONS)}")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("--apply-layernorm-1p (zero-centered gamma) is not supported "
                             "by TorchNorm")
        self.normalization = config.normalization
        self.eps = eps
        # megatron recomputes a norm selected in --recompute-modules through a checkpoint
        # that expects one output tensor
        recomputed = (config.recompute_modules or []
                      if config.recompute_granularity == "selective" else [])
        self.residual_output = residual_output and "layernorm" not in recomputed
        self.shape = (hidden_size,)
        self.token_mean_sink: TokenMeanSink | None = None  # set by SATTransformerLayer
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.bias = (torch.nn.Parameter(torch.zeros(hidden_size))
                     if self.normalization == "LayerNorm" else None)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor):
        if self.normalization == "LayerNorm":
            return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)
        if (self.residual_output and RMS_NORM_WITH_RESIDUAL is not None
                and torch.is_grad_enabled() and x.requires_grad):
            sink = self.token_mean_sink
            if sink is None or not sink.wants_token_mean(self.training):
                return RMS_NORM_WITH_RESIDUAL(x, self.shape, self.weight, self.eps)
            out = RMS_NORM_WITH_RESIDUAL(x, self.shape, self.weight, self.eps, token_mean=True)
            if isinstance(out, tuple):
                y, residual, mean = out
                sink.offer_token_mean(y, mean)
                return y, residual
            return out
        return RMS_NORM(x, self.shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalization}, {self.shape[0]}, eps={self.eps}"
