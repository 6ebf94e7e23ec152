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


def test_survivors_of_the_second_full_collection_are_frozen(collector):
    assert collector.isenabled() is False  # the rest of the gc module passes through
    unfrozen = gc.get_freeze_count()  # CPython 3.12 reports a few hundred after a collection
    collector.collect()
    collector.collect(generation=0)  # megatron's cheap collection after an evaluation
    assert gc.get_freeze_count() == unfrozen
    long_lived, _ = cycle()
    dropped, dropped_ref = cycle()
    del dropped
    collector.collect()  # the second full one: frees the dropped cycle, freezes the rest
    assert dropped_ref() is None
    frozen = gc.get_freeze_count()
    assert frozen > unfrozen + 1000  # everything alive now, pytest's objects included
    # later cycles are found and freed by the next collections ...
    later, later_ref = cycle()
    del later
    collector.collect()
    assert later_ref() is None
    assert gc.get_freeze_count() == frozen  # frozen once only
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
