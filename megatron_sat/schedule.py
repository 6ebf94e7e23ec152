"""Ladder Omission Rate Scheduler, LORS (paper Eq. 11).

With maximum rate r, total steps T, start eta and L ladders, the rate at step t is

    r_t = r                             for t <= eta
    r_t = max(0, r - (r / L) * l_t)     for t > eta, where
    (2^(l_t - 1) - 1) / (2^L - 1) <= (t - eta) / (T - eta) < (2^l_t - 1) / (2^L - 1).

So after eta the rate drops by r/L per ladder, each ladder twice as long as the one
before; the L-th ladder is dense and lasts about half of the T - eta steps.

Units: t counts training steps from 1, so megatron's 0-based ``iteration`` trains step
t = iteration + 1 and the last of ``--train-iters`` = T steps is t = T. The rate is a
pure function of the iteration, so a resumed run reproduces it exactly.
"""

from __future__ import annotations

from megatron_sat.config import SATConfig


def ladder_index(t: int, eta: int, total: int, ladders: int) -> int:
    """l_t of Eq. 11 for a step t > eta, in exact integer arithmetic (no float boundaries)."""
    if not eta < t or not eta < total or ladders < 1:
        raise ValueError(f"Eq. 11 needs eta < t, eta < T and L >= 1; got t={t}, eta={eta}, "
                         f"T={total}, L={ladders}")
    span, steps = total - eta, t - eta
    denom = 2 ** ladders - 1
    level = 1
    # smallest l with steps / span < (2^l - 1) / denom
    while steps * denom >= (2 ** level - 1) * span:
        level += 1
    return level


def lors_rate(t: int, rate: float, eta: int, total: int, ladders: int) -> float:
    """Omission rate r_t at 1-based step t (Eq. 11)."""
    if t <= eta:
        return rate
    level = ladder_index(t, eta, total, ladders)
    return max(0.0, rate * (ladders - level) / ladders)


def omission_rate_at(cfg: SATConfig, iteration: int) -> float:
    """Rate used while training megatron's 0-based ``iteration`` (constant without LORS)."""
    if not cfg.enabled or cfg.lors_start is None:
        return cfg.omission_rate
    return lors_rate(iteration + 1, cfg.omission_rate, cfg.lors_start,
                     cfg.train_iters, cfg.lors_ladders)
