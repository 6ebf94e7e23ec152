"""Fixes for megatron-core 0.19.2 bugs that also hit GPU users of a plain pip install.

:func:`apply` installs them once; each leaves megatron's behaviour unchanged where the
bug cannot occur.

1. ``megatron.core.datasets.utils.compile_helpers`` (called by ``initialize_megatron``)
   runs ``make`` in the installed package, which ships the compiled
   ``helpers_cpp`` extension but no Makefile, so start-up fails. Replaced by an import
   check: a no-op when ``helpers_cpp`` imports, a clear error otherwise.

2. ``DistributedOptimizer`` with torch's Adam/AdamW (used when neither Apex nor
   Transformer Engine is installed) cannot resume from a checkpoint exactly, or at all:

   a. ``DistributedOptimizer.state_dict`` asserts ``len(steps) == 1`` over the per-param
      ``step`` entries, but torch creates those lazily in the first ``step()``, so loading
      a checkpoint into a fresh optimizer fails. Wrapped to first create that state exactly
      as torch's first step would (``step`` 0, zero moments), which changes no result.
   b. ``DistributedOptimizer.load_state_dict`` installs the checkpoint's ``step`` as one
      tensor shared by all parameters, which torch then increments in place once per
      parameter per step. Wrapped to give every parameter its own ``step`` tensor holding
      the checkpoint's step (saved in the param groups; megatron asserts there is one).
   c. ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies the loaded
      parameter state into the optimizer, ``step`` included: with the default
      ``dp_reshardable`` checkpoint format that ``step`` is the pre-load value (so the run
      resumes at step 0 and drifts), with ``--ckpt-format torch`` it is missing
      (``KeyError: 'step'``). And in fp32, where the main parameters are views of the
      model parameters, the copy runs with autograd on ("a view of a leaf Variable that
      requires grad is being used in an in-place operation"). Wrapped to run under
      ``torch.no_grad()`` and to leave ``step`` to (b).

3. megatron's fused SwiGLU (``jit_fuser`` = ``torch.compile``) meets a second input
   width as soon as SAT changes the kept MLP width (r > 0, every LORS ladder, dense
   evaluation). torch then recompiles it for *dynamic* shapes, and the generic kernel
   is several times slower: on an H100 the dense SwiGLU backward of TinyLlama took
   18 ms per micro-batch after the switch against 2 ms for the static kernel at half width
   (benchmarks/results, docs/performance.md). Turned off automatic dynamic shapes, so
   every width gets its own static kernel, and raised the recompile limit to leave room
   for one width per LORS ladder.

4. ``--use-cpu-initialization`` on a GPU (the way to get the same initial weights at any
   TP size): the model builder of megatron.training 0.19.2
   (``models/dist_utils.unimodal_build_distributed_models``) skips moving the model to
   the GPU whenever that flag is set, not only under FSDP2 as ``training.get_model``
   does, so the optimizer then fails with "Wrapped parameters must be one of
   torch.cuda.FloatTensor ...". Wrapped the step that follows (the mixed-precision
   wrapper) to move the chunks to the current GPU first, as ``get_model`` would.
"""

from __future__ import annotations

import functools
import importlib

import torch
import megatron.core.datasets.utils as dataset_utils
import megatron.training.models.dist_utils as dist_utils
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

_applied = False


def apply() -> None:
    """Install the fixes. Idempotent."""
    global _applied
    if _applied:
        return
    _applied = True
    dataset_utils.compile_helpers = _check_dataset_helpers
    DistributedOptimizer.state_dict = _with_torch_adam_state(DistributedOptimizer.state_dict)
    DistributedOptimizer.load_state_dict = _with_checkpoint_step(
        DistributedOptimizer.load_state_dict)
    DistributedOptimizer._set_main_param_and_optimizer_states = _without_step_no_grad(
        DistributedOptimizer._set_main_param_and_optimizer_states)
    _static_shape_fusions()
    dist_utils._wrap_with_mp_wrapper = _on_gpu_first(dist_utils._wrap_with_mp_wrapper)


# A few compiled fusions (SwiGLU forward and backward) times one width per rate.
RECOMPILE_LIMIT = 64


def _on_gpu_first(wrap_with_mp_wrapper):
    """Fix 4: CPU-initialised model chunks go to the GPU before they are wrapped."""

    @functools.wraps(wrap_with_mp_wrapper)
    def wrapper(model_list, transformer_config, *args, **kwargs):
        from megatron.training import get_args
        if (transformer_config.use_cpu_initialization and torch.cuda.is_available()
                and not getattr(get_args(), "use_torch_fsdp2", False)):
            for chunk in model_list:
                if not any(p.is_meta for p in chunk.parameters()):
                    chunk.cuda(torch.cuda.current_device())
        return wrap_with_mp_wrapper(model_list, transformer_config, *args, **kwargs)

    return wrapper


def _static_shape_fusions() -> None:
    """Compile megatron's fusions once per SAT width, never for dynamic shapes (fix 3)."""
    config = torch._dynamo.config
    config.automatic_dynamic_shapes = False
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)


def _check_dataset_helpers() -> None:
    """Stands in for ``compile_helpers``: the helpers ship compiled, nothing to build."""
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
    except ImportError as error:
        raise RuntimeError(
            "megatron-core's compiled dataset helpers (megatron.core.datasets.helpers_cpp) "
            f"do not import ({error}); reinstall megatron-core from a wheel built for this "
            "Python and platform") from error


def _is_torch_adam(optimizer) -> bool:
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def _with_torch_adam_state(state_dict):
    @functools.wraps(state_dict)
    def wrapper(self):
        if _is_torch_adam(self.optimizer):
            for group in self.optimizer.param_groups:
                on_device = group.get("capturable") or group.get("fused")
                for param in group["params"]:
                    state = self.optimizer.state[param]
                    if not state:  # what torch.optim.Adam(W) creates in its first step
                        state["step"] = torch.zeros(
                            (), dtype=torch.float32, device=param.device if on_device else None)
                        state["exp_avg"] = torch.zeros_like(param)
                        state["exp_avg_sq"] = torch.zeros_like(param)
        return state_dict(self)

    return wrapper


def _with_checkpoint_step(load_state_dict):
    @functools.wraps(load_state_dict)
    def wrapper(self, state_dict):
        load_state_dict(self, state_dict)
        if not _is_torch_adam(self.optimizer) or "optimizer" not in state_dict:
            return
        steps = {g["step"] for g in state_dict["optimizer"]["param_groups"] if "step" in g}
        if len(steps) == 1:
            (step,) = steps
            for state in self.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):  # keep torch's device, dtype
                    state["step"] = torch.full_like(state["step"], float(step))

    return wrapper


def _without_step_no_grad(set_states):
    @functools.wraps(set_states)
    def wrapper(self, model_param, tensors):
        with torch.no_grad():
            # megatron skips entries that are not tensors
            set_states(self, model_param, {**tensors, "step": None})

    return wrapper
