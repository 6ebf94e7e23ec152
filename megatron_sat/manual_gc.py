"""megatron's ``--manual-gc`` without walking the whole heap at every interval.

With ``--manual-gc`` megatron turns Python's automatic collector off and runs a full
``gc.collect()`` every ``--manual-gc-interval`` iterations (and around evaluations). A full
collection walks every container object the process tracks: megatron's, torch's, and the
compiled kernels' and guards of Triton, inductor and dynamo. On the H100 hosts that took
about 0.3 s per collection for TinyLlama (docs/performance.md, session 9: 77 ms more per
iteration at an interval of 4), during which the host issues no kernel and the GPU runs
dry; at the default interval of 50 that is ~6 ms per iteration, for dense and SAT alike.

:func:`apply` gives megatron's training loop a collector (:class:`FreezingCollector`)
that, after its second full collection with the automatic collector off (so only under
``--manual-gc``) -- the first runs when ``train()`` starts, the
second at the first interval or evaluation, once start-up and the first iterations'
compilation have built what lives for the whole run -- moves every survivor to the
interpreter's permanent generation (``gc.freeze()``). Later collections walk only what was
created since. The price: a reference cycle among the frozen objects that becomes garbage
later is never freed (CPython's documented trade-off of ``gc.freeze``); the objects alive
after two full collections are the run's own (model, optimizer, data pipeline, compiled
code). Installed with the torch fusions; ``--no-sat-torch-fusions`` keeps megatron's
collections.
"""

from __future__ import annotations

import gc


class FreezingCollector:
    """Stands in for the ``gc`` module in ``megatron.training.training``."""

    def __init__(self, freeze_after: int = 2):
        self.full_collections = 0
        self.freeze_after = freeze_after

    def collect(self, generation: int = 2) -> int:
        found = gc.collect(generation)
        if generation == 2 and not gc.isenabled():  # --manual-gc turned it off
            self.full_collections += 1
            if self.full_collections == self.freeze_after:
                gc.freeze()
        return found

    def __getattr__(self, name):  # disable, enable, isenabled, ...
        return getattr(gc, name)


def apply() -> list[str]:
    """Install the collector in megatron's training loop (once); returns its name."""
    import megatron.training.training as training

    if isinstance(training.gc, FreezingCollector):
        return []
    training.gc = FreezingCollector()
    return ["manual gc that skips start-up objects"]
