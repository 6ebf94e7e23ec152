"""Fewer host reads of GPU tensors in megatron-core's training iteration.

Each ``.item()`` (or ``if tensor:``) makes the host wait for everything queued on the GPU;
afterwards the GPU idles while the host issues the next kernels, so every such read between
one iteration's backward and the next forward throws away the lead the host built during
the backward, and the next forward starts host-bound (docs/performance.md, sessions 7
and 8). On one GPU megatron-core 0.19.2 reads the GPU about eleven times per iteration.
:func:`apply` removes the reads of an iteration that neither logs nor writes to
TensorBoard:

1. ``logical_and_across_model_parallel_group`` (was the update applied) and
   ``reduce_max_stat_across_model_parallel_group`` (gradient norm, learning rate for the
   log, and the zero count with ``--log-num-zeros-in-grad``) all-reduce a value over the
   model-parallel group through a GPU tensor and read it back, three or four times per
   iteration. When the group has one rank the all-reduce is the identity: a host value is
   returned as megatron's round trip would return it (the statistics rounded to float32,
   ``-1`` meaning none), without the GPU. A statistic that is a GPU tensor (the gradient
   norm, item 3) stays one: all-reduced on the device when the group has several ranks,
   read only where megatron logs it.
2. **The loss scale**: without a grad scaler (bf16, fp32) megatron's optimizer scales the
   loss by a GPU tensor holding 1.0, and the training loop reads it with ``.item()`` every
   iteration for its log. That tensor is replaced by :class:`HostKnownScalar`, the same
   GPU tensor whose ``item()`` the host answers (the optimizer never changes it).
3. **The gradient norm and clipping on the device**: megatron's gradient clipping keeps
   the norm a GPU tensor and clips by a clamped device coefficient when it has a
   tensor-scale kernel (Transformer Engine's); without one it reads the norm to compare
   it with ``--clip-grad`` on the host. :func:`megatron_sat.torch_fusions.scale_tensors`
   is that kernel. Where the clipped parameters are exactly those of one torch fused Adam,
   no kernel runs at all: the coefficient's inverse becomes that Adam's ``grad_scale``,
   which its one pass divides the gradients by (:func:`_clip_in_adam`).
4. **Deferred NaN/Inf checks** with ``--rerun-mode disabled`` (:class:`DeferredChecks`):
   megatron validates the loss and every gradient bucket's norm (NaN, then Inf) on the
   host, and in that mode only raises an error. The validations are kept on the device
   and read together at the next log line, before every checkpoint save and when
   training ends (also through megatron's exits); until then a rejected value sets torch's
   fused Adam's ``found_inf`` flag -- on every rank, all-reduced before each optimizer
   step -- so that update and all later ones are skipped on the device and the error
   leaves the model and optimizer as megatron's immediate error would: as they were
   before the rejected iteration. Evaluation's validations stay immediate. Only with torch's fused Adam (the torch fusions' default) and
   megatron's plain NaN/Inf validations; in megatron's default ``validate_results`` mode
   the check stays immediate, because the rerun state machine replays a rejected iteration
   before the optimizer step.
5. **The loss sums**: megatron's ``training_log`` adds each iteration's losses to its
   running sums starting from ``torch.tensor([0.0], device='cuda')``, a tensor built from
   host memory, which it builds on every call (a ``dict.get`` default); the copy makes the
   host wait for the whole queued iteration. On iterations that neither log nor write to
   TensorBoard the sums are added here instead, starting from a device-side zero, and
   megatron's function gets no losses (it has nothing else to do with them there).
   TensorBoard's default ``--tensorboard-log-interval 1`` reads the losses every
   iteration anyway: set it to ``--log-interval``.

Installed with the torch fusions (``--no-sat-torch-fusions`` keeps megatron's reads).
"""

from __future__ import annotations

import functools
import inspect
import os

import torch


class HostKnownScalar(torch.Tensor):
    """A GPU tensor holding a constant the host knows: ``item()`` reads no GPU memory.
    Operations on it return plain tensors."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def item(self):
        return self.host_value


def host_known(tensor: torch.Tensor) -> HostKnownScalar:
    """``tensor`` (one element, never modified afterwards) as a :class:`HostKnownScalar`;
    its value is read once, now."""
    scalar = torch.Tensor._make_subclass(HostKnownScalar, tensor)
    scalar.host_value = tensor.item()
    return scalar


def _model_parallel(group):
    from megatron.core import mpu

    return group or mpu.get_model_parallel_group()


def _group_size(group) -> int:
    return torch.distributed.get_world_size(_model_parallel(group))


def _logical_and_on_host(logical_and):
    @functools.wraps(logical_and)
    def wrapper(value, group=None):
        if _group_size(group) > 1:
            return logical_and(value, group=group)
        return value is True  # megatron counts anything but True as False

    return wrapper


def _reduce_max_on_host(reduce_max):
    @functools.wraps(reduce_max)
    def wrapper(stat, group=None):
        if isinstance(stat, torch.Tensor):  # stays on the device; a norm is never -1
            stat = stat.detach().float().reshape(1)
            if _group_size(group) > 1:
                stat = stat.clone()
                torch.distributed.all_reduce(stat, op=torch.distributed.ReduceOp.MAX,
                                             group=_model_parallel(group))
            return stat.reshape(())  # 0-dim: megatron's f"{grad_norm:.3f}" formats it
        if _group_size(group) > 1:
            return reduce_max(stat, group=group)
        if stat is None:
            return None
        as_float32 = torch.tensor(stat, dtype=torch.float32).item()
        return None if as_float32 == -1.0 else as_float32

    return wrapper


def _with_host_known_scale(init, attribute):
    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        init(self, *args, **kwargs)
        scale = getattr(self, attribute, None)
        if isinstance(scale, torch.Tensor) and not isinstance(scale, HostKnownScalar):
            setattr(self, attribute, host_known(scale))

    return wrapper


class DeferredChecks:
    """megatron's fatal NaN/Inf validations, kept on the device and read together (item 4).

    For each validation message, the first iteration whose result was rejected and that
    result live in two device scalars; a rejection also sets the per-device ``skip`` flag
    that torch's fused Adam reads as ``found_inf`` (it then leaves parameters, moments and
    step counts untouched). With several ranks the flag is all-reduced (max) before every
    optimizer step, so a rank whose own values were finite -- but whose gradients the
    reduction made NaN -- skips too, and :meth:`check` agrees on the earliest rejected
    iteration, so that every rank raises at the same point. :meth:`check` reads everything
    in one transfer and raises megatron's error for the earliest rejection.
    """

    def __init__(self):
        self.enabled = False
        self.training = False  # inside megatron's train_step: evaluation is not deferred
        self.skip: dict[torch.device, torch.Tensor] = {}
        self.first: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def skip_flag(self, device) -> torch.Tensor:
        """The float32 flag (0 or 1) for Adam's ``found_inf`` on ``device``."""
        device = torch.device(device)
        if device not in self.skip:
            self.skip[device] = torch.zeros((), dtype=torch.float32, device=device)
        return self.skip[device]

    def defer(self, result: torch.Tensor, rejection_func, message: str, iteration: int):
        result = result.detach().float().reshape(())
        rejected = rejection_func(result)
        flag = self.skip_flag(result.device)
        flag.copy_(flag.logical_or(rejected))
        if message not in self.first:
            self.first[message] = (torch.full((), -1, dtype=torch.int64, device=result.device),
                                   torch.zeros((), dtype=torch.float32, device=result.device))
        first, value = self.first[message]
        newly = rejected & (first < 0)
        first.copy_(torch.where(newly, iteration, first))
        value.copy_(torch.where(newly, result, value))

    def agree(self) -> None:
        """Before an optimizer step: every rank skips if any rank's flag is set (no read)."""
        if self.enabled and _world_size() > 1:
            for flag in self.skip.values():
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)

    def check(self, where: str) -> None:
        """Raise megatron's error for the earliest rejected result (one read; with several
        ranks one all-reduce, which every rank makes at the same points)."""
        if not self.enabled:
            return
        device = next(iter(self.skip)) if self.skip else torch.device("cpu")
        never = 2 ** 52  # no such iteration; exact through the float64 read
        firsts = [first for first, _ in self.first.values()]
        earliest = torch.stack([torch.where(f >= 0, f, never) for f in firsts]).min() \
            if firsts else torch.tensor(never, device=device)
        if _world_size() > 1:
            earliest = earliest.to(device).clone()
            torch.distributed.all_reduce(earliest, op=torch.distributed.ReduceOp.MIN)
        rows = torch.stack([torch.stack([first.double(), value.double()])
                            for first, value in self.first.values()]
                           + [torch.stack([earliest.double().to(device)] * 2)]).tolist()
        iteration = int(rows.pop()[0])
        if iteration == never:
            return
        mine = [(int(first), i, value) for i, (first, value) in enumerate(rows)
                if first == iteration]
        if not mine:
            raise RuntimeError(
                f"Rank {_rank()}: another rank found a NaN/Inf at iteration {iteration} "
                f"(found at {where}; its error names the check). {_DEFERRED_HELP}"
                .format(iteration=iteration))
        _, i, value = mine[0]
        message = list(self.first)[i]
        _log_to_tracker_file(iteration, value, message)
        raise RuntimeError(
            f"Rank {_rank()}, node {os.uname()[1]}, iteration {iteration}: Unexpected result "
            f"{value} (message='{message}'). Found at {where}. {_DEFERRED_HELP}"
            .format(iteration=iteration))


_DEFERRED_HELP = (
    "With --rerun-mode disabled megatron-sat checks NaN/Inf at log lines, checkpoint saves "
    "and the end of training, and skipped the optimizer updates from iteration "
    "{iteration} on, so the model and optimizer state are those before it and no "
    "checkpoint holds a later update. --rerun-mode validate_results checks every iteration.")


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _log_to_tracker_file(iteration: int, value: float, message: str) -> None:
    """megatron's ``--result-rejected-tracker-filename`` line, numbered as megatron would
    have numbered the rejected iteration (its reruns skip iterations by that number)."""
    from megatron.core.rerun_state_machine import (RerunValidationStatus,
                                                   get_rerun_state_machine)
    from megatron.training.global_vars import get_args

    machine = get_rerun_state_machine()
    now, counter = get_args().curr_iteration + 1, machine.current_iteration
    machine.current_iteration = counter - (now - iteration)
    try:
        machine._log_validation_error_to_file(
            status=RerunValidationStatus.RERUN_DISABLED, result=value, message=message)
    finally:
        machine.current_iteration = counter


DEFERRED = DeferredChecks()


def _deferred_validation(validate_result):
    @functools.wraps(validate_result)
    def wrapper(self, result, rejection_func, message, comparison_func=None,
                tolerance=0.0, fatal=True):
        from megatron.core.rerun_state_machine import RerunMode
        from megatron.training.global_vars import get_args

        if (DEFERRED.enabled and DEFERRED.training and self.mode == RerunMode.DISABLED
                and fatal and rejection_func in (torch.isnan, torch.isinf)
                and isinstance(result, torch.Tensor) and result.numel() == 1):
            # numbered as megatron's log lines number iterations
            DEFERRED.defer(result, rejection_func, message, get_args().curr_iteration + 1)
            return
        validate_result(self, result, rejection_func, message, comparison_func, tolerance,
                        fatal)

    return wrapper


def _in_training(train_step):
    """megatron's ``train_step``: the validations inside it may be deferred."""
    @functools.wraps(train_step)
    def wrapper(*args, **kwargs):
        DEFERRED.training = True
        try:
            return train_step(*args, **kwargs)
        finally:
            DEFERRED.training = False

    return wrapper


def _checked_after(train):
    """megatron's ``train``, which may also end in ``sys.exit`` (exit interval, duration,
    signal): the deferred check runs however it ends."""
    @functools.wraps(train)
    def wrapper(*args, **kwargs):
        try:
            return train(*args, **kwargs)
        finally:
            DEFERRED.check("the end of training")

    return wrapper


# id(parameter) -> the fused torch Adam that steps it (ids: tensors compare elementwise;
# the set comparison in _clip_in_adam checks them against the Adam's live parameters)
_ADAM_OF: dict[int, torch.optim.Optimizer] = {}


def _clip_in_adam(clip_grad_by_total_norm):
    """megatron's ``clip_grad_by_total_norm_fp32`` with a device norm: when ``parameters``
    are all the parameters (with gradients) of one fused torch Adam, that Adam divides the
    gradients by 1 / min(1, max_norm / (norm + 1e-6)) -- megatron's coefficient -- in its
    update pass instead of a separate scaling pass; otherwise megatron's function."""
    @functools.wraps(clip_grad_by_total_norm)
    def wrapper(parameters, max_norm, total_norm, use_decoupled_grad=False):
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        with_grads = [p for p in params if p.grad is not None]
        adams = {id(a): a for a in (_ADAM_OF.get(id(p)) for p in with_grads)}
        adam = next(iter(adams.values())) if len(adams) == 1 else None
        if (adam is None or use_decoupled_grad or not isinstance(total_norm, torch.Tensor)
                or {id(p) for p in with_grads} != {
                    id(p) for g in adam.param_groups for p in g["params"]
                    if p.grad is not None}):
            for other in adams.values():  # megatron scales: no earlier coefficient on top
                if other is not None:
                    other.grad_scale = None
            return clip_grad_by_total_norm(parameters, max_norm, total_norm,
                                           use_decoupled_grad)
        coefficient = (max_norm / (total_norm.float() + 1.0e-6)).clamp_max(1.0)
        adam.grad_scale = coefficient.reciprocal().reshape(())
        return None

    return wrapper


def _with_adam_hooks(get_megatron_optimizer):
    """Registers each fused torch Adam's parameters for :func:`_clip_in_adam` and, with
    ``--rerun-mode disabled`` and only fused torch Adams, enables :class:`DeferredChecks`.
    Wraps torch_fusions' fused-Adam wrapper (an Adam not yet fused is left alone)."""
    @functools.wraps(get_megatron_optimizer)
    def wrapper(*args, **kwargs):
        from megatron.core.rerun_state_machine import RerunMode, get_rerun_state_machine

        from megatron_sat.torch_fusions import torch_adams

        optimizer = get_megatron_optimizer(*args, **kwargs)
        stepping = [part for part in getattr(optimizer, "chained_optimizers", [optimizer])
                    if not getattr(part, "is_stub_optimizer", False)]
        adams = [adam for adam in torch_adams(optimizer)
                 if all(group.get("fused") for group in adam.param_groups)]
        for adam in adams:
            for group in adam.param_groups:
                for param in group["params"]:
                    _ADAM_OF[id(param)] = adam
        eligible = (get_rerun_state_machine().mode == RerunMode.DISABLED
                    and len(adams) == len(stepping))  # every stepping part a fused Adam
        if _world_size() > 1:  # once, at set-up: all ranks defer or none does
            agreed = torch.tensor([int(eligible)], device=_device())
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
            eligible = bool(agreed.item())
        if eligible:
            DEFERRED.skip_flag(_device())
            for adam in adams:
                adam.found_inf = DEFERRED.skip_flag(adam.param_groups[0]["params"][0].device)
            step = optimizer.step

            @functools.wraps(step)
            def step_after_agreeing(*args, **kwargs):
                DEFERRED.agree()
                return step(*args, **kwargs)

            optimizer.step = step_after_agreeing
            DEFERRED.enabled = True
        return optimizer

    return wrapper


def _device() -> torch.device:
    """Where megatron keeps this rank's model (the CPU in megatron_sat.cpu's mode)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _checked_before(function, where: str):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        DEFERRED.check(where)
        return function(*args, **kwargs)

    return wrapper


def _training_log_without_reads(training_log):
    """Item 4's check at log lines, and item 5: the loss sums of an iteration that neither
    logs nor writes to TensorBoard are added here, so that megatron's ``training_log`` --
    whose ``total_loss_dict.get(key, torch.tensor([0.0], device='cuda'))`` builds a
    GPU tensor from host memory, a copy the host waits for, on every call -- sees no
    losses on such iterations."""
    signature = inspect.signature(training_log)

    @functools.wraps(training_log)
    def wrapper(*args, **kwargs):
        from megatron.training.global_vars import get_args, get_tensorboard_writer

        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        given, megatron_args = call.arguments, get_args()
        iteration = given["iteration"]
        logs = iteration % megatron_args.log_interval == 0 or given["is_first_iteration"]
        if logs:
            DEFERRED.check(f"the log line of iteration {iteration}")
        writes = (get_tensorboard_writer() is not None
                  and iteration % megatron_args.tensorboard_log_interval == 0)
        if not (logs or writes or given["skipped_iter"]):
            totals = given["total_loss_dict"]
            for key, value in given["loss_dict"].items():  # megatron's sum, without the copy
                start = totals[key] if key in totals else torch.zeros(
                    1, dtype=torch.float, device=value.device)
                totals[key] = start + value
            given["loss_dict"] = {}
        return training_log(*call.args, **call.kwargs)

    return wrapper


_applied = False


def apply() -> list[str]:
    """Install 1-5 (once); returns their names."""
    global _applied
    if _applied:
        return []
    _applied = True
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizers
    import megatron.core.rerun_state_machine as rerun
    import megatron.training.checkpointing as checkpointing
    import megatron.training.training as training

    from megatron_sat.torch_fusions import scale_tensors

    installed = ["host-side model-parallel reductions", "host-known loss scale"]
    training.logical_and_across_model_parallel_group = _logical_and_on_host(
        training.logical_and_across_model_parallel_group)
    training.reduce_max_stat_across_model_parallel_group = _reduce_max_on_host(
        training.reduce_max_stat_across_model_parallel_group)
    optimizers.MixedPrecisionOptimizer.__init__ = _with_host_known_scale(
        optimizers.MixedPrecisionOptimizer.__init__, "_scale_one")
    optimizers.FP32Optimizer.__init__ = _with_host_known_scale(
        optimizers.FP32Optimizer.__init__, "_scale")
    if clip_grads.multi_tensor_scale_tensor_impl is None:
        clip_grads.multi_tensor_scale_tensor_impl = scale_tensors
        optimizers.clip_grad_by_total_norm_fp32 = _clip_in_adam(
            optimizers.clip_grad_by_total_norm_fp32)
        installed.append("gradient norm and clipping on the device")
    rerun.RerunStateMachine.validate_result = _deferred_validation(
        rerun.RerunStateMachine.validate_result)
    training.get_megatron_optimizer = _with_adam_hooks(training.get_megatron_optimizer)
    training.training_log = _training_log_without_reads(training.training_log)
    training.train_step = _in_training(training.train_step)
    training.train = _checked_after(training.train)
    save = _checked_before(checkpointing.save_checkpoint, "a checkpoint save")
    checkpointing.save_checkpoint = training.save_checkpoint = save
    installed += ["NaN/Inf checks at log lines with --rerun-mode disabled",
                  "loss sums without a host copy"]
    return installed
