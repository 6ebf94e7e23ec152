"""megatron_sat.torch_fusions: each stand-in against megatron-core's own fallback or a
plain torch reference, and pretrain_sat.py with the fusions against without them."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils

from _launch import MOCK_DATA, TINY_GPT, TRAINING, pretrain, read_tensorboard, run_script
from megatron_sat import torch_fusions

ROOT = Path(__file__).resolve().parents[1]

# The tiny GPT with megatron's default gradient-accumulation fusion (served by the stand-in).
TINY_GPT_FUSED_WGRAD = [f for f in TINY_GPT if f != "--no-gradient-accumulation-fusion"]


def _rope_inputs(heads: int):
    gen = torch.Generator().manual_seed(heads)
    t = torch.randn(16, 2, heads, 8, generator=gen, requires_grad=True)
    freqs = torch.randn(16, 1, 1, 8, generator=gen)
    return t, freqs


@pytest.mark.parametrize("heads", [4, 2, 1])  # dense, and kept head counts of SAT
def test_compiled_rope_equals_megatrons_eager_rope(heads):
    # aot_eager traces the whole function into one graph (fullgraph=True) like inductor
    # does on a GPU, without needing a C++ compiler here.
    compiled = torch_fusions.compiled_rope(rope_utils._apply_rotary_pos_emb_bshd, "aot_eager")
    t, freqs = _rope_inputs(heads)
    t2 = t.detach().clone().requires_grad_()
    want = rope_utils._apply_rotary_pos_emb_bshd(t, freqs, mscale=0.7)
    got = compiled(t2, freqs, mscale=0.7)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(t2.grad, t.grad, rtol=0, atol=1e-6)


def test_l2_norm_is_the_norm_of_all_tensors_together():
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 5, generator=gen), torch.randn(7, generator=gen),
               torch.randn(2, 2, generator=gen).bfloat16()]
    got, per_tensor = torch_fusions.l2_norm(0, None, [tensors], False)
    want = torch.cat([t.float().reshape(-1) for t in tensors]).norm()
    assert per_tensor is None and got.shape == (1,) and got.dtype == torch.float32
    torch.testing.assert_close(got[0], want)
    with pytest.raises(NotImplementedError):
        torch_fusions.l2_norm(0, None, [tensors], True)


def test_scale_tensors_equals_megatrons_per_tensor_scale_bit_for_bit():
    from megatron.core.utils import local_multi_tensor_scale

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(*shape, generator=gen) for shape in ((3, 5), (7,), (1000, 3))]
    for scale in (0.37, 1.0, 3e-7):
        want = [g.clone() for g in grads]
        local_multi_tensor_scale(0, None, [want, want], scale)  # clipping: in place
        got = [g.clone() for g in grads]
        torch_fusions.scale_tensors(0, None, [got, got], scale)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), scale
        copies = [torch.empty_like(g).bfloat16() for g in grads]  # this -> that, with a cast
        want_copies = [torch.empty_like(c) for c in copies]
        local_multi_tensor_scale(0, None, [grads, want_copies], scale)
        torch_fusions.scale_tensors(0, None, [grads, copies], scale)
        assert all(torch.equal(a, b) for a, b in zip(copies, want_copies)), scale
    torch_fusions.scale_tensors(0, None, [[], []], 0.5)  # no gradients: nothing to do


def test_wgrad_accumulation_adds_the_weight_gradient_into_main_grad():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=gen)  # [tokens, in]
    g = torch.randn(6, 3, generator=gen)  # [tokens, out]
    main_grad = torch.randn(3, 4, generator=gen)
    want = main_grad + g.t() @ x
    torch_fusions.wgrad_gemm_accum_fp32(x, g, main_grad)
    torch.testing.assert_close(main_grad, want)
    half = main_grad.bfloat16()
    torch_fusions.wgrad_gemm_accum_fp16(x.bfloat16(), g.bfloat16(), half)
    torch.testing.assert_close(half.float(), want + g.t() @ x, rtol=2e-2, atol=5e-2)


def _adam_steps(adam, params, grads):
    for grad in grads:
        for p, g in zip(params, grad):
            p.grad = g.clone()
        adam.step()


def test_fused_adam_matches_foreach_and_survives_loading_a_foreach_checkpoint():
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(5, 3, generator=gen), torch.randn(4, generator=gen)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(4)]

    def build():
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        return ps, torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)

    ref_params, ref = build()
    _adam_steps(ref, ref_params, grads)

    # Two foreach steps, saved; loaded into a fused optimizer, two more steps.
    first_params, first = build()
    _adam_steps(first, first_params, grads[:2])
    saved = copy.deepcopy(first.state_dict())
    assert saved["param_groups"][0]["fused"] is None
    resumed_params, resumed = build()
    with torch.no_grad():
        for p, q in zip(resumed_params, first_params):
            p.copy_(q)
    torch_fusions.use_fused_update(resumed)
    resumed.load_state_dict(saved)
    assert all(g["fused"] and not g["foreach"] for g in resumed.param_groups)
    _adam_steps(resumed, resumed_params, grads[2:])
    for p, q in zip(resumed_params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert all(resumed.state[p]["step"].item() == 4 for p in resumed_params)


def test_torch_adams_finds_the_inner_optimizers_of_megatrons_wrappers():
    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])

    class Wrapper:  # MegatronOptimizer keeps the torch optimizer as .optimizer
        optimizer = adam

    class Chained:  # ChainedOptimizer keeps its parts as .chained_optimizers
        chained_optimizers = [Wrapper(), Wrapper()]

    assert torch_fusions.torch_adams(Wrapper()) == [adam]
    assert torch_fusions.torch_adams(Chained()) == [adam, adam]
    assert torch_fusions.torch_adams(object()) == []


@pytest.mark.e2e
def test_pretrain_with_fusions_matches_megatrons_fallbacks(tmp_path):
    """Data-parallel SAT in fp32 with the distributed optimizer: fused Adam, the device
    gradient norm and clipping (clipping on), the NaN/Inf checks deferred to log lines
    (``--rerun-mode disabled``) and the gradient-accumulation stand-in against megatron's
    foreach Adam, host norm and clipping, immediate checks and unfused accumulation.
    Resumed from a checkpoint written by the fused run in the middle, to check the fused
    optimizer's saved state."""
    flags = ["--attention-dropout", "0", "--hidden-dropout", "0", "--clip-grad", "0.5",
             "--sat-omission-rate", "0.5", "--sat-lors-start", "2",
             "--sat-lors-ladders", "3", "--use-distributed-optimizer", "--manual-gc",
             "--manual-gc-interval", "3"]
    plain = pretrain(2, flags + ["--no-sat-torch-fusions"], tmp_path / "tb-plain")
    assert plain.returncode == 0, plain.output[-6000:]
    save = ["--save", str(tmp_path / "ckpt"), "--save-interval", "5", "--rerun-mode",
            "disabled"]
    first = pretrain(2, flags + save + ["--exit-interval", "5"], tmp_path / "tb-first",
                     model=TINY_GPT_FUSED_WGRAD)
    assert first.returncode == 0, first.output[-6000:]
    second = pretrain(2, flags + save + ["--load", str(tmp_path / "ckpt")],
                      tmp_path / "tb-second", model=TINY_GPT_FUSED_WGRAD)
    assert second.returncode == 0, second.output[-6000:]
    installed = ("[sat] torch fusions: device gradient norm, one-pass gradient clipping, "
                 "gradient-accumulation fusion, fused Adam, host-side model-parallel "
                 "reductions, host-known loss scale, gradient norm and clipping on the device, "
                 "NaN/Inf checks at log lines with --rerun-mode disabled, loss sums without "
                 "a host copy, manual gc that skips start-up objects, residual gradient "
                 "in the norm backward")
    assert installed in first.output and "[sat] torch fusions" not in plain.output
    fused = first.exact | second.exact
    assert sorted(fused) == sorted(plain.exact) == list(range(1, 13))
    for i in fused:
        assert fused[i] == pytest.approx(plain.exact[i], rel=1e-5), (i, fused, plain.exact)
    # what the host now reads without the GPU (host_syncs) is logged as before; clipping
    # inside Adam divides by 1/coefficient where megatron multiplies (one rounding apart,
    # grown over 11 updates at lr 1e-2)
    for tag, rel in (("grad-norm", 1e-3), ("learning-rate", 0), ("loss-scale", 0)):
        got = (read_tensorboard(first.tensorboard_dir, tag)
               | read_tensorboard(second.tensorboard_dir, tag))
        want = read_tensorboard(plain.tensorboard_dir, tag)
        assert sorted(got) == sorted(want) == list(range(1, 13)), tag
        for i in got:
            assert got[i] == pytest.approx(want[i], rel=rel), (tag, i, got[i], want[i])
    assert max(read_tensorboard(plain.tensorboard_dir, "grad-norm").values()) > 0.5  # clipped
    assert plain.exact[12] < 0.9 * plain.exact[1]  # it learns: the comparison means something


@pytest.mark.e2e
def test_deferred_nan_check_stops_before_the_checkpoint_with_megatrons_error(tmp_path):
    """A learning rate of 1e30 makes iteration 2's loss and gradients NaN. megatron's
    immediate check (fusions off) stops in iteration 2; the deferred one (``--rerun-mode
    disabled``) names the same iteration and check, and stops before the iteration-3
    checkpoint save instead of writing it."""
    flags = ["--lr", "1e30", "--lr-decay-style", "constant", "--clip-grad", "0",
             "--use-distributed-optimizer", "--rerun-mode", "disabled", "--log-interval", "4"]
    immediate = pretrain(1, flags + ["--no-sat-torch-fusions",
                                     "--no-gradient-accumulation-fusion"], tmp_path / "tb-i")
    deferred = pretrain(1, flags + ["--save", str(tmp_path / "ckpt"), "--save-interval", "3"],
                        tmp_path / "tb-d")
    assert immediate.returncode != 0 and deferred.returncode != 0
    check = "found NaN in local grad norm for bucket #0"
    assert f"message='{check}" in immediate.output
    assert sorted(immediate.exact) == [1]  # stopped inside iteration 2
    assert (f"iteration 2: Unexpected result nan (message='{check} in backward pass before "
            "data-parallel communication collective'). Found at a checkpoint save") \
        in deferred.output
    assert sorted(deferred.exact) == [1, 2, 3]
    assert not (tmp_path / "ckpt").exists()
    # two data-parallel ranks, clipping on (a NaN norm reaches Adam's grad_scale): both
    # ranks skip and stop at the same save instead of one hanging in a collective
    flags[flags.index("--clip-grad") + 1] = "1.0"
    both = pretrain(2, flags + ["--save", str(tmp_path / "ckpt2"), "--save-interval", "3"],
                    tmp_path / "tb-2")
    assert both.returncode != 0
    for rank in (0, 1):
        assert f"[rank{rank}]: RuntimeError: Rank {rank}, node" in both.output
    assert "iteration 2: Unexpected result nan" in both.output
    assert not (tmp_path / "ckpt2").exists()


def test_switching_fusions_off_without_apex_asks_for_no_gradient_accumulation_fusion(
        tmp_path):
    save = ["--save", str(tmp_path / "checkpoint"), "--save-interval", "6"]
    result = run_script(TINY_GPT_FUSED_WGRAD + TRAINING + MOCK_DATA + save
                        + ["--no-sat-torch-fusions"])
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert ("pretrain_sat.py: error: --no-sat-torch-fusions: gradient-accumulation fusion "
            "then needs Apex") in result.stderr
    assert "--no-gradient-accumulation-fusion" in result.stderr
    assert not (tmp_path / "checkpoint").exists()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_wgrad_accumulation_is_an_fp32_gemm_into_main_grad():
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(4096, 1024, device="cuda", generator=gen).bfloat16()
    g = torch.randn(4096, 512, device="cuda", generator=gen).bfloat16()
    main_grad = torch.randn(512, 1024, device="cuda", generator=gen)
    want = main_grad.double() + g.double().t() @ x.double()
    address = main_grad.data_ptr()
    torch_fusions.wgrad_gemm_accum_fp32(x, g, main_grad)
    assert main_grad.data_ptr() == address and main_grad.dtype == torch.float32
    # fp32 accumulation of exact bf16 products: far tighter than a bf16 result (~1e-2)
    torch.testing.assert_close(main_grad.double(), want, rtol=1e-4, atol=1e-3)


@cuda
@pytest.mark.parametrize("heads", [32, 16, 4])
def test_cuda_inductor_rope_is_as_accurate_as_megatrons_eager_rope(heads):
    """Against megatron's RoPE in fp32: the compiled bf16 kernel (fp32 inside, one rounding)
    errs no more than megatron's eager bf16 one (a rounding after every operation)."""
    rope = rope_utils._apply_rotary_pos_emb_bshd
    compiled = torch_fusions.compiled_rope(rope)
    t = torch.randn(256, 2, heads, 64, device="cuda", dtype=torch.bfloat16)
    freqs = torch.randn(256, 1, 1, 64, device="cuda")
    grad = torch.randn(256, 2, heads, 64, device="cuda")
    results = {}
    for name, fn, dtype in (("fp32", rope, torch.float32), ("eager", rope, torch.bfloat16),
                            ("compiled", compiled, torch.bfloat16)):
        x = t.to(dtype).detach().clone().requires_grad_()  # a leaf of its own
        y = fn(x, freqs)
        y.backward(grad.to(dtype))
        results[name] = (y.float(), x.grad.float())
    for i, what in enumerate(("output", "gradient")):
        ref = results["fp32"][i]
        eager_err = (results["eager"][i] - ref).abs().max().item()
        compiled_err = (results["compiled"][i] - ref).abs().max().item()
        assert compiled_err <= eager_err + 1e-6, (what, compiled_err, eager_err)
        assert compiled_err < 0.05, (what, compiled_err)  # bf16 rounding of values up to ~5


@cuda
def test_cuda_rope_compiles_once_for_every_head_count():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch_fusions.compiled_rope(rope_utils._apply_rotary_pos_emb_bshd)
    freqs = torch.randn(128, 1, 1, 64, device="cuda")
    for heads in (16, 20, 24, 28, 4):  # SAT's kept query heads per ladder, then K
        t = torch.randn(128, 2, heads, 64, device="cuda", dtype=torch.bfloat16,
                        requires_grad=True)
        compiled(t, freqs).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


_SWIGLU_CHECK = r"""
import torch
from megatron_sat import swiglu
torch.manual_seed(0)
for width in (48, 80):  # two widths; fp32 (the interpreter emulates bf16 loosely)
    x = torch.randn(6, 2 * width)
    grad = torch.randn(6, width)
    ref = x.clone().requires_grad_()
    gate, up = ref.chunk(2, -1)
    want = torch.nn.functional.silu(gate) * up
    want.backward(grad)
    out, dx = swiglu.swiglu(x), swiglu.swiglu_back(grad, x)
    assert out.shape == (6, width) and dx.shape == x.shape
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(dx, ref.grad)
print("ok")
"""


def test_triton_swiglu_kernels_in_the_interpreter_equal_silu_gate_times_up():
    """The Triton kernels' indexing and arithmetic, on CPU in Triton's interpreter
    (TRITON_INTERPRET=1, read when the kernels are defined, hence a fresh process)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", _SWIGLU_CHECK], env=env, capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


@cuda
def test_cuda_triton_swiglu_replaces_megatrons_and_compiles_once():
    import megatron.core.fusions.fused_bias_swiglu as fused

    from megatron_sat import swiglu

    original = fused.swiglu, fused.swiglu_back
    try:
        swiglu.install()
        for width in (2816, 3328, 3904):  # LORS widths at TinyLlama's ffn
            x = torch.randn(512, 2 * width, device="cuda", dtype=torch.bfloat16,
                            requires_grad=True)
            out = fused.bias_swiglu_impl(x, None)
            grad = torch.randn_like(out)
            out.backward(grad)
            ref = x.detach().float().requires_grad_()
            gate, up = ref.chunk(2, -1)
            want = torch.nn.functional.silu(gate) * up
            want.backward(grad.float())
            torch.testing.assert_close(out.float(), want, rtol=2 ** -8, atol=1e-5)
            torch.testing.assert_close(x.grad.float(), ref.grad, rtol=2 ** -8, atol=1e-5)
        cpu = torch.randn(4, 16)
        torch.testing.assert_close(fused.swiglu(cpu), original[0](cpu))  # falls back
        compiled = [len(c[0]) for c in swiglu._swiglu_forward.device_caches.values()]
        assert compiled == [1], compiled  # one compilation for the three widths
    finally:
        fused.swiglu, fused.swiglu_back = original
