"""Tests of megatron_sat/schedule.py (LORS, paper Eq. 11) and of ``kept_count``.

The reference below is written straight from Eq. 11 with exact fractions:

    r_t = r                            for t <= eta
    r_t = max(0, r - (r / L) * l_t)    for t > eta, with l_t in N+ such that
    (2^(l_t - 1) - 1) / (2^L - 1) <= (t - eta) / (T - eta) < (2^l_t - 1) / (2^L - 1).
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import pytest

from megatron_sat.config import SATConfig, kept_channels, kept_count
from megatron_sat.schedule import lors_rate, omission_rate_at


def eq11(t: int, r: Fraction, eta: int, total: int, ladders: int) -> Fraction:
    if t <= eta:
        return r
    x = Fraction(t - eta, total - eta)
    denom = 2 ** ladders - 1
    found = [l for l in range(1, ladders + 64)
             if Fraction(2 ** (l - 1) - 1, denom) <= x < Fraction(2 ** l - 1, denom)]
    assert len(found) == 1  # Eq. 11 picks exactly one l_t
    return max(Fraction(0), r - r / ladders * found[0])


def test_paper_figure_3c_every_step():
    r = Fraction(1, 2)
    for t in range(1, 3001):
        want = float(eq11(t, r, 2000, 3000, 5))
        assert lors_rate(t, 0.5, 2000, 3000, 5) == pytest.approx(want, abs=1e-12), t


def test_paper_figure_3c_literals():
    f = lambda t: lors_rate(t, 0.5, 2000, 3000, 5)  # noqa: E731
    assert f(1) == 0.5 and f(1999) == 0.5 and f(2000) == 0.5
    # Ladder 1 while (t - 2000) / 1000 < 1/31, i.e. t - 2000 < 32.26: t = 2001 .. 2032.
    assert f(2001) == pytest.approx(0.4)
    assert f(2032) == pytest.approx(0.4)
    # Ladder 2 from t - 2000 = 33 (33 * 31 = 1023 >= 1000) until < 3000/31 = 96.77.
    assert f(2033) == pytest.approx(0.3)
    assert f(2096) == pytest.approx(0.3)
    # Ladder 3 from 97 until < 7000/31 = 225.8; ladder 4 from 226 until < 15000/31 = 483.9.
    assert f(2097) == pytest.approx(0.2)
    assert f(2225) == pytest.approx(0.2)
    assert f(2226) == pytest.approx(0.1)
    assert f(2483) == pytest.approx(0.1)
    # Ladder 5 (dense) from 484 to the end, and t = T gives l = 6 which is also 0.
    assert f(2484) == 0.0
    assert f(3000) == 0.0


def test_paper_figure_3c_ladder_lengths_double():
    lengths = Counter(round(lors_rate(t, 0.5, 2000, 3000, 5), 6) for t in range(2001, 3001))
    # Hand: 1..32 -> 32, 33..96 -> 64, 97..225 -> 129, 226..483 -> 258, 484..1000 -> 517.
    assert [lengths[v] for v in (0.4, 0.3, 0.2, 0.1, 0.0)] == [32, 64, 129, 258, 517]
    assert sum(lengths.values()) == 1000


def test_sft_single_ladder():
    # The paper's SFT setting: r = 0.96, T = 1200, eta = 600, L = 1.
    for t in range(1, 1201):
        want = 0.96 if t <= 600 else 0.0
        assert lors_rate(t, 0.96, 600, 1200, 1) == want, t


@pytest.mark.parametrize("eta,total,ladders,rate", [
    (0, 100, 3, 0.6), (10, 11, 4, 0.5), (7, 50, 1, 0.3), (99, 1000, 6, 0.9), (0, 1, 2, 0.5),
    (5, 37, 5, 0.75), (100, 410, 5, 0.5), (0, 7, 3, 0.6), (3, 18, 4, 0.8)])
def test_against_reference_on_other_settings(eta, total, ladders, rate):
    r = Fraction(rate).limit_denominator(1000)
    for t in range(1, total + 5):  # t > T included: the rate must stay 0
        want = float(eq11(t, r, eta, total, ladders))
        assert lors_rate(t, rate, eta, total, ladders) == pytest.approx(want, abs=1e-12), t


def test_boundaries():
    # t = eta exactly still has the full rate; the first drop is at eta + 1.
    assert lors_rate(50, 0.8, 50, 100, 4) == 0.8
    assert lors_rate(51, 0.8, 50, 100, 4) == pytest.approx(0.6)  # 1/50 < 1/15: ladder 1
    assert lors_rate(100, 0.8, 50, 100, 4) == 0.0                 # t = T
    for t in (101, 150, 10_000):
        assert lors_rate(t, 0.8, 50, 100, 4) == 0.0               # past T stays dense
    # eta = 0: the very first step is already on ladder 1 (1/100 < 1/7 for L = 3).
    assert lors_rate(1, 0.6, 0, 100, 3) == pytest.approx(0.4)
    assert lors_rate(0, 0.6, 0, 100, 3) == 0.6
    # Exact boundaries (t - eta) / (T - eta) = (2^l - 1) / (2^L - 1) start ladder l + 1:
    # T - eta = 310 = 31 * 10, L = 5: ladder starts at t - eta = 10, 30, 70, 150.
    f = lambda t: lors_rate(t, 0.5, 100, 410, 5)  # noqa: E731
    assert [f(100 + s) for s in (9, 10, 29, 30, 69, 70, 149, 150)] == pytest.approx(
        [0.4, 0.3, 0.3, 0.2, 0.2, 0.1, 0.1, 0.0])
    # T - eta = 7, L = 3: x = 1/7 at the first step already is ladder 2 (ladder 1 is empty).
    assert lors_rate(1, 0.6, 0, 7, 3) == pytest.approx(0.2)
    assert lors_rate(3, 0.6, 0, 7, 3) == 0.0  # x = 3/7: ladder 3
    # L = 1: everything after eta is dense.
    assert lors_rate(11, 0.5, 10, 20, 1) == 0.0


def _cfg(**kw):
    base = dict(omission_rate=0.5, lors_start=2000, train_iters=3000, lors_ladders=5)
    base.update(kw)
    return SATConfig(**base).validate()


def test_omission_rate_at_uses_iteration_plus_one():
    cfg = _cfg()
    assert omission_rate_at(cfg, 0) == 0.5
    assert omission_rate_at(cfg, 1999) == 0.5            # t = 2000 = eta
    assert omission_rate_at(cfg, 2000) == pytest.approx(0.4)  # t = 2001
    assert omission_rate_at(cfg, 2031) == pytest.approx(0.4)  # t = 2032
    assert omission_rate_at(cfg, 2032) == pytest.approx(0.3)  # t = 2033
    assert omission_rate_at(cfg, 2999) == 0.0            # t = 3000 = T, the last step
    for it in range(0, 3000, 7):
        assert omission_rate_at(cfg, it) == lors_rate(it + 1, 0.5, 2000, 3000, 5)


def test_omission_rate_at_constant_without_lors():
    cfg = SATConfig(omission_rate=0.5, train_iters=3000).validate()
    assert {omission_rate_at(cfg, it) for it in (0, 1, 1999, 2999, 5000)} == {0.5}


def test_omission_rate_at_zero_when_disabled():
    cfg = _cfg(omission_rate=0.0)
    assert {omission_rate_at(cfg, it) for it in (0, 1999, 2000, 2500, 2999)} == {0.0}
    assert omission_rate_at(SATConfig(), 123) == 0.0


@pytest.mark.parametrize("n", [1, 3, 10, 32, 100, 5632, 11008])
def test_kept_count_is_exact_floor(n):
    for tenths in range(0, 10):
        rate = tenths / 10  # 0.0, 0.1, ..., 0.9 as the float the user types
        assert kept_count(n, rate) == n * (10 - tenths) // 10, (n, rate)
    for hundredths in range(0, 100):
        rate = hundredths / 100
        assert kept_count(n, rate) == n * (100 - hundredths) // 100, (n, rate)


def test_kept_count_literals():
    assert kept_count(10, 0.3) == 7
    assert kept_count(10, 0.7) == 3   # 10 * (1 - 0.7) = 3.0000000000000004 in floats
    assert kept_count(10, 0.9) == 1
    assert kept_count(32, 0.5) == 16
    assert kept_count(32, 0.9) == 3   # floor(3.2)
    assert kept_count(5632, 0.5) == 2816
    assert kept_count(4, 0.9) == 0    # floor(0.4)
    assert kept_count(4096, 0.96) == 163  # floor(163.84)


def test_kept_channels_round_down_to_the_multiple_but_not_below_it():
    assert kept_channels(5632, 0.2, 64) == 4480   # floor(4505.6) = 4505 -> 70 x 64
    assert kept_channels(5632, 0.2, 1) == 4505
    assert kept_channels(5632, 0.5, 64) == 2816   # already 44 x 64
    assert kept_channels(5632, 0.4, 64) == 3328   # 3379 -> 52 x 64
    assert kept_channels(11008, 0.5, 64) == 5504  # 86 x 64
    assert kept_channels(128, 0.5, 64) == 64
    assert kept_channels(100, 0.5, 64) == 50      # below one multiple: exact
    assert kept_channels(130, 0.1, 64) == 64      # 117 -> 64
