"""Neuron selection (paper §2.2, Eq. 8): top-k, or sampling without replacement.

``sampling`` draws k neurons one after another without replacement, each draw from
softmax(s / tau) over the neurons not drawn yet. We sample this exactly with the
Gumbel-top-k trick: the k largest of s / tau + G, with G i.i.d. standard Gumbel, are
distributed as that sequential draw (Kool et al., 2019). As tau -> 0 it becomes top-k.

Before the division by tau the scores are rescaled (``score_scale``):

* ``standard`` (default): z-score over the layer's candidates on this rank, so that
  tau means the same thing for every metric, layer and model size.
* ``minmax``: mapped to [0, 1].
* ``raw``: as computed by Eq. 5.

The paper does not state the scale; docs/design.md explains the choice.

This module is the reference implementation, on any device. On a GPU the same selection
runs as one Triton kernel per block (:mod:`megatron_sat.fused_selection`) unless
``--sat-selection-kernel torch`` asks for this one.
"""

from __future__ import annotations

import torch

from megatron_sat.config import SCORE_SCALES, SELECTIONS

_TINY = 1e-12


def rescale(scores: torch.Tensor, scale: str) -> torch.Tensor:
    """Rescale fp32 ``scores`` (any shape) over all their elements."""
    if scale == "raw":
        return scores
    if scale == "standard":
        std, mean = torch.std_mean(scores, correction=0)
        return (scores - mean) / std.clamp_min(_TINY)
    if scale == "minmax":
        low, high = scores.min(), scores.max()
        return (scores - low) / (high - low).clamp_min(_TINY)
    raise ValueError(f"unknown score scale {scale!r}")


def select(scores: torch.Tensor, k: int, method: str, temperature: float, scale: str,
           seed: int | None = None, shift: int | None = None) -> torch.Tensor:
    """Indices of the k kept neurons in every row of ``scores`` ([n] or [rows, n]).

    Returns int64 indices of shape [k] or [rows, k], sorted ascending within each row.
    ``seed`` keys the sampling noise (None: torch's global generator). With ``shift``,
    every row holds the indices followed by the indices + shift ([..., 2k]): a gated
    MLP's fc1 rows [gate; up].
    """
    check(k, scores.shape[-1], method, scale)
    keys = scores.float()
    if method == "sampling":
        keys = sampling_keys(keys, exponential_noise(keys, seed), temperature, scale)
    return top_k_indices(keys, k, shift)


def check(k: int, n: int, method: str, scale: str) -> None:
    """Reject a selection that cannot be made (both selection paths call this)."""
    if not 0 < k <= n:
        raise ValueError(f"cannot keep {k} of {n} neurons")
    if method not in SELECTIONS:
        raise ValueError(f"unknown selection {method!r}")
    if scale not in SCORE_SCALES:
        raise ValueError(f"unknown score scale {scale!r}")


def top_k_indices(keys: torch.Tensor, k: int, shift: int | None = None) -> torch.Tensor:
    """Ascending indices of the k largest ``keys`` of every row (see :func:`select`).

    Of equal keys the lower index is kept (a stable sort; ``torch.topk`` may keep any),
    and -0.0 equals +0.0.
    """
    if k == keys.shape[-1]:
        idx = torch.arange(k, device=keys.device).expand(keys.shape[:-1] + (k,))
    else:
        order = torch.sort(keys, dim=-1, descending=True, stable=True).indices
        idx = order[..., :k].sort(dim=-1).values
    if shift is not None:
        return torch.cat([idx, idx + shift], dim=-1)
    return idx.contiguous()


def sampling_keys(scores: torch.Tensor, exp_noise: torch.Tensor, temperature: float,
                  scale: str) -> torch.Tensor:
    """Gumbel-top-k keys rescale(s) / tau + G, with G = -log(E) standard Gumbel noise
    from ``exp_noise`` = E ~ Exp(1)."""
    return rescale(scores, scale) / temperature - torch.log(exp_noise)


_generators: dict[torch.device, torch.Generator] = {}


def exponential_noise(like: torch.Tensor, seed: int | None) -> torch.Tensor:
    """Exp(1) noise shaped like ``like``, from a generator seeded with ``seed``."""
    if seed is None:
        return torch.empty_like(like).exponential_()
    gen = _generators.get(like.device)
    if gen is None:
        gen = _generators[like.device] = torch.Generator(device=like.device)
    gen.manual_seed(seed)
    return torch.empty_like(like).exponential_(generator=gen)
