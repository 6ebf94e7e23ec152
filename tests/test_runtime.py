"""Tests of megatron_sat/runtime.py: SelectionState's seeding and index reuse.

``draw`` below stands for a module's selection: it records every call and returns noise
from a generator seeded with the seed it is handed, so equal returns mean equal seeds.
"""

from __future__ import annotations

import pytest
import torch

from megatron_sat import runtime
from megatron_sat.runtime import SelectionState, get_iteration, set_iteration


@pytest.fixture(autouse=True)
def _restore_iteration():
    saved = get_iteration()
    yield
    set_iteration(saved)


class Drawer:
    def __init__(self):
        self.calls = 0

    def __call__(self, seed):
        self.calls += 1
        return torch.rand(8, generator=torch.Generator().manual_seed(seed))


def _take(state, drawer, rank_key=(0, 0)):
    return state.indices(drawer, rank_key)


def test_set_iteration():
    set_iteration(41)
    assert get_iteration() == 41
    set_iteration(torch.tensor(7).item())
    assert get_iteration() == 7 and isinstance(runtime.get_iteration(), int)


def test_successive_draws_in_one_iteration_differ():
    set_iteration(5)
    st, d = SelectionState(1234, 3, 0), Drawer()
    draws = [_take(st, d) for _ in range(4)]  # four micro-batches
    assert d.calls == 4
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(draws[i], draws[j])
    assert st.last is draws[-1]


def test_same_iteration_and_draw_number_reproduce_across_objects():
    def run(iterations):
        st, d, out = SelectionState(1234, 3, 0), Drawer(), {}
        for it in iterations:
            set_iteration(it)
            out[it] = [_take(st, d) for _ in range(3)]
        return out

    full = run(range(6))       # the uninterrupted run
    resumed = run(range(3, 6))  # a fresh process resumed from a checkpoint at iteration 3
    for it in range(3, 6):
        for a, b in zip(full[it], resumed[it]):
            assert torch.equal(a, b)
    # and a new iteration is not a replay of the previous one
    assert not torch.equal(full[4][0], full[3][0])


def test_noise_depends_on_key_and_rank():
    set_iteration(2)
    base = _take(SelectionState(1234, 3, 0), Drawer())
    assert torch.equal(base, _take(SelectionState(1234, 3, 0), Drawer()))
    for other in (SelectionState(1235, 3, 0), SelectionState(1234, 4, 0),
                  SelectionState(1234, 3, 1)):
        assert not torch.equal(base, _take(other, Drawer()))
    assert not torch.equal(base, _take(SelectionState(1234, 3, 0), Drawer(), (1, 0)))
    assert not torch.equal(base, _take(SelectionState(1234, 3, 0), Drawer(), (0, 1)))


def test_no_grad_draw_is_reused_by_recompute():
    set_iteration(9)
    st, d = SelectionState(1234, 0, 1), Drawer()
    with torch.no_grad():
        first = _take(st, d)   # forward of a recomputed layer: runs without grad
    assert d.calls == 1
    again = _take(st, d)       # the recompute in backward, grad enabled
    assert again is first and d.calls == 1
    fresh = _take(st, d)       # nothing pending any more: a new draw
    assert d.calls == 2 and not torch.equal(fresh, first)


def test_recompute_sees_the_same_draws_as_no_recompute():
    micro_batches = 3

    set_iteration(4)
    plain_state, plain = SelectionState(7, 2, 0), Drawer()
    plain_draws = [_take(plain_state, plain) for _ in range(micro_batches)]

    set_iteration(4)
    st, d, used = SelectionState(7, 2, 0), Drawer(), []
    for _ in range(micro_batches):  # 1F1B: forward (no grad), then recompute in backward
        with torch.no_grad():
            fwd = _take(st, d)
        used.append((fwd, _take(st, d)))
    assert d.calls == micro_batches
    for (fwd, rec), ref in zip(used, plain_draws):
        assert rec is fwd and torch.equal(fwd, ref)


def test_pending_draws_come_back_in_order():
    set_iteration(1)
    st, d = SelectionState(1, 1, 0), Drawer()
    with torch.no_grad():
        a, b = _take(st, d), _take(st, d)  # two forwards before their recomputes
    assert _take(st, d) is a
    assert _take(st, d) is b
    assert d.calls == 2


def test_grad_enabled_draw_is_not_queued():
    set_iteration(1)
    st, d = SelectionState(1, 1, 0), Drawer()
    a = _take(st, d)
    b = _take(st, d)
    assert d.calls == 2 and not torch.equal(a, b)


def test_stale_pending_entries_are_dropped():
    set_iteration(3)
    st, d = SelectionState(1234, 5, 0), Drawer()
    with torch.no_grad():
        stale = _take(st, d)  # an abandoned no-grad forward at iteration 3
    set_iteration(4)
    got = _take(st, d)
    assert d.calls == 2 and got is not stale
    # it is iteration 4's first draw, as a fresh object would make it
    set_iteration(4)
    assert torch.equal(got, _take(SelectionState(1234, 5, 0), Drawer()))
    # and the stale entry is gone for good
    nxt = _take(st, d)
    assert d.calls == 3 and nxt is not stale and not torch.equal(nxt, stale)


def test_draw_counter_resets_each_iteration():
    st, d = SelectionState(11, 0, 0), Drawer()
    set_iteration(0)
    _take(st, d), _take(st, d)
    set_iteration(1)
    x = _take(st, d)
    set_iteration(1)
    assert torch.equal(x, _take(SelectionState(11, 0, 0), Drawer()))


def test_mix_is_deterministic_63_bit():
    a = runtime._mix(1234, 3, 0, 5, 0, 0, 0)
    assert a == runtime._mix(1234, 3, 0, 5, 0, 0, 0)
    assert 0 <= a < 2 ** 63
    assert len({runtime._mix(1234, 3, 0, it, k, 0, 0) for it in range(50) for k in range(8)}) == 400


def test_iteration_scope_draws_once_per_iteration_and_its_first_draw_is_microbatch_scopes():
    """``--sat-selection-scope iteration``: every forward of an iteration (micro-batches,
    a no-grad forward and its recompute) gets one selection object, drawn with the seed of
    the micro-batch scope's first draw; the next iteration draws anew."""
    st, d = SelectionState(1234, 3, 0, scope="iteration"), Drawer()
    for it in (5, 6):
        set_iteration(it)
        assert not st.drawn()
        first = _take(st, d)
        assert st.drawn()
        with torch.no_grad():
            again = [_take(st, d) for _ in range(2)]
        again += [_take(st, d) for _ in range(3)]
        assert all(a is first for a in again) and d.calls == it - 4
        assert torch.equal(first, _take(SelectionState(1234, 3, 0), Drawer()))
    assert st.drawn() and not SelectionState(1234, 3, 0).drawn()  # microbatch never reuses


def test_set_micro_batches_refuses_zero():
    runtime.set_micro_batches(4)
    assert runtime.micro_batches() == 4
    with pytest.raises(ValueError, match="at least one micro-batch"):
        runtime.set_micro_batches(0)
    runtime.set_micro_batches(1)
