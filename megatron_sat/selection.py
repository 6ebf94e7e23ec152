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

On a GPU the rescale, the division by tau and the Gumbel transform of the noise run as
one compiled kernel (:func:`sampling_keys`): selection is a dozen tiny operations per
block, and their launches, not their arithmetic, are what it costs.
"""

from __future__ import annotations

import torch

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
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of the k kept neurons in every row of ``scores`` ([n] or [rows, n]).

    Returns int64 indices of shape [k] or [rows, k], sorted ascending within each row.
    """
    if not 0 < k <= scores.shape[-1]:
        raise ValueError(f"cannot keep {k} of {scores.shape[-1]} neurons")
    keys = scores.float()
    if method == "sampling":
        exp_noise = torch.empty_like(keys).exponential_(generator=generator)
        keys_fn = _compiled_sampling_keys if keys.is_cuda else sampling_keys
        keys = keys_fn(keys, exp_noise, temperature, scale)
    elif method != "topk":
        raise ValueError(f"unknown selection {method!r}")
    if k == keys.shape[-1]:
        idx = torch.arange(k, device=keys.device).expand(keys.shape[:-1] + (k,))
        return idx.contiguous()
    return torch.topk(keys, k, dim=-1, sorted=False).indices.sort(dim=-1).values


def sampling_keys(scores: torch.Tensor, exp_noise: torch.Tensor, temperature: float,
                  scale: str) -> torch.Tensor:
    """Gumbel-top-k keys rescale(s) / tau + G, with G = -log(E) standard Gumbel noise
    from ``exp_noise`` = E ~ Exp(1)."""
    return rescale(scores, scale) / temperature - torch.log(exp_noise)


_compiled_sampling_keys = torch.compile(sampling_keys, dynamic=False)
