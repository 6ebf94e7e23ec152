"""SwiGLU kernels whose width is a runtime argument (Triton), for the sparse MLP (Eq. 10).

megatron-core's fused SwiGLU is ``torch.compile``d: silu(y_1) * y_2 over the halves
[gate; up] of its input's last dimension. Every LORS ladder changes the kept MLP width,
and a compiled kernel is either static (one compilation per width, 1-2 s on an H100, in
the middle of training; megatron_fixes fix 3) or dynamic (one compilation, but it must
divide by the width to find the halves and ran several times slower). These kernels take
the width as an argument: each program handles one row and a block of columns, so the
halves are plain offsets and loads stay vectorised, and Triton compiles once for every
width that is a multiple of 16 (``--sat-channel-multiple`` keeps them multiples of 64).
Arithmetic is in fp32 with one rounding of the result, as in the compiled kernels.

:func:`install` points megatron's ``fused_bias_swiglu.swiglu`` / ``swiglu_back`` at them
(``torch_fusions.apply`` does it on CUDA when Triton is importable); other inputs (CPU,
non-contiguous) go to megatron's own functions.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _swiglu_forward(x_ptr, y_ptr, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    x_row = x_ptr + row * 2 * width
    gate = tl.load(x_row + cols, mask=mask).to(tl.float32)
    up = tl.load(x_row + width + cols, mask=mask).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(y_ptr + row * width + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward(dy_ptr, x_ptr, dx_ptr, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    x_row = x_ptr + row * 2 * width
    dx_row = dx_ptr + row * 2 * width
    gate = tl.load(x_row + cols, mask=mask).to(tl.float32)
    up = tl.load(x_row + width + cols, mask=mask).to(tl.float32)
    dy = tl.load(dy_ptr + row * width + cols, mask=mask).to(tl.float32)
    sig = tl.sigmoid(gate)
    d_gate = dy * sig * (1 + gate * (1 - sig)) * up
    d_up = dy * gate * sig
    tl.store(dx_row + cols, d_gate.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_row + width + cols, d_up.to(dx_ptr.dtype.element_ty), mask=mask)


def _grid(rows: int, width: int) -> tuple[int, int]:
    return rows, triton.cdiv(width, BLOCK)


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """silu(y_1) * y_2 for the halves of ``y``'s last dim ([..., 2k] -> [..., k])."""
    width = y.shape[-1] // 2
    out = y.new_empty(*y.shape[:-1], width)
    _swiglu_forward[_grid(y.numel() // (2 * width), width)](y, out, width, BLOCK=BLOCK)
    return out


def swiglu_back(grad: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`swiglu` with respect to ``y``, given the output gradient."""
    width = y.shape[-1] // 2
    dx = torch.empty_like(y)
    _swiglu_backward[_grid(y.numel() // (2 * width), width)](grad, y, dx, width, BLOCK=BLOCK)
    return dx


def _with_fallback(kernel_fn, megatron_fn):
    @functools.wraps(kernel_fn)
    def fn(*tensors):
        if all(t.is_cuda and t.is_contiguous() for t in tensors):
            return kernel_fn(*tensors)
        return megatron_fn(*tensors)

    return fn


def install() -> None:
    """Make megatron's bias-free fused SwiGLU use these kernels for CUDA inputs."""
    import megatron.core.fusions.fused_bias_swiglu as fused

    fused.swiglu = _with_fallback(swiglu, fused.swiglu)
    fused.swiglu_back = _with_fallback(swiglu_back, fused.swiglu_back)
