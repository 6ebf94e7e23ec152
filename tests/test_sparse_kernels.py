"""The sparse layers' kernels against plain references.

``SubsetMatmul``: forward, input gradient and the kept slice's weight gradient, added into
an fp32 ``main_grad`` (megatron DDP) or returned as a dense ``.grad``, against autograd of
the dense slice. The Triton scatter of the kept rows' slice (``fused_scatter``) against
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

from megatron_sat.sparse_linear import SubsetMatmul

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


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
    y = SubsetMatmul.apply(xa, w, index, dim)
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


@cuda
@pytest.mark.parametrize("dim", [0, 1])
def test_cuda_subset_matmul_weight_gradient_is_accumulated_in_fp32(dim):
    torch.manual_seed(0)
    index = torch.randperm(512 if dim == 0 else 256, device="cuda")[:200].sort().values
    x = torch.randn(4096, 256 if dim == 0 else 200, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight.main_grad = torch.randn(512, 256, device="cuda", dtype=torch.float32)
    before = weight.main_grad.double()
    y = SubsetMatmul.apply(x, weight, index, dim)
    g = torch.randn_like(y)
    y.backward(g)
    want = before.clone()
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
        SubsetMatmul.apply(x, weight, index, dim).backward(g)
        want.index_add_(dim, index, g.t() @ x)
        assert weight.sat_main_grad_zeroed is False
        torch.testing.assert_close(weight.main_grad, want)


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
