"""megatron_fixes fix 3: a compiled fusion gets a static kernel per SAT width."""

from __future__ import annotations

import torch
from torch._dynamo.testing import CompileCounter

from megatron_sat import megatron_fixes


def _compile_three_widths() -> CompileCounter:
    torch._dynamo.reset()
    counter = CompileCounter()

    @torch.compile(backend=counter)
    def swiglu(y):  # the shape of megatron's fused SwiGLU
        a, b = torch.chunk(y, 2, -1)
        return torch.nn.functional.silu(a) * b

    for width in (8, 6, 4, 6):  # dense, then three LORS-like widths, one repeated
        swiglu(torch.randn(3, width))
    return counter


def test_every_width_compiles_a_static_graph_once():
    saved = (torch._dynamo.config.automatic_dynamic_shapes,
             torch._dynamo.config.recompile_limit)
    try:
        torch._dynamo.config.automatic_dynamic_shapes = True
        torch._dynamo.config.recompile_limit = 8
        # torch's default: the second width recompiles for dynamic shapes, then reuses it
        assert _compile_three_widths().frame_count == 2
        megatron_fixes._static_shape_fusions()
        assert torch._dynamo.config.recompile_limit >= megatron_fixes.RECOMPILE_LIMIT
        # fixed: one static graph per distinct width, the repeated width reuses its own
        assert _compile_three_widths().frame_count == 3
    finally:
        (torch._dynamo.config.automatic_dynamic_shapes,
         torch._dynamo.config.recompile_limit) = saved
        torch._dynamo.reset()


class _Chunk(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.moved_to = None

    def cuda(self, device=None):  # record instead of moving: no GPU in CI
        self.moved_to = device
        return self


def test_cpu_initialised_chunks_move_to_the_gpu_before_wrapping(monkeypatch):
    """Fix 4: megatron 0.19.2's builder skips .cuda() under --use-cpu-initialization."""
    from types import SimpleNamespace

    import megatron.training
    wrapped_devices = []

    def mp_wrapper(model_list, config, *args):
        wrapped_devices.extend(chunk.moved_to for chunk in model_list)
        return model_list

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(megatron.training, "get_args",
                        lambda: SimpleNamespace(use_torch_fsdp2=False))
    fixed = megatron_fixes._on_gpu_first(mp_wrapper)
    fixed([_Chunk()], SimpleNamespace(use_cpu_initialization=True))
    fixed([_Chunk()], SimpleNamespace(use_cpu_initialization=False))  # megatron moved it
    assert wrapped_devices == [3, None]
