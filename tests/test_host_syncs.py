"""``megatron_sat.host_syncs``: the host answers what megatron's GPU round trips would.

The end-to-end check (megatron's reads against these, same logged grad norm, learning
rate and loss scale) is ``test_torch_fusions.test_pretrain_with_fusions_matches_megatrons_
fallbacks``; here each replacement against megatron's semantics, including the paths that
must still reach megatron's own code.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from _tools import run_snippet
from megatron.core import rerun_state_machine as rsm

from megatron_sat import host_syncs


class Recorder:
    """Stands in for megatron's function; records its calls."""

    def __init__(self, result=None):
        self.calls, self.result = [], result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result


@pytest.fixture
def group_size(monkeypatch):
    size = {"n": 1}
    monkeypatch.setattr(host_syncs, "_group_size", lambda group: size["n"])
    return size


def test_reduce_max_on_one_rank_returns_megatrons_float32_round_trip(group_size):
    megatron = Recorder()
    reduce_max = host_syncs._reduce_max_on_host(megatron)
    for stat in (1.1, 2.5e-5, 3, 0.0):
        got = reduce_max(stat, group="mp")
        assert got == float(np.float32(stat)) and isinstance(got, float)
    assert reduce_max(1.1) != 1.1  # rounded like the GPU tensor megatron builds
    assert reduce_max(None) is None and reduce_max(-1.0) is None
    assert megatron.calls == []
    group_size["n"] = 2
    megatron.result = 7.0
    assert reduce_max(1.1, group="mp") == 7.0
    assert megatron.calls == [((1.1,), {"group": "mp"})]


def test_logical_and_on_one_rank_counts_only_true_as_true(group_size):
    megatron = Recorder(result=False)
    logical_and = host_syncs._logical_and_on_host(megatron)
    assert logical_and(True) is True
    assert logical_and(False) is False and logical_and(1) is False and logical_and(None) is False
    assert megatron.calls == []
    group_size["n"] = 4
    assert logical_and(True, group="mp") is False
    assert megatron.calls == [((True,), {"group": "mp"})]


def test_host_known_scale_replaces_the_optimizers_tensor_and_computes_like_it():
    class Optimizer:
        def __init__(self, value):
            self._scale_one = torch.tensor([value])

    Optimizer.__init__ = host_syncs._with_host_known_scale(Optimizer.__init__, "_scale_one")
    scale = Optimizer(1.0)._scale_one
    assert isinstance(scale, host_syncs.HostKnownScalar) and scale.item() == 1.0
    loss = torch.tensor(2.5, requires_grad=True)
    scaled = scale * loss  # megatron's scale_loss
    assert type(scaled) is torch.Tensor and torch.equal(scaled, torch.tensor([2.5]))
    scaled.sum().backward()
    assert loss.grad == 1.0
    assert Optimizer(4.0)._scale_one.item() == 4.0


def _bucket_group(*grads):
    return types.SimpleNamespace(buckets=[types.SimpleNamespace(grad_data=g) for g in grads])


def _machine(mode, inject=False):
    """megatron's own rerun state machine in ``mode``."""
    injector = rsm.RerunErrorInjector(error_injection_rate=10 if inject else 0)
    return rsm.RerunStateMachine(mode=mode, error_injector=injector)


def test_gradient_check_reads_once_and_hands_non_finite_grads_to_megatron(monkeypatch):
    monkeypatch.setattr(rsm, "get_rerun_state_machine", lambda: _machine(rsm.RerunMode.DISABLED))
    megatron = Recorder()
    check = host_syncs._check_grads_once(megatron)
    finite = _bucket_group(torch.ones(5), torch.full((3,), 1e18))
    check(finite, True, False)
    assert megatron.calls == []
    for bad in (float("nan"), float("inf")):
        group = _bucket_group(torch.ones(5), torch.tensor([1.0, bad]))
        check(group, True, False)
        assert megatron.calls[-1] == ((group, True, False), {})
    assert len(megatron.calls) == 2


@pytest.mark.parametrize("machine,flags", [
    # megatron's default: the rerun machine numbers every call of a message
    (_machine(rsm.RerunMode.VALIDATE_RESULTS), (True, False)),
    (_machine(rsm.RerunMode.REPORT_DETERMINISM_STATS), (True, False)),
    (_machine(rsm.RerunMode.DISABLED, inject=True), (True, False)),
    (_machine(rsm.RerunMode.DISABLED), (True, True)),  # the large-gradient check
])
def test_gradient_check_leaves_validation_stats_injection_and_large_grads_to_megatron(
        monkeypatch, machine, flags):
    monkeypatch.setattr(rsm, "get_rerun_state_machine", lambda: machine)
    megatron = Recorder()
    group = _bucket_group(torch.ones(4))
    host_syncs._check_grads_once(megatron)(group, *flags)
    assert megatron.calls == [((group, *flags), {})]


_INSTALL = r"""
import json
import megatron.core.distributed.param_and_grad_buffer as buffers
import megatron.core.optimizer.optimizer as optimizers
import megatron.training.training as training
from megatron_sat import host_syncs

first, second = host_syncs.apply(), host_syncs.apply()
print(json.dumps({"first": first, "second": second, "wrapped": [
    training.reduce_max_stat_across_model_parallel_group.__wrapped__.__module__,
    training.logical_and_across_model_parallel_group.__wrapped__.__name__,
    buffers._ParamAndGradBucketGroup.check_grads.__wrapped__.__qualname__,
    optimizers.MixedPrecisionOptimizer.__init__.__wrapped__.__qualname__,
    optimizers.FP32Optimizer.__init__.__wrapped__.__qualname__]}))
"""


def test_apply_installs_into_megatrons_training_loop_once():
    """In a fresh process: ``apply`` changes megatron's module attributes for good."""
    rec = run_snippet(_INSTALL, timeout=300)
    assert len(rec["first"]) == 3 and rec["second"] == []
    assert rec["wrapped"] == ["megatron.training.utils.common_utils",
                              "logical_and_across_model_parallel_group",
                              "_ParamAndGradBucketGroup.check_grads",
                              "MixedPrecisionOptimizer.__init__", "FP32Optimizer.__init__"]
