"""The Triton RMSNorm (``megatron_sat/fused_rmsnorm.py``) and cross-entropy
(``megatron_sat/fused_cross_entropy.py``) against float64 torch references.

In CI the kernels run in Triton's CPU interpreter on small fp32 shapes (rows that do not
fill the backward's programs evenly, hidden sizes that are not powers of two, vocabularies
over several blocks, targets outside the vocabulary, the loss split over two gloo ranks);
the ``cuda`` tests repeat them in bf16 at the benchmark models' shapes and check that
``torch_fusions.apply`` puts them in megatron's path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from _tools import run_interpreted, run_snippet

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return run_interpreted("fused_norm_loss_cases.py", tmp_path_factory)


def _close(err: dict, rel: float) -> bool:
    return err["finite"] and err["max_abs"] <= rel * err["scale"]


def test_rmsnorm_forward_and_both_gradients(interpreted):
    assert [r["case"].split()[1] for r in interpreted["norm"]] == [
        "[7,", "[33,", "[5,", "[2,"]
    for r in interpreted["norm"]:
        assert r["dtype_kept"], r
        for out in ("y", "dx", "dw"):
            assert _close(r[out], 1e-6), (r["case"], out, r[out])
    assert interpreted["norm"][2]["dx"]["shape"] == [5, 3, 64]
    assert interpreted["norm"][2]["dw"]["shape"] == [64]


def test_rmsnorm_with_residual_adds_the_residual_gradient_in_its_backward(interpreted):
    """(y, x) from one function: dx is the norm's input gradient plus x's own."""
    assert len(interpreted["norm_residual"]) == 2
    for r in interpreted["norm_residual"]:
        assert r["r_is_x"], r
        for out in ("y", "dx", "dw"):
            assert _close(r[out], 1e-6), (r["case"], out, r[out])


def test_rmsnorm_token_mean_in_the_forward_pass(interpreted):
    """With ``token_mean`` the forward also returns y's mean over the rows (maxip's input
    statistic, Eq. 5), from per-program sums: rows that do not fill the programs evenly,
    hidden sizes that are not powers of two, rows so wide that a tile holds one; y and
    both gradients are unchanged."""
    records = interpreted["norm_token_mean"]
    assert len(records) == 6
    for r in records:
        assert r["mean_dtype_kept"] and r["y_unchanged"] and r["r_is_x"], r
        assert r["mean"]["shape"] == [int(r["case"].split("]")[0].split(",")[-1])], r
        for out in ("mean", "y", "dx", "dw"):
            assert _close(r[out], 1e-6), (r["case"], out, r[out])


def test_cross_entropy_loss_and_gradient(interpreted):
    assert len(interpreted["loss"]) == 3
    for r in interpreted["loss"]:
        assert r["loss_dtype"] == "torch.float32" and r["grad_dtype_kept"], r
        assert _close(r["loss"], 1e-6), r
        assert _close(r["grad"], 1e-6), r


def test_cross_entropy_split_over_tensor_parallel_ranks(interpreted):
    """Each of two ranks holds half the vocabulary: the same loss as the whole vocabulary,
    and its half of the whole gradient."""
    assert [r["case"] for r in interpreted["tp"]] == ["ce tp2 rank0", "ce tp2 rank1"]
    for r in interpreted["tp"]:
        assert r["loss"]["shape"] == [3, 4] and r["grad"]["shape"] == [3, 4, 3000]
        assert _close(r["loss"], 1e-6) and _close(r["grad"], 1e-6), r


def test_cross_entropy_rejects_mismatched_targets():
    pytest.importorskip("triton")
    from megatron_sat.fused_cross_entropy import vocab_parallel_cross_entropy

    with pytest.raises(ValueError, match="target shape"):
        vocab_parallel_cross_entropy(torch.zeros(4, 2, 10), torch.zeros(2, 4, dtype=torch.long))


def test_forward_tiles_take_two_rows_up_to_hidden_4096():
    """The measured rule (bench_kernels.py --cases statistic --hidden N on an H100): two
    rows per step help the token-mean forward everywhere but slow the plain one by 15% at
    hidden 8192, so rows wider than 4096 (a block of 8192 values) take one-row tiles."""
    pytest.importorskip("triton")
    from megatron_sat.fused_rmsnorm import _forward_tile

    assert [_forward_tile(n) for n in (40, 2048, 4096)] == [2, 2, 2]
    assert [_forward_tile(n) for n in (4097, 5000, 8192, 16384)] == [1, 1, 1, 1]


def test_rms_norm_dispatch_leaves_cpu_inputs_to_torch():
    """Off the GPU (and for what the kernels do not take) ``rms_norm`` is F.rms_norm, and
    ``rms_norm_with_residual`` returns F.rms_norm's output alone (no torch recomputation)."""
    pytest.importorskip("triton")
    from megatron_sat.fused_rmsnorm import rms_norm, rms_norm_with_residual

    x, w = torch.randn(4, 8), torch.rand(8)
    want = torch.nn.functional.rms_norm(x, (8,), w, 1e-5)
    assert torch.equal(rms_norm(x, (8,), w, 1e-5), want)
    got = rms_norm_with_residual(x.requires_grad_(), (8,), w, 1e-5)
    assert isinstance(got, torch.Tensor) and torch.equal(got, want)


def _within_bf16_rounding(err: dict, floor: float) -> bool:
    """At most ~one bf16 ulp of the largest value, or ``floor`` of it."""
    return err["finite"] and err["max_abs"] <= max(2 ** -7, floor) * err["scale"]


@cuda
def test_cuda_rmsnorm_bf16_at_model_shapes():
    sys.path.insert(0, str(ROOT / "tests"))
    from fused_norm_loss_cases import norm_records

    shapes = [(4096, 2, 2048), (1024, 4096), (3, 5120), (333, 8192)]
    records = (norm_records(shapes, device="cuda", dtype=torch.bfloat16)
               + norm_records(shapes[:2], device="cuda", dtype=torch.bfloat16, residual=True)
               + norm_records(shapes, device="cuda", dtype=torch.bfloat16, residual=True,
                              token_mean=True))
    for r in records:
        assert r["dtype_kept"] and r.get("r_is_x", True), r
        assert r.get("mean_dtype_kept", True) and r.get("y_unchanged", True), r
        for out in ("y", "dx", "dw", "mean"):
            if out in r:
                assert _within_bf16_rounding(r[out], 0), (r["case"], out, r[out])


@cuda
def test_cuda_rmsnorm_token_mean_equals_the_blocks_own_statistic():
    """The norm's bf16 token mean against what a SAT block computes without it
    (``importance.input_statistic``: a GEMV in fp32, rounded once): within one bf16 ulp."""
    from megatron_sat.fused_rmsnorm import fused_rms_norm_with_residual
    from megatron_sat.importance import input_statistic

    gen = torch.Generator().manual_seed(3)
    for shape in [(2048, 16, 2048), (4096, 4, 4096)]:
        x = (torch.randn(shape, generator=gen) + 0.3).cuda().bfloat16().requires_grad_()
        w = (torch.rand(shape[-1], generator=gen) + 0.5).cuda().bfloat16()
        y, _, mean = fused_rms_norm_with_residual(x, w, 1e-5, token_mean=True)
        own = input_statistic("maxip", y)
        assert own.dtype == mean.dtype == torch.bfloat16
        ulp = torch.finfo(torch.bfloat16).eps * own.float().abs().clamp_min(1e-3)
        assert ((mean.float() - own.float()).abs() <= ulp).all(), shape


@cuda
def test_cuda_cross_entropy_bf16_at_model_shapes():
    sys.path.insert(0, str(ROOT / "tests"))
    from fused_norm_loss_cases import loss_records

    records = loss_records([((2048, 2), 32000, False), ((1000,), 32064, True),
                            ((7, 3), 50257, True)], device="cuda", dtype=torch.bfloat16)
    for r in records:
        assert r["grad_dtype_kept"], r
        assert _close(r["loss"], 1e-5), r
        assert _within_bf16_rounding(r["grad"], 0), r


_INSTALLED_CHECK = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from megatron_sat import fused_cross_entropy, fused_rmsnorm, norm, torch_fusions
import megatron.core.models.common.language_module.language_module as language_module

installed = torch_fusions.apply()
print(json.dumps({
    "installed": installed,
    "norm": norm.RMS_NORM is fused_rmsnorm.rms_norm,
    "residual": norm.RMS_NORM_WITH_RESIDUAL is fused_rmsnorm.rms_norm_with_residual,
    "loss": language_module.fused_vocab_parallel_cross_entropy.__wrapped__
    is fused_cross_entropy.vocab_parallel_cross_entropy}))
"""


@cuda
def test_cuda_torch_fusions_put_the_kernels_in_megatrons_path():
    """In a fresh process (``apply`` changes megatron's module attributes for good)."""
    rec = run_snippet(_INSTALLED_CHECK, str(ROOT))
    assert {"Triton RMSNorm", "Triton cross-entropy"} <= set(rec["installed"]), rec
    assert "residual gradient in the norm backward" in rec["installed"], rec
    assert rec["norm"] and rec["loss"] and rec["residual"], rec


def test_torch_rms_norm_with_residual_is_the_reference():
    """norm.rms_norm_with_residual (the CPU path of the layers' norms): the norm's output and
    x itself; x's gradient is the norm's input gradient plus the residual's."""
    from megatron_sat.norm import rms_norm_with_residual

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 4, 16, generator=gen), torch.rand(16, generator=gen) + 0.5
    dy, dr = torch.randn(3, 4, 16, generator=gen), torch.randn(3, 4, 16, generator=gen)
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    y, r = rms_norm_with_residual(xk, (16,), wk, 1e-5)
    torch.autograd.backward([y, r], [dy, dr])
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    yr = torch.nn.functional.rms_norm(xr, (16,), wr, 1e-5)
    torch.autograd.backward([yr, xr], [dy.double(), dr.double()])
    assert torch.equal(r, x) and r.data_ptr() == xk.data_ptr()
    torch.testing.assert_close(y.double(), yr, rtol=0, atol=1e-6)
    torch.testing.assert_close(xk.grad.double(), xr.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(wk.grad.double(), wr.grad, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="last dimension"):
        rms_norm_with_residual(xk, (4, 16), wk, 1e-5)


def test_layer_norms_hand_megatron_the_residual_only_where_it_is_safe(monkeypatch):
    import types

    from megatron_sat import norm

    config = types.SimpleNamespace(normalization="RMSNorm", layernorm_zero_centered_gamma=False,
                                   sequence_parallel=False, recompute_granularity=None,
                                   recompute_modules=None)
    layer_norm = norm.TorchNorm(config, 8, residual_output=True)
    final_norm = norm.TorchNorm(config, 8)
    x = torch.randn(2, 8, requires_grad=True)
    assert isinstance(layer_norm(x), torch.Tensor)  # hook unset (--no-sat-torch-fusions)
    monkeypatch.setattr(norm, "RMS_NORM_WITH_RESIDUAL", norm.rms_norm_with_residual)
    out, residual = layer_norm(x)
    assert torch.equal(out, final_norm(x)) and residual.data_ptr() == x.data_ptr()
    assert isinstance(final_norm(x), torch.Tensor)
    with torch.no_grad():
        assert isinstance(layer_norm(x), torch.Tensor)
    assert isinstance(layer_norm(x.detach()), torch.Tensor)
    config.recompute_granularity, config.recompute_modules = "selective", ["layernorm"]
    assert isinstance(norm.TorchNorm(config, 8, residual_output=True)(x), torch.Tensor)
