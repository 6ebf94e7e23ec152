"""The sparse layers' kernels against plain references.

``SubsetMatmul``: forward, input gradient and the kept slice's weight gradient, added into
an fp32 ``main_grad`` (megatron DDP) or returned as a dense ``.grad``, against autograd of
the dense slice; a :class:`KeptSlice` serving several micro-batches sums their gradients
and hands them to ``main_grad`` after the last. The Triton scatter of the kept rows' slice (``fused_scatter``) against
torch's ``index_add_`` / ``index_copy_``, in Triton's CPU interpreter. The ``cuda`` tests run on
a GPU only (``benchmarks/run_h100.sh OUT check``): the weight gradient through the
fp32-result GEMM, for rows and columns, and the scatter at model shapes. The selection
kernels are tested in ``tests/test_fused_selection.py``; accumulation over micro-batches
in megatron's DDP buffer in ``tests/test_sparse_layers.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from _tools import run_interpreted

from megatron_sat import sparse_linear
from megatron_sat.sparse_linear import KeptSlice, SubsetMatmul

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _subset(x, weight, index, dim, kept=None):
    """``SubsetMatmul`` of a fresh :class:`KeptSlice` (one backward per slice) or ``kept``."""
    return SubsetMatmul.apply(x, weight, kept if kept is not None else KeptSlice(weight, index, dim))


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("with_main_grad", [False, True])
def test_subset_matmul_matches_autograd_of_the_dense_slice(dim, with_main_grad):
    torch.manual_seed(0)
    weight = torch.randn(10, 12, dtype=torch.float64)
    index = torch.tensor([1, 4, 5, 9]) if dim == 0 else torch.tensor([0, 3, 7, 8, 11, 2])
    x = torch.randn(3, 5, 12 if dim == 0 else index.numel(), dtype=torch.float64)
    w = weight.clone().requires_grad_()
    if with_main_grad:
        w.main_grad = torch.full_like(weight, 0.5)
    xa = x.clone().requires_grad_()
    y = _subset(xa, w, index, dim)
    xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
    yr = xr @ wr.index_select(dim, index).t()
    g = torch.randn_like(yr)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(xa.grad, xr.grad)
    if with_main_grad:
        assert w.grad is None  # no full-size weight gradient
        got = w.main_grad - 0.5
    else:
        got = w.grad
    torch.testing.assert_close(got, wr.grad)
    omitted = torch.ones(weight.shape[dim], dtype=torch.bool)
    omitted[index] = False
    assert torch.all(got.index_select(dim, omitted.nonzero().flatten()) == 0)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("tokens", [1, 15])
def test_slice_is_held_only_where_the_omitted_activations_pay_for_it(dim, tokens):
    """The gathered slice (4 x 12 or 10 x 6 values) is held from the forward to the
    backward only where the activations the layer omits (tokens x 6) are at least as
    large: at 15 tokens, not at 1, where the backward gathers it again. Three micro-batches
    share one slice; the gradients match the dense slice's either way."""
    torch.manual_seed(3)
    weight = torch.randn(10, 12, dtype=torch.float64)
    index = torch.tensor([1, 4, 5, 9]) if dim == 0 else torch.tensor([0, 3, 7, 8, 11, 2])
    w = weight.clone().requires_grad_()
    w.main_grad = torch.zeros_like(weight)
    kept = KeptSlice(w, index, dim, micro_batches=3)
    want = torch.zeros_like(weight)
    for step in range(3):
        x = torch.randn(tokens, 12 if dim == 0 else index.numel(), dtype=torch.float64)
        xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = _subset(xa, w, index, dim, kept)
        assert (kept.weight is not None) == (tokens == 15), step  # held, or released
        wr = weight.clone().requires_grad_()
        yr = xr @ wr.index_select(dim, index).t()
        g = torch.randn_like(yr)
        y.backward(g)
        yr.backward(g)
        want += wr.grad
        torch.testing.assert_close(y, yr)
        torch.testing.assert_close(xa.grad, xr.grad)
    assert kept.spent and kept.weight is None
    torch.testing.assert_close(w.main_grad, want)


@cuda
@pytest.mark.parametrize("micro_batches", [1, 3])
@pytest.mark.parametrize("dim", [0, 1])
def test_cuda_subset_matmul_weight_gradient_is_accumulated_in_fp32(dim, micro_batches):
    """bf16 GEMMs with an fp32 result (the first micro-batch) and fp32 accumulation (the
    next ones) into the slice's sum, handed to ``main_grad`` after the last: never rounded
    to bf16."""
    torch.manual_seed(0)
    index = torch.randperm(512 if dim == 0 else 256, device="cuda")[:200].sort().values
    weight = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight.main_grad = torch.randn(512, 256, device="cuda", dtype=torch.float32)
    before = weight.main_grad.double()
    kept = KeptSlice(weight, index, dim, micro_batches)
    want = before.clone()
    for step in range(micro_batches):
        assert torch.equal(weight.main_grad.double(), before)  # nothing handed over yet
        x = torch.randn(8192, 256 if dim == 0 else 200, device="cuda", dtype=torch.bfloat16)
        y = _subset(x, weight, index, dim, kept)
        g = torch.randn_like(y)
        y.backward(g)
        if dim == 0:
            want[index] += g.double().t() @ x.double()
        else:
            want[:, index] += g.double().t() @ x.double()
    err = (weight.main_grad.double() - want).abs().max().item()
    bf16_err = (want.to(torch.bfloat16).double() - want).abs().max().item()
    # omitted rows/columns untouched, bitwise
    assert torch.equal(weight.main_grad.index_fill(dim, index, 0),
                       before.float().index_fill(dim, index, 0))
    assert err < bf16_err / 8, (err, bf16_err)  # fp32 accumulation, never rounded to bf16


@pytest.mark.parametrize("dim", [0, 1])
def test_first_slice_after_zeroing_is_written_then_added(dim):
    """``sat_main_grad_zeroed`` (set by megatron DDP's ``zero_grad_buffer``): the first
    backward writes the kept slice (over the kept positions only) and clears the mark; the
    next one adds."""
    torch.manual_seed(1)
    weight = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([0, 2, 5]) if dim == 0 else torch.tensor([1, 3, 4, 7])
    # not zero, against the mark: the first slice must replace, not add to, what is there
    weight.main_grad = torch.full((6, 8), 100.0, dtype=torch.float64)
    weight.sat_main_grad_zeroed = True
    want = torch.full((6, 8), 100.0, dtype=torch.float64).index_fill_(dim, index, 0.0)
    for _ in range(2):
        x = torch.randn(5, 8 if dim == 0 else 4, dtype=torch.float64)
        g = torch.randn(5, 3 if dim == 0 else 6, dtype=torch.float64)
        _subset(x, weight, index, dim).backward(g)
        want.index_add_(dim, index, g.t() @ x)
        assert weight.sat_main_grad_zeroed is False
        torch.testing.assert_close(weight.main_grad, want)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("zeroed", [False, True])
@pytest.mark.parametrize("tokens", [16, 2])
def test_slice_reused_by_micro_batches_sums_where_the_omitted_activations_pay_for_it(
        dim, zeroed, tokens):
    """One :class:`KeptSlice` for three micro-batches. At 16 tokens the layer's omitted
    activations (16 x 3 rows or 16 x 4 columns, 8 bytes each) outweigh the compact sum
    (3 x 8 or 4 x 6, 8 bytes each): ``main_grad`` is untouched by the first two backward
    passes and then holds the sum of all three. At 2 tokens they do not: each backward
    hands its slice over at once. Either way the first hand-over writes over what was
    there if megatron zeroed the buffer, later ones add; omitted rows/columns stay as they
    were; the gathered weight slice is released after the last backward."""
    torch.manual_seed(2)
    weight = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([0, 2, 5]) if dim == 0 else torch.tensor([1, 3, 4, 7])
    start = torch.full((6, 8), 100.0, dtype=torch.float64)
    weight.main_grad = start.clone()
    weight.sat_main_grad_zeroed = zeroed
    kept = KeptSlice(weight, index, dim, micro_batches=3)
    assert torch.equal(kept.weight, weight.detach().index_select(dim, index))
    summed = tokens == 16
    total = torch.zeros(6, 8, dtype=torch.float64)
    for step in range(3):
        assert not kept.spent
        x = torch.randn(tokens, 8 if dim == 0 else 4, dtype=torch.float64)
        g = torch.randn(tokens, 3 if dim == 0 else 6, dtype=torch.float64)
        _subset(x, weight, index, dim, kept).backward(g)
        total.index_add_(dim, index, g.t() @ x)
        assert (kept in sparse_linear._UNFLUSHED) == (summed and step < 2)
        if summed and step < 2:
            assert torch.equal(weight.main_grad, start), step  # nothing handed over yet
        else:
            want = (start.index_fill(dim, index, 0.0) if zeroed else start) + total
            torch.testing.assert_close(weight.main_grad, want)
    assert weight.sat_main_grad_zeroed is False and weight.grad is None
    assert kept.spent and kept.weight is None


def test_layer_gathers_a_new_slice_once_the_last_is_spent():
    """The layer keeps its :class:`KeptSlice` for the index object it was made for until
    the slice's backward passes have all run; a forward after that gathers anew."""
    from megatron_sat.sparse_linear import _SparseLinear

    class Layer(_SparseLinear):
        weight = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)

    layer, index = Layer(), torch.tensor([1, 4])
    layer.kept, layer.reuse_kept = index, True
    sparse_linear.runtime.set_micro_batches(2)
    try:
        first = layer.kept_slice(0)
        for _ in range(2):
            assert layer.kept_slice(0) is first
            _subset(torch.randn(3, 4, dtype=torch.float64), layer.weight, None, 0,
                    first).sum().backward()
        assert first.spent
        second = layer.kept_slice(0)
        assert second is not first and layer.kept_slice(0) is second
        layer.kept = torch.tensor([1, 4])  # a new selection: a new slice, even if equal
        assert layer.kept_slice(0) is not second
        layer.kept = torch.tensor([0, 2])
        with torch.no_grad():  # a recompute's first pass: a slice for one forward, not kept
            assert layer.kept_slice(0) is not layer.kept_slice(0)
    finally:
        sparse_linear.runtime.set_micro_batches(1)


def _ddp_stub(module):
    """The attributes megatron DDP's ``zero_grad_buffer`` and forward pre-hook methods
    use, over ``module``, with no buffers."""
    from types import SimpleNamespace
    return SimpleNamespace(config=SimpleNamespace(), params_with_grad=[], buffers=[],
                           expert_parallel_buffers=[], bucket_groups=[],
                           expert_parallel_bucket_groups=[], module=module,
                           use_forward_hook=True, remove_forward_pre_hook_handles={})


def test_finish_grad_sync_refuses_a_summed_gradient_left_behind():
    """A slice told to expect more backward passes than ran keeps its sum; megatron DDP's
    ``finish_grad_sync`` (before the optimizer step) then fails instead of stepping
    without it. The next iteration's ``zero_grad_buffer`` drops the abandoned sum."""
    from megatron.core.distributed import DistributedDataParallel
    sparse_linear.attach_to_megatron_ddp()
    weight = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    weight.main_grad = torch.zeros(4, 3, dtype=torch.float64)
    kept = KeptSlice(weight, torch.tensor([1, 2]), 0, micro_batches=2)
    # 8 tokens: their 2 omitted outputs pay for the held slice and the sum
    _subset(torch.randn(8, 3, dtype=torch.float64), weight, None, 0, kept).sum().backward()
    with pytest.raises(RuntimeError, match=r"\[\(1, 2\)\].*never reached main_grad"):
        DistributedDataParallel.finish_grad_sync(object())  # raises before megatron's code
    assert sparse_linear._UNFLUSHED == {kept}
    DistributedDataParallel.zero_grad_buffer(_ddp_stub(torch.nn.Linear(2, 2)))
    assert not sparse_linear._UNFLUSHED and kept.spent
    assert torch.all(weight.main_grad == 0)  # nothing of the abandoned sum handed over


def test_sat_blocks_wait_for_the_weights_they_score_before_scoring():
    """``--overlap-param-gather``: megatron DDP's forward pre-hook of a module waits for
    that module's own parameters only; a SAT block reads its linears' weights to score
    before their forwards, so its pre-hook waits for them (and itself) first."""
    from megatron.core.distributed import DistributedDataParallel
    sparse_linear.attach_to_megatron_ddp()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scored, self.other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

        def sat_scored_linears(self):
            return (self.scored,)

        def forward(self, x):
            events.append("block forward")
            return self.other(self.scored(x))

    events = []
    stub = _ddp_stub(torch.nn.Sequential(Block()))
    stub._make_forward_pre_hook = lambda: (
        lambda module, *unused: events.append(type(module).__name__
                                              + (" scored" if module is block.scored else "")))
    block = stub.module[0]
    DistributedDataParallel.enable_forward_pre_hook(stub)
    stub.module(torch.randn(1, 2))
    assert events == ["Sequential", "Block", "Linear scored", "block forward",
                      "Linear scored", "Linear"]
    assert set(stub.remove_forward_pre_hook_handles) == set(stub.module.modules())
    DistributedDataParallel.disable_forward_pre_hook(stub, param_sync=False)
    events.clear()
    stub.module(torch.randn(1, 2))
    assert events == ["block forward"]


@pytest.fixture(scope="module")
def scatter_records(tmp_path_factory):
    return run_interpreted("fused_scatter_cases.py", tmp_path_factory)


def test_triton_row_scatter_equals_index_add_and_index_copy(scatter_records):
    # 4 shapes x add/write, none filling the kernel's tiles evenly (one kept row = all),
    # and a main_grad whose rows are longer than the slice's (a column view)
    assert len(scatter_records) == 10
    for r in scatter_records:
        _check_scatter(r)


def _check_scatter(r: dict) -> None:
    assert r["equal"], r["case"]
    # the kept elements and no other: all of them, but for an addend below half an ulp
    assert r["changed"] == r["changed_by_torch"] >= 0.999 * r["kept_elements"], r["case"]


@cuda
def test_cuda_triton_row_scatter_equals_index_add_and_index_copy():
    sys.path.insert(0, str(Path(__file__).parent))
    from fused_scatter_cases import MODEL_SHAPES, SHAPES, records
    out = records(SHAPES + MODEL_SHAPES, device="cuda")
    assert len(out) == 14
    for r in out:
        _check_scatter(r)
