"""Fewer host reads of GPU tensors in megatron-core's training iteration.

Each ``.item()`` (or ``if tensor:``) makes the host wait for everything queued on the GPU;
afterwards the GPU idles while the host issues the next kernels, so every such read at the
end of an iteration exposes the host's Python time (docs/performance.md, session 7). On one
GPU, megatron-core 0.19.2 reads the GPU about eleven times per iteration. :func:`apply`
answers on the host the reads whose value the host already knows, and merges one check:

1. ``logical_and_across_model_parallel_group`` (was the update applied) and
   ``reduce_max_stat_across_model_parallel_group`` (gradient norm, learning rate for the
   log, and the zero count with ``--log-num-zeros-in-grad``) all-reduce a host value over
   the model-parallel group through a GPU tensor and read it back, three or four times per
   iteration. When the group has one rank the all-reduce is the identity: the value is
   returned as megatron's round trip would return it (the statistics rounded to float32,
   ``-1`` meaning none), without the GPU.
2. **The loss scale**: without a grad scaler (bf16, fp32) megatron's optimizer scales the
   loss by a GPU tensor holding 1.0, and the training loop reads it with ``.item()`` every
   iteration for its log. That tensor is replaced by :class:`HostKnownScalar`, the same
   GPU tensor whose ``item()`` the host answers (the optimizer never changes it).
3. **The gradient NaN/Inf check** (``--check-for-nan-in-loss-and-grad``) with
   ``--rerun-mode disabled``: megatron's DDP validates each bucket's gradient norm twice
   (NaN, then Inf), one read each. The norms of all buckets are read once, as one
   finiteness flag; only when one is not finite does megatron's own check run, with its
   messages. In megatron's default ``validate_results`` mode its check always runs: the
   rerun state machine numbers every call of a message to find the failing one again when
   it reruns the iteration, and skipping the finite calls would shift those numbers.
   Statistics mode, error injection and the large-gradient check keep megatron's path too.

Installed with the torch fusions (``--no-sat-torch-fusions`` keeps megatron's reads).
"""

from __future__ import annotations

import functools

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


def _group_size(group) -> int:
    from megatron.core import mpu

    return torch.distributed.get_world_size(group or mpu.get_model_parallel_group())


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


def _check_grads_once(check_grads):
    @functools.wraps(check_grads)
    def wrapper(self, check_for_nan_or_inf, check_for_large):
        from megatron.core.rerun_state_machine import RerunMode, get_rerun_state_machine

        machine = get_rerun_state_machine()
        fast = (check_for_nan_or_inf and not check_for_large and self.buckets
                and machine.mode == RerunMode.DISABLED
                and not machine.error_injector.should_inject_errors)
        if fast:
            norms = torch.stack([bucket.grad_data.norm(p=2) for bucket in self.buckets])
            if bool(torch.isfinite(norms).all()):
                return
        check_grads(self, check_for_nan_or_inf, check_for_large)

    return wrapper


_applied = False


def apply() -> list[str]:
    """Install 1-3 (once); returns their names."""
    global _applied
    if _applied:
        return []
    _applied = True
    import megatron.core.distributed.param_and_grad_buffer as buffers
    import megatron.core.optimizer.optimizer as optimizers
    import megatron.training.training as training

    training.logical_and_across_model_parallel_group = _logical_and_on_host(
        training.logical_and_across_model_parallel_group)
    training.reduce_max_stat_across_model_parallel_group = _reduce_max_on_host(
        training.reduce_max_stat_across_model_parallel_group)
    optimizers.MixedPrecisionOptimizer.__init__ = _with_host_known_scale(
        optimizers.MixedPrecisionOptimizer.__init__, "_scale_one")
    optimizers.FP32Optimizer.__init__ = _with_host_known_scale(
        optimizers.FP32Optimizer.__init__, "_scale")
    group = buffers._ParamAndGradBucketGroup
    group.check_grads = _check_grads_once(group.check_grads)
    return ["host-side model-parallel reductions", "host-known loss scale",
            "one read for the gradient NaN/Inf check with --rerun-mode disabled"]
