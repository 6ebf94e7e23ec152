"""Run megatron-core's training stack on a machine without a GPU (gloo backend).

:func:`enable_cpu_mode` is for tests and development only. It does nothing when CUDA is
available, so the GPU path is never touched. Without a GPU it installs, once:

* stubs for the ``torch.cuda`` functions that megatron calls unconditionally (streams,
  events, memory statistics, device selection, RNG state), backed by the CPU;
* a :class:`torch.overrides.TorchFunctionMode` that turns ``device="cuda"`` into the CPU
  and makes ``Tensor.cuda()`` a no-op;
* a few patches of megatron itself, each named and explained where it is made.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from megatron.core.tensor_parallel.random import CudaRNGStatesTracker
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_enabled = False


def enable_cpu_mode() -> None:
    """Make megatron's ``pretrain()`` run on CPU with gloo. Idempotent; no-op with CUDA."""
    global _enabled
    if _enabled or torch.cuda.is_available():
        return
    _enabled = True
    # Megatron asserts this for TP > 1 (it orders GPU kernels; meaningless on CPU).
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    # torch.compile'd fusions would invoke the C++ compiler on every new shape; run eagerly.
    torch._dynamo.config.disable = True
    _stub_torch_cuda()
    _patch_torch_distributed()
    _patch_data_loader()
    _patch_megatron()
    # Entered for the rest of the process: every factory call with device="cuda" lands on cpu.
    _CudaIsCpu().__enter__()


def _returns(value):
    """A new function that ignores its arguments and returns ``value``."""

    def stub(*args, **kwargs):
        return value

    return stub


class _Stream:
    """Stands in for ``torch.cuda.Stream`` and ``torch.cuda.Event``: CPU work is in order."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):  # wait_stream, record_event, synchronize, query, ...
        return _returns(True if name == "query" else None)

    def elapsed_time(self, other) -> float:
        return 0.0


def _stub_torch_cuda() -> None:
    cuda = torch.cuda
    # Megatron places tensors on torch.cuda.current_device(); that is the CPU here.
    cuda.current_device = _returns(_CPU)
    # One "device" per process, so megatron sets up model-parallel groups and seeds.
    cuda.device_count = _returns(1)
    # Device selection, streams, events and synchronisation have no CPU meaning.
    cuda.set_device = _returns(None)
    cuda.synchronize = _returns(None)
    cuda.Stream = _Stream
    cuda.Event = _Stream
    cuda.current_stream = _returns(_Stream())
    cuda.stream = _returns(contextlib.nullcontext())
    # Memory statistics (megatron's memory report) and cache control: nothing in use.
    cuda.empty_cache = _returns(None)
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved",
                 "max_memory_reserved"):
        setattr(cuda, name, _returns(0))
    # The "CUDA" generator is the CPU one: dropout draws from it, megatron seeds it and
    # saves/restores it in checkpoints.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))


def _patch_torch_distributed() -> None:
    import torch.distributed as dist

    init = dist.init_process_group

    @functools.wraps(init)
    def init_gloo(*args, **kwargs):
        # NCCL needs GPUs; gloo runs every collective megatron uses on CPU tensors.
        kwargs["backend"] = "gloo"
        return init(*args, **kwargs)

    dist.init_process_group = init_gloo


def _patch_data_loader() -> None:
    init = torch.utils.data.DataLoader.__init__

    @functools.wraps(init)
    def init_own_generator(self, *args, generator=None, **kwargs):
        # Each DataLoader iterator draws a seed from the default generator, which here is
        # also the "CUDA" one (dropout). Megatron builds its iterators after loading a
        # checkpoint, so that draw would shift dropout and break exact resume.
        init(self, *args, generator=generator or torch.Generator(), **kwargs)

    torch.utils.data.DataLoader.__init__ = init_own_generator


def _patch_megatron() -> None:
    import megatron.core.tensor_parallel.random as mp_random
    import megatron.training.arguments as arguments
    import megatron.training.initialize as initialize
    import megatron.training.training as training

    # pretrain() asserts torch.cuda.is_available() unless allow_no_cuda is passed.
    training.initialize_megatron = functools.partial(
        initialize.initialize_megatron, allow_no_cuda=True)
    # The JIT warm-up draws random tensors "on the GPU"; here they would come from the
    # generator that --use-cpu-initialization uses, by amounts that depend on TP.
    initialize._warmup_jit_function = _returns(None)
    # validate_args reads the GPU's compute capability for TP > 1; report 8 (Ampere).
    arguments.get_device_arch_version = _returns(8)
    # The tensor-parallel RNG tracker swaps "CUDA" generator states: use the CPU ones.
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    mp_random.CudaRNGStatesTracker = _CpuRNGStatesTracker


class _CudaIsCpu(TorchFunctionMode):
    """Maps ``device="cuda"`` to the CPU, makes ``.cuda()`` a no-op, and reports CUDA
    tensor type names (megatron's optimizers check ``param.type() == "torch.cuda..."``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = _CPU
        return func(*args, **kwargs)


class _CpuRNGStatesTracker(CudaRNGStatesTracker):
    """Megatron's RNG tracker, forking the CPU generator instead of the CUDA one.

    The base class warns when the CPU state changes inside a fork, which is always the
    case here; this fork swaps the CPU state in and out without that check.
    """

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"cuda rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)
