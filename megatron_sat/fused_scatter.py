"""The kept rows' weight gradient into megatron's fp32 ``main_grad`` (the backward of
Eq. 9-10), as one Triton kernel on a GPU.

:class:`~megatron_sat.sparse_linear.SubsetMatmul` computes the weight gradient of the kept
rows (``linear_fc1``, ``linear_qkv``) or columns (``linear_fc2``, ``linear_proj``) only, as
one GEMM with an fp32 result, and puts it at the kept positions of ``main_grad``:

* ``main_grad[index] += grad_kept`` (dim 0) or ``main_grad[:, index] += grad_kept`` (dim 1);
* or, when nothing has been added to ``main_grad`` since megatron zeroed it (the first
  micro-batch of an iteration), ``=`` instead of ``+=``: no read of ``main_grad``.

torch's ``index_add_`` does this with one atomic add per element and the index arithmetic
of an N-dimensional tensor per element. For kept rows, the kernel here moves 2D tiles of
4 kept rows x 1024 contiguous columns with plain loads and stores: on an H100 it adds
Llama-2-7B's kept fc1 gradient in 0.189 ms where ``index_add_`` takes 0.326 ms, and
writes it in 0.128 ms (``index_copy_``: 0.166 ms; docs/performance.md, session 9). For
kept columns each row's elements are scattered, and the same kind of kernel was slower
than torch's (0.233 against 0.209 ms adding, 0.348 against 0.183 ms writing), so columns
stay with torch's ``index_add_`` / ``index_copy_``. ``index`` must hold distinct positions
(a selection does), so no two programs write one element.
"""

from __future__ import annotations

import torch

try:  # optional: torch's operations everywhere without Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

BLOCK_ROWS, BLOCK_COLUMNS = 4, 1024  # a tile: 16 KB of fp32 gradient


if triton is not None:
    @triton.jit
    def _scatter_rows_kernel(src_ptr, index_ptr, dst_ptr, n_kept, n_columns, dst_stride,
                             ACCUMULATE: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                             BLOCK_COLUMNS: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        columns = tl.program_id(1).to(tl.int64) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
        target = tl.load(index_ptr + rows, mask=rows < n_kept, other=0).to(tl.int64)
        mask = (rows < n_kept)[:, None] & (columns < n_columns)[None, :]
        dst = dst_ptr + target[:, None] * dst_stride + columns[None, :]
        value = tl.load(src_ptr + rows[:, None] * n_columns + columns[None, :],
                        mask=mask).to(tl.float32)
        if ACCUMULATE:
            value += tl.load(dst, mask=mask).to(tl.float32)
        tl.store(dst, value.to(dst_ptr.dtype.element_ty), mask=mask)


def scatter_kept(main_grad: torch.Tensor, dim: int, index: torch.Tensor,
                 grad_kept: torch.Tensor, accumulate: bool = True) -> None:
    """``main_grad.index_add_(dim, index, grad_kept)``, or ``index_copy_`` when not
    ``accumulate``; ``index`` holds distinct positions along ``dim`` of the 2D
    ``main_grad``. Kept rows of CUDA tensors of one dtype go to the kernel."""
    if (dim == 0 and triton is not None and main_grad.is_cuda
            and grad_kept.dtype == main_grad.dtype):
        triton_scatter_rows(main_grad, index, grad_kept, accumulate)
    elif accumulate:
        main_grad.index_add_(dim, index, grad_kept)
    else:
        main_grad.index_copy_(dim, index, grad_kept)


def triton_scatter_rows(main_grad: torch.Tensor, index: torch.Tensor,
                        grad_kept: torch.Tensor, accumulate: bool) -> None:
    """The kernel (on any device under ``TRITON_INTERPRET=1``): ``main_grad[index] (+)=
    grad_kept``."""
    if main_grad.dim() != 2 or main_grad.stride(1) != 1:
        raise ValueError("main_grad must be 2D with contiguous rows")
    grad_kept, index = grad_kept.contiguous(), index.contiguous()
    n_kept, n_columns = grad_kept.shape
    if index.shape != (n_kept,) or n_columns != main_grad.shape[1]:
        raise ValueError(f"index {tuple(index.shape)} and grad_kept {tuple(grad_kept.shape)} "
                         f"do not match main_grad {tuple(main_grad.shape)}")
    grid = (triton.cdiv(n_kept, BLOCK_ROWS), triton.cdiv(n_columns, BLOCK_COLUMNS))
    _scatter_rows_kernel[grid](grad_kept, index, main_grad, n_kept, n_columns,
                               main_grad.stride(0), ACCUMULATE=accumulate,
                               BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLUMNS=BLOCK_COLUMNS, num_warps=4)
