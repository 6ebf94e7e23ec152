"""Whole training step, SAT vs dense, in ONE run of ``pretrain_sat.py``.

Each case is one launch of the real entry point (megatron's training loop, bf16, the
distributed optimizer, mock data) through ``alternating_rate.py``: blocks of ``--block``
iterations at omission rate r alternate with dense blocks, ``--cycles`` times. Both phases
share the process, the model, the memory pool and the GPU clocks, and interleave, so a
drift of the GPU's speed hits both. The first cycle (compilation) and the first
iteration after every switch are not timed. The rate of every iteration is read back
from megatron's log line, never assumed.

For each phase it reports the median iteration time, tokens/s, model TFLOP/s and MFU
(megatron_sat.flops, 989 TFLOP/s peak), and the SAT/dense ratio next to the ideal ratio
(dense FLOPs over SAT FLOPs, everything that does not shrink included), and each phase's
peak allocated memory: the largest peak of its blocks, which ``alternating_rate.py``
measures block by block. With
``--profile`` megatron's torch profiler records the last two SAT and the first two dense
iterations of the second cycle, and ``profile_summary.py`` turns the trace into a table of
where the GPU time goes.

    python benchmarks/bench_step.py --shape tinyllama --micro-batch-size 4 \
        --global-batch-size 32 --out benchmarks/results/step_tinyllama_mbs4.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from profile_summary import summarize  # noqa: E402
from megatron_sat.flops import ModelShape, padded_vocab_size, step_flops  # noqa: E402

SHAPES = {
    # layers, hidden, heads, kv groups, ffn, vocab, seq
    "tinyllama": dict(layers=22, hidden=2048, heads=32, groups=4, ffn=5632, vocab=32000,
                      seq=2048),
    "llama2-7b-8l": dict(layers=8, hidden=4096, heads=32, groups=32, ffn=11008, vocab=32000,
                         seq=4096),
    "tiny": dict(layers=2, hidden=64, heads=4, groups=2, ffn=128, vocab=256, seq=64),
}

# What megatron-core offers without Transformer Engine or Apex. Always on: the fused
# SwiGLU (megatron's default), torch SDPA flash/cuDNN attention (SAT's core attention).
# --rerun-mode disabled: no replay of an iteration whose loss or gradient is NaN/Inf
# (megatron's default validate_results); the checks still stop the run, read at log lines
# (megatron_sat.host_syncs), so no host read is left between two iterations.
TUNED = ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "native",
         "--manual-gc", "--manual-gc-interval", "50", "--rerun-mode", "disabled"]
# megatron's plain-torch fallbacks for RoPE, Adam, the gradient norm and (for want of
# Apex) unfused gradient accumulation, instead of megatron_sat.torch_fusions.
NO_TORCH_FUSIONS = ["--no-sat-torch-fusions", "--no-gradient-accumulation-fusion"]
FLAG_SETS = {
    "baseline": NO_TORCH_FUSIONS,  # megatron's defaults
    "tuned-megatron": TUNED + NO_TORCH_FUSIONS,  # all megatron-core itself offers
    "tuned": TUNED,  # and megatron_sat.torch_fusions (the default of pretrain_sat.py)
}
PEAK_TFLOPS = 989.0  # H100 SXM dense bf16


def model_args(s: dict) -> list[str]:
    return [
        "--num-layers", str(s["layers"]), "--hidden-size", str(s["hidden"]),
        "--num-attention-heads", str(s["heads"]), "--group-query-attention",
        "--num-query-groups", str(s["groups"]), "--ffn-hidden-size", str(s["ffn"]),
        "--seq-length", str(s["seq"]), "--max-position-embeddings", str(s["seq"]),
        "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
        "--untie-embeddings-and-output-weights", "--disable-bias-linear",
        "--attention-dropout", "0", "--hidden-dropout", "0",
        # need Transformer Engine or Apex (megatron_sat.torch_fusions compiles the RoPE)
        "--no-rope-fusion", "--no-persist-layer-norm",
    ]


def bench_env() -> dict[str, str]:
    """The launch environment: this checkout on PYTHONPATH, and torch's expandable memory
    segments unless PYTORCH_CUDA_ALLOC_CONF is set (with fixed-size segments the dense
    TinyLlama step at micro-batch 16 runs out of memory through fragmentation, about 6 GiB
    reserved but unallocated; SAT's widths change at every LORS ladder, too)."""
    return {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": os.environ.get(
                "PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")]))}


def shape_of(s: dict) -> ModelShape:
    return ModelShape(num_layers=s["layers"], hidden_size=s["hidden"],
                      ffn_hidden_size=s["ffn"], num_attention_heads=s["heads"],
                      num_query_groups=s["groups"], kv_channels=s["hidden"] // s["heads"],
                      seq_length=s["seq"], padded_vocab_size=padded_vocab_size(s["vocab"]))


_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([\d.]+)"
                   r".*?lm loss: ([\d.E+-]+).*?sat omission rate: ([\d.E+-]+)")
_BLOCK_PEAK = re.compile(r"\[bench\] block (\d+) rate ([\d.]+) peak allocated ([\d.]+) MB")


def phase_peaks(log: str, rate: float) -> tuple[list[dict], dict[str, float | None]]:
    """Each block's peak allocated memory (``alternating_rate.py``'s lines), and the
    largest of each phase in GiB: r's blocks ("sat") and the dense ones."""
    blocks = [{"block": int(b), "rate": float(r), "peak_allocated_mb": float(mb)}
              for b, r, mb in _BLOCK_PEAK.findall(log)]
    peaks = {}
    for name, phase_rate in (("sat", rate), ("dense", 0.0)):
        mbs = [b["peak_allocated_mb"] for b in blocks if abs(b["rate"] - phase_rate) < 1e-9]
        peaks[name] = max(mbs) / 1024 if mbs else None
    return blocks, peaks


def timed_iterations(rates: dict[int, float], first: int, interval: int = 1) -> list[int]:
    """Logged iterations from ``first`` on whose predecessor ran at the same rate.

    With a log interval L megatron logs every L-th iteration i with the mean time of
    (i - L, i]; such a window is timed when the window before it ran at the same rate,
    so the first window after a switch is not."""
    return [i for i, r in rates.items() if i >= first and rates.get(i - interval) == r]


def run_case(a, s: dict, log_dir: Path) -> dict:
    total = 2 * a.block * a.cycles
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-port", str(a.port), str(ROOT / "benchmarks" / "alternating_rate.py"),
           *model_args(s),
           "--micro-batch-size", str(a.micro_batch_size),
           "--global-batch-size", str(a.global_batch_size), "--train-iters", str(total),
           "--lr", "1e-4", "--min-lr", "1e-5", "--lr-decay-style", "cosine",
           "--mock-data", "--tokenizer-type", "NullTokenizer",
           "--vocab-size", str(s["vocab"] - 1), "--bf16", "--use-distributed-optimizer",
           "--log-interval", str(a.log_interval), "--eval-iters", "0",
           "--eval-interval", "100000", "--seed", "1234",
           "--tensorboard-dir", str(log_dir / "tensorboard"),
           # megatron's default of 1 reads the loss on the host after every iteration
           "--tensorboard-log-interval", str(a.log_interval),
           "--sat-omission-rate", str(a.rate), "--sat-metric", a.metric,
           "--sat-selection", a.selection, "--sat-gqa-mode", a.gqa_mode,
           *FLAG_SETS[a.flags], *a.extra]
    profiled: set[int] = set()
    if a.profile:
        # megatron's profiler window [start, start + steps) of 1-based iterations: by
        # default the last two SAT and the first two dense ones of the second cycle. The
        # iterations near it are not timed.
        start = 3 * a.block - 1 if a.profile_start is None else a.profile_start
        cmd += ["--profile", "--use-pytorch-profiler", "--profile-step-start", str(start),
                "--profile-step-end", str(start + a.profile_steps)]
        profiled = set(range(start - 2, start + a.profile_steps + 3))
    t0 = time.time()
    env = {**bench_env(), "SAT_BENCH_BLOCK": str(a.block),
           "SAT_BENCH_TRITON": "0" if a.no_triton else "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    log = proc.stdout + proc.stderr
    (log_dir / "pretrain.log").write_text(log)
    if proc.returncode != 0:  # e.g. the dense phase runs out of memory: keep the SAT one
        print(f"pretrain_sat.py exited with {proc.returncode}:\n{log[-3000:]}")
    rows = [(int(i), float(ms), float(loss), float(rate))
            for i, ms, loss, rate in _LINE.findall(log)]
    tokens = a.global_batch_size * s["seq"]
    shape = shape_of(s)
    rates = {i: r for i, _, _, r in rows}
    timed = set(timed_iterations(rates, 2 * a.block + 1, a.log_interval)) - profiled
    phases = {}
    for name, rate in (("sat", a.rate), ("dense", 0.0)):
        times = [ms for i, ms, _, r in rows if abs(r - rate) < 1e-9 and i in timed]
        if not times:
            phases[name] = None
            continue
        ms = statistics.median(times)
        flops = step_flops(shape, tokens, rate, gqa_mode=a.gqa_mode)
        phases[name] = {"rate": rate, "timed_iterations": len(times), "median_ms": ms,
                        "tokens_per_s": tokens / (ms / 1e3),
                        "model_tflops_per_s": flops / (ms / 1e3) / 1e12,
                        "mfu": flops / (ms / 1e3) / 1e12 / PEAK_TFLOPS}
    dense_flops = step_flops(shape, tokens, 0.0)
    blocks, peaks = phase_peaks(log, a.rate)
    sat, dense = phases["sat"], phases["dense"]
    if sat:
        sat["dense_equivalent_tflops_per_s"] = dense_flops / (sat["median_ms"] / 1e3) / 1e12
    result = {"case": a.name, "shape": a.shape, **s, "micro_batch_size": a.micro_batch_size,
              "global_batch_size": a.global_batch_size, "flags": a.flags,
              "log_interval": a.log_interval,
              "extra": a.extra, "triton_kernels": not a.no_triton,
              "returncode": proc.returncode, "phases": phases,
              "speedup": dense["median_ms"] / sat["median_ms"] if sat and dense else None,
              "ideal_speedup": dense_flops / step_flops(shape, tokens, a.rate,
                                                        gqa_mode=a.gqa_mode),
              "peak_allocated_gib": peaks, "block_peaks": blocks,
              "iterations": [{"iteration": i, "ms": ms, "loss": loss, "rate": r}
                             for i, ms, loss, r in rows],
              "wall_s": time.time() - t0}
    if result["speedup"]:
        result["fraction_of_ideal"] = ((result["speedup"] - 1)
                                       / (result["ideal_speedup"] - 1))
    if a.profile:
        traces = sorted((log_dir / "torch_profile").glob("rank-*.json.gz"))
        result["profile"] = summarize(traces[0], rates) if traces else None
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="tinyllama")
    p.add_argument("--name", default=None, help="case name in the JSON (default: shape)")
    p.add_argument("--layers", type=int, default=None,
                   help="number of layers (default: the shape's; the Llama-2-7B layer shape "
                        "takes as many as fit)")
    p.add_argument("--rate", type=float, default=0.5)
    p.add_argument("--metric", default="maxip")
    p.add_argument("--selection", default="sampling")
    p.add_argument("--gqa-mode", default="heads")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=32)
    p.add_argument("--block", type=int, default=4,
                   help="iterations per SAT or dense block (default 4)")
    p.add_argument("--cycles", type=int, default=4,
                   help="SAT + dense block pairs; the first is not timed (default 4)")
    p.add_argument("--flags", choices=FLAG_SETS, default="tuned")
    p.add_argument("--log-interval", type=int, default=1,
                   help="megatron's --log-interval L (must divide --block). Each log line "
                        "synchronises the GPU; L > 1 times the mean of L iterations, "
                        "the first window after a switch untimed")
    p.add_argument("--no-triton", action="store_true",
                   help="without megatron-sat's Triton SwiGLU (A/B; alternating_rate.py)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--profile-start", type=int, default=None,
                   help="first profiled iteration (default: the second cycle's last two "
                        "SAT iterations, then two dense ones)")
    p.add_argument("--profile-steps", type=int, default=4)
    p.add_argument("--port", type=int, default=29533)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("extra", nargs="*", help="more pretrain_sat.py flags (after --)")
    a = p.parse_args()
    if a.log_interval < 1 or a.block % a.log_interval:
        p.error(f"--log-interval {a.log_interval} must divide --block {a.block}")
    a.name = a.name or a.shape
    s = SHAPES[a.shape] | ({"layers": a.layers} if a.layers else {})
    log_dir = a.out.with_suffix("")
    log_dir.mkdir(parents=True, exist_ok=True)
    r = run_case(a, s, log_dir)
    a.out.write_text(json.dumps(r, indent=1))
    sat, dense = r["phases"]["sat"], r["phases"]["dense"]
    if not (sat and dense):
        sys.exit(f"{a.name}: SAT {sat}, dense {dense} (see {log_dir}/pretrain.log)")
    print(f"{a.name}: dense {dense['median_ms']:.1f} ms {dense['tokens_per_s']:,.0f} tok/s "
          f"MFU {dense['mfu']:.1%} | SAT r={a.rate} {sat['median_ms']:.1f} ms "
          f"{sat['tokens_per_s']:,.0f} tok/s | speedup {r['speedup']:.3f} "
          f"(ideal {r['ideal_speedup']:.3f}: {r['speedup'] / r['ideal_speedup']:.1%} of it, "
          f"{r['fraction_of_ideal']:.0%} of the ideal gain) | peak allocated: "
          + ", ".join(f"{k} {v:.2f} GiB" for k, v in r["peak_allocated_gib"].items()
                      if v is not None))


if __name__ == "__main__":
    main()
