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
