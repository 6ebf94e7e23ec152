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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
RMS_NORM = F.rms_norm  # F.rms_norm's signature; replaced by torch_fusions.apply


class TorchNorm(torch.nn.Module):
    """``config.normalization`` (RMSNorm or LayerNorm) over the last ``hidden_size`` dims.

    Args:
        config: megatron's ``TransformerConfig``.
        hidden_size: size of the normalised (last) dimension.
        eps: added to the variance for numerical stability.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        if config.normalization not in NORMALIZATIONS:
            raise ValueError(f"--normalization {config.normalization} is not supported by "
                             f"TorchNorm; choose one of: {', '.join(NORMALIZATIONS)}")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("--apply-layernorm-1p (zero-centered gamma) is not supported "
                             "by TorchNorm")
        self.normalization = config.normalization
        self.eps = eps
        self.shape = (hidden_size,)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.bias = (torch.nn.Parameter(torch.zeros(hidden_size))
                     if self.normalization == "LayerNorm" else None)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalization == "LayerNorm":
            return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)
        return RMS_NORM(x, self.shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalization}, {self.shape[0]}, eps={self.eps}"
