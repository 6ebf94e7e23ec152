"""``megatron_sat.host_syncs``: the host answers what megatron's GPU round trips would.

The end-to-end check (megatron's reads against these, same logged grad norm, learning
rate and loss scale) is ``test_torch_fusions.test_pretrain_with_fusions_matches_megatrons_
fallbacks``; here each replacement against megatron's semantics, including the paths that
must still reach megatron's own code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from _launch import pretrain
from _tools import REPO, run_snippet
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


def test_reduce_max_keeps_a_device_statistic_on_the_device(group_size, monkeypatch):
    """The gradient norm (a device tensor with the clipping of item 3) is not read."""
    megatron = Recorder()
    reduce_max = host_syncs._reduce_max_on_host(megatron)
    norm = torch.tensor([1.25], dtype=torch.float64)
    with monkeypatch.context() as reads:
        reads.setattr(torch.Tensor, "item", _no_read)
        got = reduce_max(norm, group="mp")
    assert got.shape == () and got.dtype == torch.float32 and got.item() == 1.25
    assert f"{got:.3f}" == "1.250" and megatron.calls == []  # megatron's log line


def _no_read(*args, **kwargs):
    raise AssertionError("read a tensor on the host")


def _machine(mode, inject=False):
    """megatron's own rerun state machine in ``mode``."""
    injector = rsm.RerunErrorInjector(error_injection_rate=10 if inject else 0)
    return rsm.RerunStateMachine(mode=mode, error_injector=injector)


@pytest.fixture
def deferred(monkeypatch):
    """A fresh, enabled DeferredChecks; megatron's args say which iteration runs."""
    import megatron.training.global_vars as global_vars

    checks = host_syncs.DeferredChecks()
    checks.enabled = checks.training = True
    monkeypatch.setattr(host_syncs, "DEFERRED", checks)
    args = types.SimpleNamespace(curr_iteration=0)
    monkeypatch.setattr(global_vars, "get_args", lambda: args)
    checks.args = args
    return checks


def _adamw(param: torch.Tensor, **kwargs) -> tuple[torch.nn.Parameter, torch.optim.AdamW]:
    param = torch.nn.Parameter(param.clone())
    return param, torch.optim.AdamW([param], lr=0.1, fused=True, **kwargs)


def test_deferred_checks_skip_updates_on_the_device_then_raise_megatrons_error(
        deferred, monkeypatch):
    """A NaN validated in iteration 2 reads nothing, makes fused Adam leave the parameters,
    moments and step count as after iteration 1 (also in iteration 3), and is raised, with
    megatron's message and the iteration, by the next check."""
    machine = _machine(rsm.RerunMode.DISABLED)
    validate = host_syncs._deferred_validation(rsm.RerunStateMachine.validate_result)
    start = torch.randn(6, generator=torch.Generator().manual_seed(0))
    param, adam = _adamw(start)
    adam.found_inf = deferred.skip_flag("cpu")
    reference, plain = _adamw(start)
    grads = [torch.randn(6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    results = [torch.tensor(2.0), torch.tensor(float("nan")), torch.tensor(3.0)]
    for iteration, (grad, result) in enumerate(zip(grads, results)):
        deferred.args.curr_iteration = iteration
        with monkeypatch.context() as reads:
            for name in ("item", "__bool__", "tolist"):
                reads.setattr(torch.Tensor, name, _no_read)
            for reject, kind in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
                validate(machine, result=result, rejection_func=reject, tolerance=0.001,
                         message=f"found {kind} in local grad norm for bucket #0", fatal=True)
        param.grad, reference.grad = grad.clone(), grad.clone()
        adam.step()
        if iteration == 0:
            plain.step()
            deferred.check("iteration 1")  # nothing rejected: no error
        assert torch.equal(param, reference)  # iteration 1's update, then none
        assert torch.equal(adam.state[param]["exp_avg"], plain.state[reference]["exp_avg"])
        assert adam.state[param]["step"].item() == 1
    with pytest.raises(RuntimeError) as error:
        deferred.check("the log line of iteration 4")
    text = str(error.value)
    assert "iteration 2: Unexpected result nan" in text
    assert "message='found NaN in local grad norm for bucket #0'" in text
    assert "Found at the log line of iteration 4" in text
    assert "updates from iteration 2 on" in text and "--rerun-mode validate_results" in text


def test_deferred_checks_report_the_earliest_rejection(deferred):
    validate = host_syncs._deferred_validation(rsm.RerunStateMachine.validate_result)
    machine = _machine(rsm.RerunMode.DISABLED)
    for iteration, (loss, norm) in enumerate([(1.0, 1.0), (1.0, float("inf")),
                                              (float("nan"), float("nan"))]):
        deferred.args.curr_iteration = iteration
        validate(machine, torch.tensor(loss), torch.isnan, "loss is NaN")
        validate(machine, torch.tensor(norm), torch.isinf, "norm is Inf")
    with pytest.raises(RuntimeError, match=r"iteration 2: Unexpected result inf "
                                           r"\(message='norm is Inf'\)"):
        deferred.check("here")


def test_deferred_checks_raise_at_log_lines_and_however_training_ends(deferred, monkeypatch,
                                                                       tmp_path):
    """A pending rejection is raised by the next log line (not by a silent iteration), by
    the end of ``train`` even when megatron ends it with ``sys.exit``, and is written to
    megatron's tracker file under the number megatron gives the rejected iteration."""
    import megatron.training.global_vars as global_vars

    machine = _machine(rsm.RerunMode.DISABLED)
    machine.result_rejected_tracker_filename = str(tmp_path / "tracker")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # in megatron's line
    monkeypatch.setattr(rsm, "get_rerun_state_machine", lambda: machine)
    deferred.args.__dict__.update(log_interval=4, tensorboard_log_interval=4, train_iters=20)
    monkeypatch.setattr(global_vars, "get_tensorboard_writer", lambda: None)
    validate = host_syncs._deferred_validation(rsm.RerunStateMachine.validate_result)
    deferred.args.curr_iteration, machine.current_iteration = 5, 6  # iteration 6 runs
    validate(machine, torch.tensor(float("inf")), torch.isinf, "norm is Inf")
    _training_log.calls = []
    log = host_syncs._training_log_without_reads(_training_log)
    log({}, {}, 1e-4, 7, 1.0, False, 0, None, None, None, 0)  # silent: no check
    deferred.args.curr_iteration, machine.current_iteration = 7, 8
    with pytest.raises(RuntimeError, match="iteration 6: .*Found at the log line of "
                                           "iteration 8"):
        log({}, {}, 1e-4, 8, 1.0, False, 0, None, None, None, 0)
    assert [call[0] for call in _training_log.calls] == [7]
    # megatron's counter read 6 while iteration 6 ran: its own line would say 7
    assert "iteration=7 " in (tmp_path / "tracker").read_text()

    def train_that_exits():
        raise SystemExit(0)

    with pytest.raises(RuntimeError, match="Found at the end of training") as error:
        host_syncs._checked_after(train_that_exits)()
    assert isinstance(error.value.__context__, SystemExit)
    deferred.first.clear()
    assert host_syncs._checked_after(lambda: "done")() == "done"


def test_evaluation_validations_are_not_deferred(deferred):
    """Outside megatron's train_step (evaluation) megatron's immediate check runs."""
    megatron = Recorder()
    deferred.training = False
    host_syncs._deferred_validation(megatron)(_machine(rsm.RerunMode.DISABLED),
                                              torch.tensor(float("nan")), torch.isnan, "m")
    assert len(megatron.calls) == 1 and deferred.first == {}
    seen = []
    host_syncs._in_training(lambda: seen.append(deferred.training))()
    assert seen == [True] and deferred.training is False


_TWO_RANKS = r"""
import json, sys, types
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, path, out):
    import megatron.training.global_vars as global_vars
    from megatron_sat import host_syncs

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    global_vars.get_args = lambda: types.SimpleNamespace(curr_iteration=4)
    checks = host_syncs.DEFERRED
    checks.enabled = True
    if rank == 0:  # only rank 0 sees the NaN (its own loss); rank 1's values are finite
        checks.defer(torch.tensor(float("nan")), torch.isnan, "loss is NaN", 3)
    checks.defer(torch.tensor(1.0), torch.isinf, "norm is Inf", 4)
    before = checks.skip_flag("cpu").item()
    checks.agree()
    try:
        checks.check("a test")
        error = None
    except RuntimeError as e:
        error = str(e)
    json.dump({"before": before, "after": checks.skip_flag("cpu").item(), "error": error},
              open(f"{out}{rank}", "w"))


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], sys.argv[2]), nprocs=2)
    print(json.dumps([json.load(open(f"{sys.argv[2]}{r}")) for r in range(2)]))
"""


def test_deferred_checks_agree_across_ranks(tmp_path):
    """Two gloo ranks, a NaN on rank 0 only: after ``agree`` both skip the update, and
    both raise at the same check, rank 1 pointing to the other rank's error."""
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "store"),
                          str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    first, second = json.loads(run.stdout.strip().splitlines()[-1])
    assert (first["before"], second["before"]) == (1.0, 0.0)
    assert first["after"] == second["after"] == 1.0
    assert "iteration 3: Unexpected result nan (message='loss is NaN')" in first["error"]
    assert "another rank found a NaN/Inf at iteration 3" in second["error"]


@pytest.mark.parametrize("mode,rejection,fatal", [
    # megatron's default: the rerun machine replays the iteration before the update
    (rsm.RerunMode.VALIDATE_RESULTS, torch.isnan, True),
    (rsm.RerunMode.REPORT_DETERMINISM_STATS, torch.isnan, True),
    (rsm.RerunMode.DISABLED, torch.isnan, False),  # a warning, not an error
    (rsm.RerunMode.DISABLED, lambda x: x > 10, True),  # e.g. the large-gradient check
])
def test_deferral_leaves_other_modes_and_validations_to_megatron(deferred, mode, rejection,
                                                                 fatal):
    megatron = Recorder()
    machine = _machine(mode)
    host_syncs._deferred_validation(megatron)(machine, torch.tensor(1.0), rejection, "m",
                                              fatal=fatal)
    assert len(megatron.calls) == 1 and deferred.first == {}


def test_deferral_is_enabled_only_for_fused_torch_adams_without_reruns(monkeypatch):
    """It needs ``found_inf`` (torch's fused Adam) in every inner optimizer, and megatron's
    ``--rerun-mode disabled``."""
    def built(mode, *inner):
        checks = host_syncs.DeferredChecks()
        monkeypatch.setattr(host_syncs, "DEFERRED", checks)
        monkeypatch.setattr(rsm, "get_rerun_state_machine", lambda: _machine(mode))
        optimizer = types.SimpleNamespace(step=lambda: None, chained_optimizers=[
            types.SimpleNamespace(optimizer=opt) for opt in inner])
        host_syncs._with_adam_hooks(lambda: optimizer)()
        return checks.enabled, [getattr(opt, "found_inf", None) for opt in inner]

    def adam(**kwargs):
        return torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], **kwargs)

    enabled, flags = built(rsm.RerunMode.DISABLED, adam(fused=True), adam(fused=True))
    assert enabled and flags[0] is flags[1] and flags[0].item() == 0.0
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=1.0)
    for mode, inner in ((rsm.RerunMode.VALIDATE_RESULTS, [adam(fused=True)]),
                        (rsm.RerunMode.DISABLED, [adam(fused=True), adam(foreach=True)]),
                        (rsm.RerunMode.DISABLED, [adam(fused=True), sgd])):
        assert built(mode, *inner) == (False, [None] * len(inner))


def _clip_case(monkeypatch, norm_scale):
    """Two parameters of one fused AdamW registered for clipping, gradients scaled so that
    their norm is ``norm_scale`` times the clipping threshold 1.0."""
    monkeypatch.setattr(host_syncs, "_ADAM_OF", {})
    monkeypatch.setattr(host_syncs, "DEFERRED", host_syncs.DeferredChecks())
    gen = torch.Generator().manual_seed(1)
    starts = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    grads = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    grads = [g * (norm_scale / norm) for g in grads]
    params = [torch.nn.Parameter(p.clone()) for p in starts]
    adam = torch.optim.AdamW(params, lr=0.1, eps=0.5, fused=True)  # eps: scale matters
    host_syncs._with_adam_hooks(lambda: types.SimpleNamespace(optimizer=adam, step=adam.step))()
    for p, g in zip(params, grads):
        p.grad = g.clone()
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).reshape(1)
    return starts, grads, params, adam, norm


@pytest.mark.parametrize("norm_scale", [4.0, 0.5])
def test_clipping_inside_fused_adam_equals_megatrons_clip_then_step(monkeypatch, norm_scale):
    """Clipped (norm 4 > 1) or not (0.5): the same update as megatron's device-coefficient
    clipping (``grads *= min(1, 1 / (norm + 1e-6))``) followed by the plain fused step, to
    float32 rounding; no gradient is touched before the step and nothing is read."""
    starts, grads, params, adam, norm = _clip_case(monkeypatch, norm_scale)
    megatron = Recorder()
    with monkeypatch.context() as reads:
        for name in ("item", "__bool__", "tolist"):
            reads.setattr(torch.Tensor, name, _no_read)
        host_syncs._clip_in_adam(megatron)(params, 1.0, norm)
    assert megatron.calls == [] and all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    adam.step()
    reference = [torch.nn.Parameter(p.clone()) for p in starts]
    coefficient = torch.clamp(1.0 / (norm + 1e-6), max=1.0)
    for p, g in zip(reference, grads):
        p.grad = g * coefficient
    torch.optim.AdamW(reference, lr=0.1, eps=0.5, fused=True).step()
    for got, want in zip(params, reference):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert not torch.equal(params[0], starts[0])


def test_clipping_falls_back_to_megatron_unless_it_is_all_of_one_fused_adam(monkeypatch):
    starts, grads, params, adam, norm = _clip_case(monkeypatch, 4.0)
    megatron = Recorder()
    clip = host_syncs._clip_in_adam(megatron)
    stranger = torch.nn.Parameter(torch.ones(2))
    stranger.grad = torch.ones(2)
    cases = [([params[0]], norm, False),  # a subset: Adam's scale would reach the rest
             (params + [stranger], norm, False),  # not Adam's
             (params, 2.5, False),  # a host norm (megatron's own path)
             (params, norm, True)]  # decoupled gradients
    adam.grad_scale = torch.tensor(4.0)  # an earlier step's, in Adam
    for parameters, total, decoupled in cases:
        clip(parameters, 1.0, total, use_decoupled_grad=decoupled)
    assert [call[0][0] for call in megatron.calls] == [c[0] for c in cases]
    assert adam.grad_scale is None  # megatron scaled: not again in Adam


def _training_log(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale,
                  report_memory_flag, skipped_iter, grad_norm, params_norm, num_zeros_in_grad,
                  max_attention_logit, pg_collection=None, is_first_iteration=False):
    """megatron's signature; records what it was given."""
    _training_log.calls.append((iteration, dict(loss_dict), skipped_iter))


@pytest.mark.parametrize("iteration,first,skipped,writer,fast", [
    (5, False, 0, None, True),  # neither a log line nor a TensorBoard write
    (8, False, 0, None, False),  # a log line (every 4)
    (1, True, 0, None, False),  # megatron logs the first iteration
    (6, False, 0, "tb", False),  # a TensorBoard write (every 2)
    (5, False, 1, None, False),  # a skipped iteration: megatron reads the losses anyway
])
def test_loss_sums_skip_megatrons_host_copy_only_where_nothing_is_logged(
        deferred, monkeypatch, iteration, first, skipped, writer, fast):
    import megatron.training.global_vars as global_vars

    deferred.args.__dict__.update(log_interval=4, tensorboard_log_interval=2, train_iters=20)
    deferred.enabled = False  # the log line's own check reads; not this test's subject
    monkeypatch.setattr(global_vars, "get_tensorboard_writer", lambda: writer)
    _training_log.calls = []
    wrapped = host_syncs._training_log_without_reads(_training_log)
    losses = {"lm loss": torch.tensor(2.5), "sat omission rate": torch.tensor(0.5)}
    totals = {"lm loss": torch.tensor([1.0]), "advanced iterations": 3}
    with monkeypatch.context() as reads:
        for name in ("item", "__bool__", "tolist"):
            reads.setattr(torch.Tensor, name, _no_read)
        wrapped(losses, totals, 1e-4, iteration, 1.0, False, skipped, torch.tensor(0.5), None,
                None, 0, is_first_iteration=first)
    assert _training_log.calls == [(iteration, {} if fast else losses, skipped)]
    if fast:  # megatron's sums: the running one, or 0 + the loss
        assert torch.equal(totals["lm loss"], torch.tensor([3.5]))
        assert torch.equal(totals["sat omission rate"], torch.tensor([0.5]))
    else:
        assert set(totals) == {"lm loss", "advanced iterations"}


@pytest.mark.e2e
def test_loss_sums_logged_are_megatrons(tmp_path):
    """The log lines' averages over 4 iterations are the same digits whether megatron sums
    every loss itself (TensorBoard written every iteration) or the sums of the 3 silent
    iterations of each window are added by ``host_syncs``."""
    flags = ["--log-interval", "4", "--sat-omission-rate", "0.5"]
    ours = pretrain(1, flags + ["--tensorboard-log-interval", "4"], tmp_path / "ours")
    megatron = pretrain(1, flags, tmp_path / "megatron")
    assert ours.returncode == 0 and megatron.returncode == 0, ours.output[-3000:]
    assert sorted(ours.printed) == [1, 4, 8, 12]
    assert ours.printed == megatron.printed
    rates = {line.split("sat omission rate: ")[1].split(" ")[0]
             for line in ours.output.splitlines() if "sat omission rate: " in line}
    assert rates == {"5.000000E-01"}  # the second loss key is averaged too


_INSTALL = r"""
import json
import megatron.core.optimizer.clip_grads as clip_grads
import megatron.core.optimizer.optimizer as optimizers
import megatron.core.rerun_state_machine as rerun
import megatron.training.training as training
from megatron_sat import host_syncs, torch_fusions

first, second = host_syncs.apply(), host_syncs.apply()
print(json.dumps({"first": first, "second": second, "wrapped": [
    training.reduce_max_stat_across_model_parallel_group.__wrapped__.__module__,
    training.logical_and_across_model_parallel_group.__wrapped__.__name__,
    optimizers.MixedPrecisionOptimizer.__init__.__wrapped__.__qualname__,
    optimizers.FP32Optimizer.__init__.__wrapped__.__qualname__,
    optimizers.clip_grad_by_total_norm_fp32.__wrapped__.__module__,
    rerun.RerunStateMachine.validate_result.__wrapped__.__qualname__,
    training.get_megatron_optimizer.__wrapped__.__name__,
    training.training_log.__wrapped__.__name__,
    training.save_checkpoint.__wrapped__.__name__],
    "tensor_scale": clip_grads.multi_tensor_scale_tensor_impl is torch_fusions.scale_tensors,
}))
"""


def test_apply_installs_into_megatrons_training_loop_once():
    """In a fresh process: ``apply`` changes megatron's module attributes for good."""
    rec = run_snippet(_INSTALL, timeout=300)
    assert len(rec["first"]) == 5 and rec["second"] == []
    assert rec["wrapped"] == ["megatron.training.utils.common_utils",
                              "logical_and_across_model_parallel_group",
                              "MixedPrecisionOptimizer.__init__", "FP32Optimizer.__init__",
                              "megatron.core.optimizer.clip_grads",
                              "RerunStateMachine.validate_result", "get_megatron_optimizer",
                              "training_log", "save_checkpoint"]
    assert rec["tensor_scale"]  # megatron keeps the gradient norm on the device
