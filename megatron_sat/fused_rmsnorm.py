"""RMSNorm forward and backward in Triton, with the weight gradient in the same pass.

y = x / sqrt(mean(x^2) + eps) * w over the hidden dimension. Every transformer layer runs
two of these and none shrinks with SAT's omission rate. torch's CUDA kernels already read
and write each tensor once in the forward, but its backward runs two kernels that each
read x and dy: the input gradient, then a column reduction for the weight gradient
(TinyLlama at 16 x 2048 tokens on an H100: 14 + 12.6 ms of a 940 ms step).

Here one backward kernel does both. Each program takes a contiguous run of rows; per row
it recomputes x_hat = x * rstd (rstd, one fp32 value per row, is kept from the forward) and
writes

    dx = rstd * (w dy - x_hat * mean(x_hat * w dy))

while it accumulates dy * x_hat over its rows in fp32 registers. The per-program partial
sums (a few hundred rows of the hidden size) are then added up by one small ``sum``.
Arithmetic is fp32 with one rounding of each output.

:func:`rms_norm` has ``torch.nn.functional.rms_norm``'s arguments and uses the kernels for
contiguous CUDA inputs whose weight has the input's dtype (``torch_fusions.apply`` makes
:class:`~megatron_sat.norm.TorchNorm` call it); anything else goes to torch.
:func:`rms_norm_with_residual` also returns x, whose gradient -- the residual stream's --
the backward kernel adds to dx in the same pass (see :mod:`megatron_sat.norm`).

**The token mean of y** (``token_mean=True``): maxip (Eq. 5) scores a SAT block's neurons
with the mean of its input over the tokens, and that input is this norm's output. The
forward then gives each program a run of rows (16 programs per SM, two rows per step),
adding up the rows of y as stored, over the row count, in fp32 registers; torch adds the
per-program sums and the mean is rounded once to y's dtype. That saves the SAT block a
second read of y (a GEMV, 2.4 ms of the TinyLlama step at micro-batch 16 on an H100).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_HIDDEN = 16384  # the widest row the kernels take; wider rows go to torch
BACKWARD_PROGRAMS_PER_SM = 4  # each over a run of rows, enough to hide memory latency
# the forward with the token mean: programs per SM, each over a run of rows
# (benchmarks/bench_kernels.py --cases statistic). Its warps stay the plain forward's: the
# row's sum of squares is then reduced in the same order, so y is bitwise the plain norm's
# (an activation recompute or a later micro-batch runs the plain one on the same input)
TOKEN_MEAN_PROGRAMS_PER_SM = 16
# rows the forward normalises per step, as one tile, in both variants (a row's place in
# the tile is then the same in each, and so is the order of its sum of squares). Two rows
# per step give the token-mean forward two loads in flight. On an H100 at 32k rows
# (bench_kernels.py --cases statistic --hidden N), one row -> two rows per step:
#   hidden 2048: token mean 0.129 -> 0.113 ms, plain 0.090 -> 0.091 ms
#   hidden 4096: token mean 0.263 -> 0.222 ms, plain 0.184 -> 0.191 ms
#   hidden 8192: token mean 0.565 -> 0.461 ms, plain 0.355 -> 0.408 ms
# The plain forward runs far more often (dense iterations, the micro-batches that reuse a
# selection, the final norm), so a tile holds at most FORWARD_TILE_VALUES values: two rows
# up to hidden 4096, one row above.
FORWARD_ROWS = 2
FORWARD_TILE_VALUES = 8192


@triton.jit
def _rms_norm_forward(x_ptr, w_ptr, y_ptr, rstd_ptr, sums_ptr, rows, n, eps, sum_scale,
                      rows_per_program, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                      COLUMN_SUMS: tl.constexpr):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)[None, :]
    in_row = cols < n
    w = tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    sums = tl.zeros([BLOCK], dtype=tl.float32)
    first = program.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program, ROWS):  # a tile of ROWS rows per step
        row = first + i + tl.arange(0, ROWS)[:, None]
        mask = in_row & (row < rows)
        x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n + eps)[:, None]
        y = (x * rstd * w).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + row * n + cols, y, mask=mask)
        tl.store(rstd_ptr + row, rstd, mask=row < rows)
        if COLUMN_SUMS:  # of y as stored (rounded), as a reduction over y itself would see
            sums += tl.sum(tl.where(mask, y.to(tl.float32) * sum_scale, 0.0), axis=0)
    if COLUMN_SUMS:
        tl.store(sums_ptr + program * n + cols, sums[None, :], mask=in_row)


@triton.jit
def _rms_norm_backward(dy_ptr, x_ptr, w_ptr, rstd_ptr, dr_ptr, dx_ptr, dw_partial_ptr, rows,
                       n, rows_per_program, BLOCK: tl.constexpr, HAS_DR: tl.constexpr):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    in_row = cols < n
    w = tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    first = program.to(tl.int64) * rows_per_program
    for i in range(rows_per_program):
        row = first + i
        mask = in_row & (row < rows)
        x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row < rows, other=0.0)
        x_hat = x * rstd
        w_dy = w * dy
        dx = rstd * (w_dy - x_hat * (tl.sum(x_hat * w_dy, axis=0) / n))
        if HAS_DR:  # the residual stream's gradient (rms_norm_with_residual)
            dx += tl.load(dr_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * n + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(dw_partial_ptr + program * n + cols, dw, mask=in_row)


def _block(n: int) -> int:
    return triton.next_power_of_2(n)


def _warps(n: int) -> int:
    return min(16, max(1, _block(n) // 256))


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (Triton's interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _forward_tile(n: int) -> int:
    """Rows per forward step for rows of ``n``: ``FORWARD_ROWS``, as many as fit in
    ``FORWARD_TILE_VALUES`` values, at least one."""
    return max(1, min(FORWARD_ROWS, FORWARD_TILE_VALUES // _block(n)))


def _row_runs(rows: int, programs_per_sm: int, device: torch.device,
              multiple: int = 1) -> tuple[int, int]:
    """(rows per program, programs) for kernels whose programs each take a run of rows
    (a multiple of ``multiple`` rows)."""
    rows_per_program = triton.cdiv(rows, min(rows, programs_per_sm * _sm_count(device)))
    rows_per_program = triton.cdiv(rows_per_program, multiple) * multiple
    return rows_per_program, triton.cdiv(rows, rows_per_program)


def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float, token_mean: bool):
    """y, the per-row rstd, and (``token_mean``) the mean of y over the rows, else None."""
    n = x.shape[-1]
    rows = x.numel() // n
    y = torch.empty_like(x)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    # one tile of rows per program; with the column sums each program takes a
    # run of tiles, and there are enough programs (16 per SM) to hide the memory latency
    # without atomics: the partial sums, a few thousand rows of n, are then added up by torch
    tile = _forward_tile(n)
    rows_per_program, programs = (_row_runs(rows, TOKEN_MEAN_PROGRAMS_PER_SM, x.device, tile)
                                  if token_mean else (tile, triton.cdiv(rows, tile)))
    sums = (torch.empty(programs, n, device=x.device, dtype=torch.float32) if token_mean
            else rstd)
    _rms_norm_forward[(programs,)](x, weight, y, rstd, sums, rows, n, eps, 1.0 / rows,
                                   rows_per_program, BLOCK=_block(n), ROWS=tile,
                                   COLUMN_SUMS=token_mean, num_warps=_warps(n))
    if not token_mean:
        return y, rstd, None
    return y, rstd, sums.sum(0).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd, _ = _forward(x, weight, eps, token_mean=False)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy, dr=None):
        x, weight, rstd = ctx.saved_tensors
        n = x.shape[-1]
        rows = rstd.numel()
        dy = dy.contiguous()
        if dr is not None:
            dr = dr.contiguous()
        rows_per_program, programs = _row_runs(rows, BACKWARD_PROGRAMS_PER_SM, x.device)
        dx = torch.empty_like(x)
        dw_partial = torch.empty(programs, n, device=x.device, dtype=torch.float32)
        _rms_norm_backward[(programs,)](dy, x, weight, rstd, dy if dr is None else dr, dx,
                                        dw_partial, rows, n, rows_per_program,
                                        BLOCK=_block(n), HAS_DR=dr is not None,
                                        num_warps=_warps(n))
        return dx, dw_partial.sum(0).to(weight.dtype), None


class _RMSNormWithResidual(_RMSNorm):
    """(y, x, token mean or None): the second output is x itself, so its gradient (the
    residual stream's) arrives in this backward and is added in the same pass."""

    @staticmethod
    def forward(ctx, x, weight, eps, token_mean):
        y, rstd, mean = _forward(x, weight, eps, token_mean)
        ctx.save_for_backward(x, weight, rstd)
        if mean is not None:
            ctx.mark_non_differentiable(mean)
        return y, x.view_as(x), mean

    @staticmethod
    def backward(ctx, dy, dr, dmean):
        return *_RMSNorm.backward(ctx, dy, dr), None


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The kernels, for any device Triton runs on (CUDA, or its CPU interpreter)."""
    return _RMSNorm.apply(x, weight, eps)


def fused_rms_norm_with_residual(x: torch.Tensor, weight: torch.Tensor, eps: float,
                                 token_mean: bool = False):
    """(y, x), the kernels adding x's gradient into the backward's dx; with ``token_mean``
    (y, x, mean of y over its rows, in y's dtype, computed in the forward's pass)."""
    y, residual, mean = _RMSNormWithResidual.apply(x, weight, eps, token_mean)
    return (y, residual, mean) if token_mean else (y, residual)


def _kernels_apply(x, normalized_shape, weight, eps) -> bool:
    """A contiguous CUDA ``x`` normalised over its last dimension (at most ``MAX_HIDDEN``),
    a weight of its dtype, a given eps."""
    return (x.is_cuda and x.is_contiguous() and weight is not None and eps is not None
            and weight.dtype == x.dtype and len(normalized_shape) == 1
            and normalized_shape[0] == x.shape[-1] <= MAX_HIDDEN and x.numel() > 0)


def rms_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
             eps: float | None = None) -> torch.Tensor:
    """``F.rms_norm`` on the kernels where they apply, torch's otherwise."""
    if _kernels_apply(x, normalized_shape, weight, eps):
        return fused_rms_norm(x, weight, eps)
    return F.rms_norm(x, normalized_shape, weight, eps)


def rms_norm_with_residual(x: torch.Tensor, normalized_shape, weight: torch.Tensor,
                           eps: float, token_mean: bool = False):
    """``(y, x)`` on the kernels where they apply, ``(y, x, token mean)`` with
    ``token_mean``; elsewhere torch's ``y`` alone (megatron then takes x as the residual and
    autograd adds the two gradients, as without it; a SAT block computes its own mean)."""
    if _kernels_apply(x, normalized_shape, weight, eps):
        return fused_rms_norm_with_residual(x, weight, eps, token_mean)
    return F.rms_norm(x, normalized_shape, weight, eps)
