"""Neuron importance (paper Eq. 5) and head aggregation (Eq. 6-7).

A neuron is one output row v of a linear layer whose input is Z (m tokens x d):

    uniform:    s_v = 1
    magnitude:  s_v = ||v||_2
    wanda:      s_v = [||Z^1||_2, ..., ||Z^d||_2] . |v|
    maxip:      s_v = (sum_i Z_i / m) . v

For wanda we take |v| as Sun et al. (2023) do: Eq. 5 as printed drops the absolute
value, which would make a "magnitude" score depend on the sign of the weights.

Z is the detached input of the layer for the current micro-batch. Only a d-vector of
statistics is needed (the token mean for maxip, the column norms for wanda), so under
sequence parallelism every rank reduces its own token shard and one all-reduce of d
floats over the tensor-parallel group makes the statistic equal to the one of the full
sequence: selection does not depend on whether sequence parallelism is on.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from megatron_sat.config import METRICS


def input_statistic(metric: str, z: torch.Tensor, sp_group=None) -> torch.Tensor | None:
    """The d-vector of Eq. 5 computed from input ``z`` [..., d]; None if unused.

    fp32, except the maxip mean of a half-precision ``z`` on a GPU without sequence
    parallelism: that is one cuBLAS GEMV, z^T (1/m) computed in fp32 and rounded once to
    z's dtype, the dtype ``neuron_scores`` multiplies in. On an H100 at 32k x 2048 tokens
    the GEMV takes 47 us, torch's fp32 column mean and the cast 65 us
    (``benchmarks/bench_kernels.py``); a CUDA test checks the result is within one bf16
    ulp of the fp32 mean.

    ``sp_group``: the tensor-parallel group when ``z`` holds only this rank's sequence shard.
    """
    if metric not in ("wanda", "maxip"):
        return None
    z = z.detach().reshape(-1, z.shape[-1])
    ranks = dist.get_world_size(sp_group) if sp_group is not None else 1
    if metric == "maxip" and ranks == 1 and z.is_cuda and z.element_size() == 2:
        return torch.addmv(z.new_empty(()), z.t(), _ones(z.shape[0], z), beta=0,
                           alpha=1.0 / z.shape[0])
    if metric == "maxip":
        stat = torch.mean(z, dim=0, dtype=torch.float32)  # equal shards: mean of means
    else:
        stat = torch.linalg.vector_norm(z, dim=0, dtype=torch.float32).square_()
    if ranks > 1:
        dist.all_reduce(stat, group=sp_group)
    if metric == "maxip":
        return stat.div_(ranks) if ranks > 1 else stat
    return stat.sqrt_()


def _ones(n: int, like: torch.Tensor) -> torch.Tensor:
    """A vector of n ones in ``like``'s dtype and device, made once per shape."""
    return _cached_ones(n, like.dtype, like.device)


@functools.lru_cache(maxsize=8)
def _cached_ones(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.ones(n, dtype=dtype, device=device)


def neuron_scores(metric: str, weight: torch.Tensor, stat: torch.Tensor | None) -> torch.Tensor:
    """Eq. 5 for every row of ``weight`` [n, d]; returns scores [n].

    The weight-times-statistic product runs in the weight's dtype (bf16 in mixed
    precision) to avoid an fp32 copy of the weight every step, and its scores stay in that
    dtype (the selection reads them as fp32): they carry bf16 precision (about 3
    significant digits), which only reorders near-ties.
    """
    if metric == "uniform":
        return torch.ones(weight.shape[0], dtype=torch.float32, device=weight.device)
    w = weight.detach()
    if metric == "magnitude":
        return torch.linalg.vector_norm(w, dim=1, dtype=torch.float32)
    if metric == "wanda":
        return torch.mv(w.abs(), stat.to(w.dtype))
    if metric == "maxip":
        return torch.mv(w, stat.to(w.dtype))
    raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")


def head_scores(row_scores: torch.Tensor, groups: int, heads_per_group: int,
                head_dim: int) -> torch.Tensor:
    """Eq. 6-7: per-query-head scores [groups, heads_per_group] from fused-QKV row scores.

    megatron-core lays out a rank's QKV rows per kv group: the group's query heads, then
    its key head, then its value head, each ``head_dim`` rows. A head's score is the mean
    of its Q, K and V head scores, each the mean over the head's ``head_dim`` rows; query
    heads of one group share the group's K and V scores.
    """
    per_head = row_scores.float().view(groups, heads_per_group + 2, head_dim).mean(dim=2)
    q, k, v = per_head[:, :heads_per_group], per_head[:, -2:-1], per_head[:, -1:]
    return (q + k + v) / 3.0
