"""SAT's own kernels on one GPU: the fused kernels over a LORS schedule, and the
accumulation of the kept weight gradients.

Each LORS ladder changes the kept MLP width and the kept query-head count, so every
compiled kernel that depends on them meets a new shape. This script runs, in one process
with an empty inductor cache, every width of the TinyLlama schedule (r = 0.5 .. 0 in five
ladders) through:

* SwiGLU: megatron-core's fused SwiGLU (halves [gate; up]), one static kernel per width
  (megatron_fixes fix 3), against megatron-sat's Triton kernels with a runtime width
  (:mod:`megatron_sat.swiglu`, installed into megatron's SwiGLU by the torch fusions);
* RoPE: megatron's RoPE compiled with static shapes (one kernel per head count) against
  megatron-sat's :func:`~megatron_sat.torch_fusions.compiled_rope` (the head count dynamic).

For each it reports the first call (compilation included) and the median of later calls,
forward + backward, and the largest difference from an fp32 eager reference.

Weight gradients (``wgrad``): the kept slice's gradient of TinyLlama's fc1 (rows) and fc2
(columns) at r = 0.5 added into an fp32 ``main_grad``, as a bf16 GEMM then a cast then
``index_add_``, against a GEMM with an fp32 result then ``index_add_``, and then
:func:`~megatron_sat.fused_scatter.scatter_kept` (what ``SubsetMatmul`` does on CUDA), next
to the dense layer's fp32-accumulating GEMM into ``main_grad``. The scatter alone
(``scatter``) at TinyLlama's and Llama-2-7B's fc1 and fc2: torch's ``index_add_`` and
``index_copy_`` against ``scatter_kept`` adding and writing (the Triton kernel for rows,
torch for columns), with the bandwidth each reaches (bytes that must move: the slice
read, ``main_grad``'s kept part read when adding, and written).

The maxip statistic (``statistic``): the token mean of a block's bf16 input as torch's
column reduction (fp32) and a cast to bf16, against the GEMV z^T (1/m) that
``importance.input_statistic`` runs on a GPU; the error is against the fp32 mean.

RMSNorm (``rmsnorm``) and the language-model loss (``cross_entropy``), which no omission
rate shrinks: torch's ``F.rms_norm`` against megatron-sat's Triton kernels
(:mod:`megatron_sat.fused_rmsnorm`, weight gradient in the same backward pass), and
megatron-core's ``--cross-entropy-fusion-impl native`` and torch's ``F.cross_entropy``
against :mod:`megatron_sat.fused_cross_entropy`, forward + backward at TinyLlama's
16 x 2048 tokens (hidden 2048, vocabulary 32000); errors against float32 references.
``--hidden`` sets the norms' row width (the ``statistic`` and ``norm_loss`` cases): 4096 is
Llama-2-7B's and the widest row whose forward takes two-row tiles by default; the tile sweep
of ``statistic`` lifts that limit to ``MAX_HIDDEN`` values and records the tile it ran.

Selection (``selection``): the Triton selection kernels (:mod:`megatron_sat.fused_selection`)
at TinyLlama's and Llama-2-7B's MLP and attention shapes and r = 0.25, 0.5, 0.75 (sampling
from bf16 scores), by GPU time, against the MLP's torch path and, with
``--selection-baseline FILE``, against another version of ``fused_selection.py`` (e.g.
``git show REV:megatron_sat/fused_selection.py > FILE``), which must keep the same neurons.
A variant's first call compiles it only at the first shape and rate that needs it.

    python benchmarks/bench_kernels.py --out kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor_"))

import torch  # noqa: E402

from megatron_sat import megatron_fixes  # noqa: E402
from megatron_sat.config import kept_channels, kept_count  # noqa: E402
from megatron_sat.fused_scatter import scatter_kept  # noqa: E402
from megatron_sat.torch_fusions import compiled_rope  # noqa: E402
from profile_summary import gpu_ms  # noqa: E402

RATES = (0.5, 0.4, 0.3, 0.2, 0.1, 0.0)


def timed(fn, grad_shape_of, x: torch.Tensor, iters: int) -> tuple[float, list[float], float]:
    """Forward + backward of ``fn(x)``: the first call's seconds (compilation included),
    the later calls' milliseconds (host included: synchronised), and the GPU kernel time
    per later call in milliseconds (from the profiler: what a step that keeps the GPU
    busy pays)."""
    grad = torch.ones(grad_shape_of(x), device=x.device, dtype=x.dtype)

    def call():
        fn(x.detach().requires_grad_()).backward(grad)

    times = []
    for _ in range(iters + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[0], [t * 1e3 for t in times[1:]], gpu_ms(call, iters)


def error(fn, ref_fn, x: torch.Tensor) -> dict:
    """Largest |output| and |input-gradient| difference from ``ref_fn`` run in fp32."""
    xa, xr = x.detach().requires_grad_(), x.detach().float().requires_grad_()
    ya, yr = fn(xa), ref_fn(xr)
    g = torch.randn_like(yr)
    ya.backward(g.to(ya.dtype))
    yr.backward(g)
    return {"out": (ya.float() - yr).abs().max().item(),
            "grad": (xa.grad.float() - xr.grad).abs().max().item()}


def swiglu_cases(tokens: int, ffn: int, iters: int) -> list[dict]:
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    def megatron_halves(y):
        return bias_swiglu_impl(y, None)

    def halves_ref(y):
        g, u = torch.chunk(y, 2, -1)
        return torch.nn.functional.silu(g) * u

    rows = []
    for variant in ("megatron static [gate; up]", "triton runtime width"):
        if variant.startswith("triton"):
            from megatron_sat import swiglu

            swiglu.install()  # megatron's SwiGLUFunction now calls the Triton kernels
        for rate in RATES:
            k = kept_channels(ffn, rate, 64)
            x = torch.randn(tokens, 2 * k, device="cuda", dtype=torch.bfloat16)
            first, later, gpu = timed(megatron_halves,
                                      lambda t: (t.shape[0], t.shape[1] // 2), x, iters)
            rows.append({"kernel": "swiglu", "variant": variant, "rate": rate, "width": k,
                         "first_call_s": first, "median_ms": statistics.median(later),
                         "gpu_ms": gpu,
                         "max_error": error(megatron_halves, halves_ref, x[:4096])})
    return rows


def rope_cases(seq: int, batch: int, groups: int, q_per_group: int, iters: int) -> list[dict]:
    import megatron.core.models.common.embeddings.rope_utils as rope_utils

    eager = rope_utils._apply_rotary_pos_emb_bshd
    static = torch.compile(eager, dynamic=False, fullgraph=True)
    dynamic_heads = compiled_rope(eager)
    freqs = torch.randn(seq, 1, 1, 64, device="cuda")
    rows = []
    for name, fn in (("static per head count", static), ("dynamic heads", dynamic_heads)):
        for rate in RATES:
            heads = groups * kept_count(q_per_group, rate)
            for role, h in (("q", heads), ("k", groups)):
                x = torch.randn(seq, batch, h, 64, device="cuda", dtype=torch.bfloat16)
                first, later, gpu = timed(lambda t: fn(t, freqs), lambda t: t.shape, x, iters)
                rows.append({"kernel": "rope", "variant": name, "rate": rate, "role": role,
                             "heads": h, "first_call_s": first,
                             "median_ms": statistics.median(later), "gpu_ms": gpu,
                             "max_error": error(lambda t: fn(t, freqs[:256]),
                                                lambda t: eager(t, freqs[:256]), x[:256])})
    return rows


def cuda_ms(fn, iters: int) -> float:
    """Median milliseconds of ``fn()`` by CUDA events."""
    fn()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def kept_layers(hidden: int, ffn: int):
    """fc1 (kept rows [gate; up]) and fc2 (kept columns) of a SwiGLU MLP at r = 0.5:
    (layer, dim, number kept, a zero fp32 ``main_grad``, sorted random kept indices)."""
    kept = kept_channels(ffn, 0.5, 64)
    for layer, shape, dim, n_kept in (("fc1", (2 * ffn, hidden), 0, 2 * kept),
                                      ("fc2", (hidden, ffn), 1, kept)):
        index = torch.randperm(shape[dim], device="cuda")[:n_kept].sort().values
        yield layer, dim, n_kept, torch.zeros(shape, device="cuda"), index


def wgrad_cases(tokens: int, hidden: int, ffn: int, iters: int) -> list[dict]:
    rows = []
    for layer, dim, n_kept, main_grad, index in kept_layers(hidden, ffn):
        n_out, n_in = main_grad.shape
        gy = torch.randn(tokens, n_kept if dim == 0 else n_out, device="cuda",
                         dtype=torch.bfloat16)
        x = torch.randn(tokens, n_in if dim == 0 else n_kept, device="cuda",
                        dtype=torch.bfloat16)
        gy_full = torch.randn(tokens, n_out, device="cuda", dtype=torch.bfloat16)
        x_full = torch.randn(tokens, n_in, device="cuda", dtype=torch.bfloat16)
        variants = {
            "bf16 GEMM, cast, index_add": lambda: main_grad.index_add_(
                dim, index, torch.mm(gy.t(), x).float()),
            "fp32-result GEMM, index_add": lambda: main_grad.index_add_(
                dim, index, torch.mm(gy.t(), x, out_dtype=torch.float32)),
            "fp32-result GEMM, scatter_kept": lambda: scatter_kept(
                main_grad, dim, index, torch.mm(gy.t(), x, out_dtype=torch.float32)),
            "dense: fp32-accumulating GEMM into main_grad": lambda: torch.addmm(
                main_grad, gy_full.t(), x_full, out_dtype=torch.float32, out=main_grad),
        }
        for name, fn in variants.items():
            ms = cuda_ms(fn, iters)
            rows.append({"kernel": "wgrad", "variant": name, "layer": layer, "rate": 0.5,
                         "first_call_s": 0.0, "median_ms": ms, "gpu_ms": ms})
    return rows


def scatter_cases() -> list[dict]:
    rows = []
    for model, hidden, ffn in (("tinyllama", 2048, 5632), ("llama2-7b", 4096, 11008)):
        for layer, dim, n_kept, main_grad, index in kept_layers(hidden, ffn):
            n_out, n_in = main_grad.shape
            grad_kept = torch.randn(*((n_kept, n_in) if dim == 0 else (n_out, n_kept)),
                                    device="cuda")
            variants = {
                "torch index_add_": (True, lambda: main_grad.index_add_(dim, index, grad_kept)),
                "torch index_copy_": (False, lambda: main_grad.index_copy_(dim, index,
                                                                           grad_kept)),
                "scatter_kept, adding": (True, lambda: scatter_kept(main_grad, dim, index,
                                                                    grad_kept, True)),
                "scatter_kept, writing": (False, lambda: scatter_kept(main_grad, dim, index,
                                                                      grad_kept, False)),
            }
            for name, (adds, fn) in variants.items():
                ms = gpu_ms(fn)
                moved = grad_kept.numel() * 4 * (3 if adds else 2)
                rows.append({"kernel": "scatter", "variant": name, "layer": f"{model} {layer}",
                             "rate": 0.5, "first_call_s": 0.0, "median_ms": ms, "gpu_ms": ms,
                             "bandwidth_tb_s": moved / ms / 1e9})
    return rows


def statistic_cases(tokens: int, hidden: int) -> list[dict]:
    """maxip's token mean of a layer norm's output: on its own (torch, the GEMV), and the
    norm's forward without it, followed by the GEMV, and computing it in its pass."""
    from megatron_sat.fused_rmsnorm import fused_rms_norm_with_residual
    from megatron_sat.importance import input_statistic
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(hidden, device="cuda", dtype=torch.bfloat16) + 0.5
    z = fused_rms_norm_with_residual(x, w, 1e-5)[0]
    ref = z.float().mean(dim=0)

    def measured(name, fn) -> dict:
        ms = gpu_ms(fn)
        out = fn()
        return {"kernel": "statistic", "variant": name, "rate": 0.0, "role": "",
                "first_call_s": 0.0, "median_ms": ms, "gpu_ms": ms,
                "max_error": ((out.float() - ref).abs().max().item()
                              if out.shape == ref.shape else None)}

    rows = [measured(name, fn) for name, fn in {
            "torch mean (fp32) + cast": lambda: torch.mean(z, 0, dtype=torch.float32).to(z.dtype),
            "GEMV z^T (1/m) (input_statistic)": lambda: input_statistic("maxip", z),
            "norm forward alone": lambda: fused_rms_norm_with_residual(x, w, 1e-5)[0],
            "norm forward, then the GEMV": lambda: input_statistic(
                "maxip", fused_rms_norm_with_residual(x, w, 1e-5)[0]),
            "norm forward with the token mean": lambda: fused_rms_norm_with_residual(
                x, w, 1e-5, token_mean=True)[2]}.items()]
    # the token-mean forward's launch: programs per SM (its warps are the plain forward's)
    from megatron_sat import fused_rmsnorm
    default = fused_rmsnorm.TOKEN_MEAN_PROGRAMS_PER_SM
    for per_sm in (4, 8, 16, 32, 64):
        fused_rmsnorm.TOKEN_MEAN_PROGRAMS_PER_SM = per_sm
        rows.append(measured(f"token mean, {per_sm} programs per SM",
                             lambda: fused_rms_norm_with_residual(x, w, 1e-5, token_mean=True)[2]))
    fused_rmsnorm.TOKEN_MEAN_PROGRAMS_PER_SM = default
    # rows per tile, both forwards, up to MAX_HIDDEN values per tile (the widest rows
    # still clamp: "tile_rows" is what ran)
    default = fused_rmsnorm.FORWARD_ROWS, fused_rmsnorm.FORWARD_TILE_VALUES
    fused_rmsnorm.FORWARD_TILE_VALUES = fused_rmsnorm.MAX_HIDDEN
    for tile in (1, 2, 4):
        fused_rmsnorm.FORWARD_ROWS = tile
        rows.append(measured(f"norm forward alone, {tile} rows per tile",
                             lambda: fused_rms_norm_with_residual(x, w, 1e-5)[0]))
        rows.append(measured(f"norm forward with the token mean, {tile} rows per tile",
                             lambda: fused_rms_norm_with_residual(x, w, 1e-5, token_mean=True)[2]))
        y_plain = fused_rms_norm_with_residual(x, w, 1e-5)[0]
        rows[-1]["y_bitwise_plain"] = torch.equal(
            fused_rms_norm_with_residual(x, w, 1e-5, token_mean=True)[0], y_plain)
        for row in rows[-2:]:
            row["tile_rows"] = fused_rmsnorm._forward_tile(hidden)
    fused_rmsnorm.FORWARD_ROWS, fused_rmsnorm.FORWARD_TILE_VALUES = default
    return rows


def _fwd_bwd_case(kernel: str, variant: str, fn, inputs: list[torch.Tensor],
                  grad: torch.Tensor, reference: dict[str, torch.Tensor], iters: int) -> dict:
    """GPU time of ``fn(*inputs)`` forward + backward(grad), and its largest errors
    against ``reference`` (the output as "out", input gradients by position)."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]

    def call():
        for t in leaves:
            t.grad = None
        out = fn(*leaves)
        out.backward(grad)
        return out

    out = call()
    got = {"out": out, **{str(i): t.grad for i, t in enumerate(leaves) if t.grad is not None}}
    errors = {k: (got[k].float() - want).abs().max().item() for k, want in reference.items()}
    ms = gpu_ms(call, iters)
    return {"kernel": kernel, "variant": variant, "rate": 0.0, "role": "",
            "first_call_s": 0.0, "median_ms": ms, "gpu_ms": ms, "max_error": errors}


def _fp32_reference(fn, inputs, grad) -> dict[str, torch.Tensor]:
    leaves = [t.detach().float().requires_grad_() if t.is_floating_point() else t
              for t in inputs]
    out = fn(*leaves)
    out.backward(grad.float())
    return {"out": out.detach(), **{str(i): t.grad for i, t in enumerate(leaves)
                                    if t.is_floating_point()}}


def norm_loss_cases(tokens: int, hidden: int, vocab: int, iters: int) -> list[dict]:
    import torch.nn.functional as F

    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    from megatron_sat.fused_cross_entropy import vocab_parallel_cross_entropy
    from megatron_sat.fused_rmsnorm import fused_rms_norm

    if not torch.distributed.is_initialized():  # megatron's loss all-reduces over its group
        torch.distributed.init_process_group(
            "nccl", init_method=f"file://{tempfile.mkdtemp()}/pg", rank=0, world_size=1)
    group = torch.distributed.group.WORLD
    rows = []
    x = torch.randn(tokens // 2048, 2048, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(hidden, device="cuda", dtype=torch.bfloat16) + 0.5
    dy = torch.randn_like(x)
    torch_norm = lambda x, w: F.rms_norm(x, (hidden,), w, 1e-5)  # noqa: E731
    ref = _fp32_reference(torch_norm, [x, w], dy)
    for name, fn in (("torch F.rms_norm", torch_norm),
                     ("triton, weight gradient fused", lambda x, w: fused_rms_norm(x, w, 1e-5))):
        rows.append(_fwd_bwd_case("rmsnorm", name, fn, [x, w], dy, ref, iters))
    del x, dy, ref
    logits = torch.randn(2048, tokens // 2048, vocab, device="cuda", dtype=torch.bfloat16) * 4
    target = torch.randint(0, vocab, logits.shape[:-1], device="cuda")
    g = torch.rand(logits.shape[:-1], device="cuda")
    torch_ce = lambda z, t: F.cross_entropy(  # noqa: E731
        z.view(-1, vocab), t.view(-1), reduction="none").view(t.shape)
    ref = _fp32_reference(torch_ce, [logits, target], g)
    for name, fn in (("megatron native (compiled)",
                      lambda z, t: fused_vocab_parallel_cross_entropy(z, t, group)),
                     ("torch F.cross_entropy", torch_ce),
                     ("triton, two passes", vocab_parallel_cross_entropy)):
        rows.append(_fwd_bwd_case("cross_entropy", name, fn, [logits, target], g, ref, iters))
    return rows


def selection_cases(baseline: Path | None, iters: int) -> list[dict]:
    """One selection kernel call per block at each shape and rate (see the docstring)."""
    import importlib.util

    from megatron_sat import fused_selection
    from megatron_sat.selection import select
    variants = {"Triton (this tree)": fused_selection}
    if baseline is not None:
        spec = importlib.util.spec_from_file_location("baseline_fused_selection", baseline)
        variants[f"Triton ({baseline.name})"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(variants[f"Triton ({baseline.name})"])
    rows = []
    for shape, ffn, groups, qpg, head_dim in (("tinyllama", 5632, 4, 8, 64),
                                              ("llama2-7b", 11008, 32, 1, 128)):
        channel_scores = torch.randn(ffn, device="cuda").bfloat16()
        qkv_scores = torch.randn(groups * (qpg + 2) * head_dim, device="cuda").bfloat16()
        for r in (0.25, 0.5, 0.75):
            keep_channels = kept_channels(ffn, r)
            by_groups = qpg == 1  # MHA: whole heads (groups of one)
            keep_heads = kept_count(groups if by_groups else qpg, r)
            calls = {name: {
                "mlp": lambda m=m: m.select(channel_scores, keep_channels, "sampling", 0.05,
                                            "standard", 7, ffn),
                "attention": lambda m=m: m.select_heads(qkv_scores, groups, qpg, head_dim,
                                                        keep_heads, by_groups, "sampling",
                                                        0.05, "standard", 7)}
                for name, m in variants.items()}
            calls["torch"] = {"mlp": lambda: select(channel_scores, keep_channels, "sampling",
                                                    0.05, "standard", 7, ffn)}
            ref = {}  # this tree's outputs: its variant runs first
            for name, blocks in calls.items():
                for block, fn in blocks.items():
                    t0 = time.perf_counter()
                    out = fn()
                    torch.cuda.synchronize()
                    first = time.perf_counter() - t0
                    ref.setdefault(block, out)
                    rows.append({
                        "kernel": "selection", "variant": name, "rate": r,
                        "role": f"{shape} {block}", "first_call_s": first,
                        "median_ms": cuda_ms(fn, iters), "gpu_ms": gpu_ms(fn, iters),
                        "same_as_this_tree": (None if name == "torch" else all(
                            torch.equal(a, b) for a, b in zip(out, ref[block])) if block ==
                            "attention" else torch.equal(out, ref[block]))})
    return rows


CASES = {
    "swiglu": lambda a: swiglu_cases(a.tokens, a.ffn, a.iters),
    "rope": lambda a: rope_cases(2048, a.tokens // 2048, 4, 8, a.iters),
    "wgrad": lambda a: wgrad_cases(a.tokens, 2048, a.ffn, a.iters),
    "scatter": lambda a: scatter_cases(),
    "statistic": lambda a: statistic_cases(a.tokens, a.hidden),
    "norm_loss": lambda a: norm_loss_cases(a.tokens, a.hidden, 32000, a.iters),
    "selection": lambda a: selection_cases(a.selection_baseline, a.iters),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16 * 2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--hidden", type=int, default=2048,
                   help="row width of the norm cases (statistic, norm_loss)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--selection-baseline", type=Path,
                   help="another fused_selection.py to time against this tree's")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    megatron_fixes.apply()
    rows = [row for name in a.cases for row in CASES[name](a)]
    summary = {}
    for r in rows:
        key = f"{r['kernel']} | {r['variant']}"
        s = summary.setdefault(key, {"compile_s": 0.0, "median_ms": 0.0, "gpu_ms": 0.0})
        for field, value in (("compile_s", r["first_call_s"]), ("median_ms", r["median_ms"]),
                             ("gpu_ms", r["gpu_ms"])):
            s[field] += value
        print(f"{key:55s} r={r['rate']:.1f} {r.get('role', r.get('layer', '')):3s} "
              f"first {r['first_call_s']:6.2f} s  median {r['median_ms']:7.3f} ms  "
              f"GPU {r['gpu_ms']:7.3f} ms  err {r.get('max_error')}")
    for key, s in summary.items():
        print(f"{key:55s} all cases: first calls {s['compile_s']:.1f} s, sum of medians "
              f"{s['median_ms']:.2f} ms, of GPU times {s['gpu_ms']:.2f} ms")
    a.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "tokens": a.tokens,
                                 "hidden": a.hidden, "rows": rows, "summary": summary},
                                indent=1))


if __name__ == "__main__":
    main()
