"""``megatron_sat.manual_gc``: megatron's manual collections that freeze the survivors of
the second full one."""

from __future__ import annotations

import gc
import weakref

import pytest

from megatron_sat.manual_gc import FreezingCollector


class Node:
    pass


def cycle() -> tuple[Node, weakref.ref]:
    """Two objects referring to each other (only the cycle collector frees them), and a
    weak reference that dies with them."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a, weakref.ref(a)


@pytest.fixture
def collector():
    enabled = gc.isenabled()
    gc.disable()  # as megatron's --manual-gc does
    gc.unfreeze()
    gc.collect()
    yield FreezingCollector()
    gc.unfreeze()
    gc.collect()
    if enabled:
        gc.enable()


def test_survivors_of_the_second_full_collection_are_frozen(collector, monkeypatch):
    freezes = []
    freeze = gc.freeze
    monkeypatch.setattr(gc, "freeze", lambda: (freezes.append(1), freeze())[1])
    assert collector.isenabled() is False  # the rest of the gc module passes through
    unfrozen = gc.get_freeze_count()  # CPython 3.12 reports a few hundred after a collection
    collector.collect()
    collector.collect(generation=0)  # megatron's cheap collection after an evaluation
    assert not freezes
    long_lived, _ = cycle()
    dropped, dropped_ref = cycle()
    del dropped
    collector.collect()  # the second full one: frees the dropped cycle, freezes the rest
    assert dropped_ref() is None
    assert len(freezes) == 1
    assert gc.get_freeze_count() > unfrozen + 1000  # everything alive now, pytest's included
    # later cycles are found and freed by the next collections ...
    later, later_ref = cycle()
    del later
    collector.collect()
    assert later_ref() is None
    # frozen once only (the permanent generation's count is no witness: a frozen object
    # whose reference count drops to zero still leaves it)
    assert len(freezes) == 1
    # ... but a frozen cycle dropped later is not (gc.freeze's documented price)
    long_ref = weakref.ref(long_lived)
    del long_lived
    collector.collect()
    assert long_ref() is not None


def test_nothing_is_frozen_while_the_automatic_collector_runs(collector):
    """Without --manual-gc megatron's loop collects only around fp8 checkpoint saves."""
    gc.enable()
    unfrozen = gc.get_freeze_count()
    for _ in range(3):
        collector.collect()
    assert gc.get_freeze_count() == unfrozen
    gc.disable()
