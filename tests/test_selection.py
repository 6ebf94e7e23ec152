"""Tests of megatron_sat/selection.py: top-k, and sampling without replacement (Eq. 8).

The sampling tests compare empirical frequencies of 200,000 vectorised draws with the
exact probabilities of the sequential draw, enumerated over all ordered k-tuples:

    P(i_1, ..., i_k) = prod_j  w_{i_j} / (W - w_{i_1} - ... - w_{i_{j-1}}),  w = exp(s / tau).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from megatron_sat.selection import rescale, select

S = [0.1, 0.5, -0.3, 0.9, 0.0]
N_DRAWS = 200_000


def _exact_subset_probs(scores, k, tau):
    """{frozenset: probability} of the unordered k-subset under the sequential draw."""
    w = [math.exp(s / tau) for s in scores]
    total = sum(w)
    probs: dict[frozenset, float] = {}
    for tup in itertools.permutations(range(len(w)), k):
        p, left = 1.0, total
        for i in tup:
            p *= w[i] / left
            left -= w[i]
        key = frozenset(tup)
        probs[key] = probs.get(key, 0.0) + p
    return probs


def _inclusion(subset_probs, n):
    inc = [0.0] * n
    for sub, p in subset_probs.items():
        for i in sub:
            inc[i] += p
    return inc


def _draw(scores, k, tau, scale, n_draws=N_DRAWS, seed=0):
    mat = torch.tensor(scores, dtype=torch.float32).expand(n_draws, len(scores)).contiguous()
    idx = select(mat, k, "sampling", tau, scale, seed=seed)
    assert idx.shape == (n_draws, k) and idx.dtype == torch.int64
    return idx


def _assert_freqs(emp, exact, n):
    for e, p in zip(emp, exact):
        se = math.sqrt(max(p * (1 - p), 1e-12) / n)
        assert abs(e - p) <= max(4 * se, 1e-4), (emp, exact)


def test_exact_reference_is_a_distribution():
    for k in (2, 3):
        probs = _exact_subset_probs(S, k, 0.5)
        assert len(probs) == math.comb(5, k)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-12)
        assert sum(_inclusion(probs, 5)) == pytest.approx(k, abs=1e-12)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_sampling_inclusion_probabilities_are_exact(k, tau):
    exact = _inclusion(_exact_subset_probs(S, k, tau), 5)
    idx = _draw(S, k, tau, "raw")
    # every row holds k distinct indices (no replacement)
    assert bool((idx[:, 1:] > idx[:, :-1]).all())
    counts = torch.bincount(idx.flatten(), minlength=5).double() / N_DRAWS
    _assert_freqs(counts.tolist(), exact, N_DRAWS)
    # The test can tell this from the naive "k * softmax" approximation.
    w = [math.exp(s / tau) for s in S]
    naive = [k * x / sum(w) for x in w]
    assert max(abs(a - b) for a, b in zip(exact, naive)) > 0.02


def test_sampling_pair_distribution_is_exact():
    k, tau = 2, 0.5
    exact = _exact_subset_probs(S, k, tau)
    idx = _draw(S, k, tau, "raw", seed=1)
    code = idx[:, 0] * 5 + idx[:, 1]
    counts = torch.bincount(code, minlength=25).double() / N_DRAWS
    for a, b in itertools.combinations(range(5), 2):
        p = exact[frozenset((a, b))]
        e = counts[a * 5 + b].item()
        se = math.sqrt(p * (1 - p) / N_DRAWS)
        assert abs(e - p) <= 4 * se, ((a, b), e, p)
    assert counts.sum().item() == pytest.approx(1.0)


def test_sampling_with_standard_scale_uses_z_scores():
    # Identical rows: the z-score over all elements equals the z-score of one row.
    mean = sum(S) / 5
    std = math.sqrt(sum((s - mean) ** 2 for s in S) / 5)
    z = [(s - mean) / std for s in S]
    exact = _inclusion(_exact_subset_probs(z, 2, 1.0), 5)
    idx = _draw(S, 2, 1.0, "standard", seed=2)
    counts = torch.bincount(idx.flatten(), minlength=5).double() / N_DRAWS
    _assert_freqs(counts.tolist(), exact, N_DRAWS)


def test_tiny_temperature_is_topk():
    g = torch.Generator().manual_seed(5)
    for n, k in [(5, 2), (12, 5), (40, 13)]:
        scores = torch.randn(3000, n, generator=g)
        for scale in ("raw", "standard"):
            sampled = select(scores, k, "sampling", 1e-6, scale, seed=n * 10 + k)
            assert torch.equal(sampled, select(scores, k, "topk", 1.0, scale))
        # independent reference: the k largest by a full sort
        ref = scores.argsort(dim=1, descending=True)[:, :k].sort(dim=1).values
        assert torch.equal(select(scores, k, "topk", 1.0, "raw"), ref)


def test_topk_by_hand():
    s = torch.tensor([0.3, -1.0, 2.0, 0.5, 2.5])
    assert select(s, 1, "topk", 1.0, "raw").tolist() == [4]
    assert select(s, 2, "topk", 1.0, "raw").tolist() == [2, 4]
    assert select(s, 3, "topk", 1.0, "raw").tolist() == [2, 3, 4]
    assert select(s, 4, "topk", 1.0, "raw").tolist() == [0, 2, 3, 4]
    out = select(s, 5, "topk", 1.0, "raw")
    assert out.tolist() == [0, 1, 2, 3, 4] and out.dtype == torch.int64
    # the scale does not change the top-k (monotone maps)
    for scale in ("standard", "minmax"):
        assert select(s, 2, "topk", 1.0, scale).tolist() == [2, 4]


def test_topk_ties_keep_the_lower_index():
    s = torch.tensor([1.0, 3.0, 3.0, -2.0, 3.0, 0.0, 3.0])  # four 3s tie for the top
    assert select(s, 2, "topk", 1.0, "raw").tolist() == [1, 2]
    assert select(s, 5, "topk", 1.0, "raw").tolist() == [0, 1, 2, 4, 6]
    assert select(torch.zeros(2, 6), 3, "topk", 1.0, "raw").tolist() == [[0, 1, 2]] * 2


def test_topk_rows_are_independent():
    s = torch.tensor([[5.0, 1.0, 3.0, 4.0],
                      [0.0, 9.0, 8.0, -1.0],
                      [1.0, 2.0, 3.0, 4.0]])
    assert select(s, 2, "topk", 1.0, "raw").tolist() == [[0, 3], [1, 2], [2, 3]]
    full = select(s, 4, "sampling", 0.5, "raw", seed=0)
    assert full.tolist() == [[0, 1, 2, 3]] * 3


@pytest.mark.parametrize("k", [0, -1, 6])
def test_invalid_k_raises(k):
    with pytest.raises(ValueError):
        select(torch.zeros(5), k, "topk", 1.0, "raw")
    with pytest.raises(ValueError):
        select(torch.zeros(5), k, "sampling", 1.0, "raw")


def test_unknown_method_or_scale_raises():
    with pytest.raises(ValueError):
        select(torch.zeros(5), 2, "bernoulli", 1.0, "raw")
    with pytest.raises(ValueError):
        rescale(torch.zeros(5), "zscore")


def test_rescale_standard():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # mean 2.5, population variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    sd = math.sqrt(1.25)
    y = rescale(x, "standard")
    assert y.tolist() == pytest.approx([-1.5 / sd, -0.5 / sd, 0.5 / sd, 1.5 / sd], abs=1e-6)
    r = rescale(torch.randn(7, 9, generator=torch.Generator().manual_seed(1)) * 3 + 2,
                "standard")
    assert r.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert r.std(correction=0).item() == pytest.approx(1.0, abs=1e-5)


def test_rescale_minmax():
    assert rescale(torch.tensor([1.0, 2.0, 3.0, 5.0]), "minmax").tolist() == pytest.approx(
        [0.0, 0.25, 0.5, 1.0])
    r = rescale(torch.randn(6, 5, generator=torch.Generator().manual_seed(2)), "minmax")
    assert r.min().item() == 0.0 and r.max().item() == pytest.approx(1.0)


@pytest.mark.parametrize("scale", ["standard", "minmax"])
def test_rescale_constant_scores_are_zero(scale):
    y = rescale(torch.full((6,), 3.7), scale)
    assert not torch.isnan(y).any()
    assert y.tolist() == [0.0] * 6


def test_rescale_raw_is_identity():
    x = torch.tensor([0.1, -5.0, 7.0])
    assert torch.equal(rescale(x, "raw"), x)


@pytest.mark.parametrize("scale", ["standard", "minmax", "raw"])
def test_uniform_scores_give_uniform_subsets(scale):
    # uniform metric: every score is 1, so only the noise decides.
    n, k, draws = 5, 2, N_DRAWS
    ones = [1.0] * n
    idx = _draw(ones, k, 0.05, scale, n_draws=draws, seed=3)
    inc = (torch.bincount(idx.flatten(), minlength=n).double() / draws).tolist()
    _assert_freqs(inc, [k / n] * n, draws)  # 0.4 each
    code = idx[:, 0] * n + idx[:, 1]
    counts = torch.bincount(code, minlength=n * n).double() / draws
    for a, b in itertools.combinations(range(n), 2):
        p = 1 / math.comb(n, k)  # 0.1 each
        assert abs(counts[a * n + b].item() - p) <= 4 * math.sqrt(p * (1 - p) / draws)


def test_uniform_inclusion_larger():
    n, k, draws = 8, 3, 100_000
    idx = _draw([1.0] * n, k, 0.05, "standard", n_draws=draws, seed=4)
    inc = (torch.bincount(idx.flatten(), minlength=n).double() / draws).tolist()
    _assert_freqs(inc, [k / n] * n, draws)  # 0.375 each


def test_same_seed_same_selection():
    s = torch.randn(50, 16, generator=torch.Generator().manual_seed(9))
    a = select(s, 6, "sampling", 0.5, "standard", seed=11)
    b = select(s, 6, "sampling", 0.5, "standard", seed=11)
    c = select(s, 6, "sampling", 0.5, "standard", seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
