"""Selection (paper Eq. 6-8) as one Triton kernel per block, on a GPU.

What :mod:`megatron_sat.selection` and :mod:`megatron_sat.attention` do in a dozen small
torch operations per block -- rescale the scores, add Gumbel noise, take the top k of every
row, sort the kept indices, and turn them into the layers' row/column index lists -- runs
here as one launch that reads the Eq. 5 scores and writes the index lists:

* :func:`select`: the k largest keys of every row of ``scores`` [rows, n], as ascending
  indices (the sparse MLP's channels; with ``shift``, also its fc1 rows [gate; up]).
* :func:`select_heads`: Eq. 6-7 (head scores from the fused-QKV row scores) and Eq. 8 for
  attention, in ``heads`` or ``groups`` mode, writing the kept ``linear_qkv`` rows and
  ``linear_proj`` columns.

Selection's kernels are tiny; on a GPU it cost the launches (about 25 per block) and the
host time to issue them, which made the SAT forward host-bound (docs/performance.md).

Same keys, same rule as the torch path: key = rescale(s) / tau + G (``sampling``) or
key = s (``topk``), and the k largest keys are kept, ties going to the lower index (-0.0
equals +0.0). A NaN key of either sign counts as the largest here (torch's sort agrees on
CPU; on a GPU it puts a negative NaN last). The noise differs: G = -log(-log U) with U from Philox
(``tl.rand``, 31-bit uniforms) keyed by the draw's seed and the neuron's position, where
the torch path draws ``exponential_`` from a torch generator; both are standard Gumbel
noise to float precision, so the selection has the same distribution, but the two paths
pick different neurons for one seed. A run is reproducible (and resumes identically) on
either path.

The k-th largest key of a row is found by a bitwise search over the keys' order-preserving
integer images (32 counting passes over the row, no sort); the kept positions are then
compacted with a prefix sum, which yields them in ascending order.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from megatron_sat.selection import check

SCALES = {"raw": 0, "standard": 1, "minmax": 2}
MAX_BLOCK = 16384  # most scores one program handles (the largest tested); more: torch path


@triton.jit
def _rescale(s, valid, count, SCALE: tl.constexpr):
    """``selection.rescale`` over the valid elements of a 2D block."""
    if SCALE == 1:
        mean = tl.sum(tl.sum(tl.where(valid, s, 0.0), axis=1), axis=0) / count
        dev = tl.where(valid, s - mean, 0.0)
        std = tl.sqrt(tl.sum(tl.sum(dev * dev, axis=1), axis=0) / count)
        s = (s - mean) / tl.maximum(std, 1e-12)
    elif SCALE == 2:
        low = tl.min(tl.min(tl.where(valid, s, float("inf")), axis=1), axis=0)
        high = tl.max(tl.max(tl.where(valid, s, float("-inf")), axis=1), axis=0)
        s = (s - low) / tl.maximum(high - low, 1e-12)
    return s


@triton.jit
def _keys(s, valid, noise_offsets, count, tau, seed, SCALE: tl.constexpr,
          SAMPLING: tl.constexpr):
    """Eq. 8's keys: rescale(s) / tau + Gumbel noise (sampling), or s itself (top-k)."""
    if SAMPLING:
        u = tl.rand(seed, noise_offsets)
        s = _rescale(s, valid, count, SCALE) / tau - tl.log(-tl.log(u))
    return s


@triton.jit
def _top_k(keys, valid, k):
    """Mask of the k largest keys in every row of a 2D block; ties keep the lower index."""
    keys = tl.where(keys == 0.0, 0.0, keys)  # -0.0 is +0.0
    keys = tl.where(keys != keys, float("nan"), keys)  # one NaN, above every number
    bits = keys.to(tl.int32, bitcast=True)
    order = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # int order == float order
    # t = the k-th largest order of the row, decided bit by bit from the sign down
    nonneg = tl.sum((valid & (order >= 0)).to(tl.int32), axis=1)
    t = tl.where(nonneg >= k, 0, -2147483648)
    for b in range(30, -1, -1):
        cand = t | (1 << b)
        count = tl.sum((valid & (order >= cand[:, None])).to(tl.int32), axis=1)
        t = tl.where(count >= k, cand, t)
    above = valid & (order > t[:, None])
    tie = valid & (order == t[:, None])
    need = k - tl.sum(above.to(tl.int32), axis=1)
    return above | (tie & (tl.cumsum(tie.to(tl.int32), axis=1) <= need[:, None]))


@triton.jit
def _rank(keep):
    """Position of every kept element among its row's kept elements."""
    return tl.cumsum(keep.to(tl.int32), axis=1) - 1


# Triton specialises integer arguments on their type (i32 / i64) and divisibility by 16: a
# fresh seed every draw must not select (and compile) another variant mid-training.
@triton.jit(do_not_specialize=["seed"])
def _select_kernel(scores_ptr, out_ptr, rows, n, k, tau, seed: tl.int64, shift,
                   SCALE: tl.constexpr, SAMPLING: tl.constexpr, SHIFTED: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    r = tl.arange(0, BLOCK_R)[:, None]
    c = tl.arange(0, BLOCK_N)[None, :]
    valid = (r < rows) & (c < n)
    s = tl.load(scores_ptr + r * n + c, mask=valid, other=0.0).to(tl.float32)
    keep = _top_k(_keys(s, valid, r * n + c, rows * n, tau, seed, SCALE, SAMPLING), valid, k)
    width = 2 * k if SHIFTED else k
    dst = out_ptr + r * width + _rank(keep)
    tl.store(dst, c.to(tl.int64), mask=keep)
    if SHIFTED:
        tl.store(dst + k, (c + shift).to(tl.int64), mask=keep)


@triton.jit(do_not_specialize=["seed"])
def _head_select_kernel(scores_ptr, qkv_ptr, proj_ptr, groups, k, tau, seed: tl.int64,
                        Q: tl.constexpr, HD: tl.constexpr, BY_GROUPS: tl.constexpr,
                        SCALE: tl.constexpr, SAMPLING: tl.constexpr,
                        BLOCK_G: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_T: tl.constexpr):
    # Eq. 6-7: per-head means of the row scores, Q heads then K then V in every group
    g3 = tl.arange(0, BLOCK_G)[:, None, None]
    h3 = tl.arange(0, BLOCK_H)[None, :, None]
    d3 = tl.arange(0, BLOCK_D)[None, None, :]
    rows = tl.load(scores_ptr + (g3 * (Q + 2) + h3) * HD + d3,
                   mask=(g3 < groups) & (h3 < Q + 2) & (d3 < HD), other=0.0)
    per_head = tl.sum(rows.to(tl.float32), axis=2) / HD
    g = tl.arange(0, BLOCK_G)[:, None]
    h = tl.arange(0, BLOCK_H)[None, :]
    key_score = tl.sum(tl.where(h == Q, per_head, 0.0), axis=1)[:, None]
    value_score = tl.sum(tl.where(h == Q + 1, per_head, 0.0), axis=1)[:, None]
    heads = (per_head + key_score + value_score) / 3.0
    is_query = (g < groups) & (h < Q)
    if BY_GROUPS:
        # whole kv groups, scored by their heads' mean, as one row [1, groups]
        group_score = (tl.sum(tl.where(is_query, heads, 0.0), axis=1) / Q)[None, :]
        gi = tl.arange(0, BLOCK_G)[None, :]
        valid = gi < groups
        keep = _top_k(_keys(group_score, valid, gi, groups, tau, seed, SCALE, SAMPLING),
                      valid, k)
        rank = tl.sum(_rank(keep), axis=0)[:, None]  # [BLOCK_G, 1]
        kept = tl.sum(keep.to(tl.int32), axis=0)[:, None] > 0
        t = tl.arange(0, BLOCK_T)[None, :]
        qkv = (Q + 2) * HD
        tl.store(qkv_ptr + rank * qkv + t, (g * qkv + t).to(tl.int64), mask=kept & (t < qkv))
        proj = Q * HD
        tl.store(proj_ptr + rank * proj + t, (g * proj + t).to(tl.int64),
                 mask=kept & (t < proj))
    else:
        # k query heads in every group, K and V computed in full
        keep = _top_k(_keys(heads, is_query, g * Q + h, groups * Q, tau, seed, SCALE,
                            SAMPLING), is_query, k)
        rank3 = _rank(keep)[:, :, None]
        kept3 = keep[:, :, None] & (d3 < HD)
        per_group = (k + 2) * HD
        tl.store(qkv_ptr + g3 * per_group + rank3 * HD + d3,
                 ((g3 * (Q + 2) + h3) * HD + d3).to(tl.int64), mask=kept3)
        e = tl.arange(0, 2 * BLOCK_D)[None, :]
        tl.store(qkv_ptr + g * per_group + k * HD + e, ((g * (Q + 2) + Q) * HD + e).to(tl.int64),
                 mask=(g < groups) & (e < 2 * HD))
        tl.store(proj_ptr + (g3 * k + rank3) * HD + d3, ((g3 * Q + h3) * HD + d3).to(tl.int64),
                 mask=kept3)


def supports(scores: torch.Tensor, *dims: int) -> bool:
    """Whether the kernels handle ``scores`` laid out as ``dims`` ([rows, n] for
    :func:`select`, [groups, q_per_group + 2, head_dim] for :func:`select_heads`)."""
    return scores.is_cuda and math.prod(map(triton.next_power_of_2, dims)) <= MAX_BLOCK


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _seed(method: str, seed: int | None) -> int:
    if method == "sampling" and seed is None:
        return int(torch.randint(2**62, ()))
    return seed or 0


def select(scores: torch.Tensor, k: int, method: str, temperature: float, scale: str,
           seed: int | None = None, shift: int | None = None) -> torch.Tensor:
    """:func:`megatron_sat.selection.select` in one kernel (Gumbel noise from ``seed``)."""
    n = scores.shape[-1]
    check(k, n, method, scale)
    rows = scores.numel() // n
    width = 2 * k if shift is not None else k
    out = torch.empty(*scores.shape[:-1], width, dtype=torch.int64, device=scores.device)
    block_n = triton.next_power_of_2(n)
    _select_kernel[(1,)](
        scores.contiguous(), out, rows, n, k, temperature, _seed(method, seed), shift or 0,
        SCALE=SCALES[scale], SAMPLING=method == "sampling", SHIFTED=shift is not None,
        BLOCK_R=triton.next_power_of_2(rows), BLOCK_N=block_n, num_warps=_warps(block_n))
    return out


def select_heads(row_scores: torch.Tensor, groups: int, q_per_group: int, head_dim: int,
                 k: int, by_groups: bool, method: str, temperature: float, scale: str,
                 seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6-8 for one attention block: the kept (``linear_qkv`` rows, ``linear_proj``
    columns) from the scores of a rank's fused QKV rows.

    ``by_groups``: keep ``k`` whole kv groups; otherwise ``k`` query heads in every group.
    """
    check(k, groups if by_groups else q_per_group, method, scale)
    kept_groups, kept_queries = (k, q_per_group) if by_groups else (groups, k)
    qkv = torch.empty(kept_groups * (kept_queries + 2) * head_dim, dtype=torch.int64,
                      device=row_scores.device)
    proj = torch.empty(kept_groups * kept_queries * head_dim, dtype=torch.int64,
                       device=row_scores.device)
    block_g = triton.next_power_of_2(groups)
    block_d = triton.next_power_of_2(head_dim)
    _head_select_kernel[(1,)](
        row_scores.contiguous(), qkv, proj, groups, k, temperature, _seed(method, seed),
        Q=q_per_group, HD=head_dim, BY_GROUPS=by_groups, SCALE=SCALES[scale],
        SAMPLING=method == "sampling", BLOCK_G=block_g,
        BLOCK_H=triton.next_power_of_2(q_per_group + 2), BLOCK_D=block_d,
        BLOCK_T=triton.next_power_of_2((q_per_group + 2) * head_dim),
        num_warps=_warps(block_g * block_d * triton.next_power_of_2(q_per_group + 2)))
    return qkv, proj
