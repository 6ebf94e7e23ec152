"""End-to-end smoke benchmark: dense vs SAT through ``pretrain_sat.py``, in one run.

Trains a model of a named shape with mock data for a few iterations, once dense and once
per SAT rate, each through the real entry point (megatron training loop, distributed
optimizer, bf16), and reports the median iteration time after warm-up, tokens/s, the
ratio to dense and the ideal ratio (dense FLOPs / sparse FLOPs, counting what SAT does
not shrink: embeddings, LM head, norms and, in ``heads`` mode, the K/V projections).

    python benchmarks/smoke_pretrain.py --shape tinyllama --rates 0 0.5 --out results.json
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

SHAPES = {
    # layers, hidden, heads, kv groups, ffn, vocab, seq
    "tinyllama": dict(layers=22, hidden=2048, heads=32, groups=4, ffn=5632, vocab=32000,
                      seq=2048),
    "llama2-7b-8l": dict(layers=8, hidden=4096, heads=32, groups=32, ffn=11008, vocab=32000,
                         seq=4096),
    "tiny": dict(layers=2, hidden=64, heads=4, groups=2, ffn=128, vocab=256, seq=64),
}


def step_flops(s: dict, tokens: int, rate: float) -> float:
    """Training FLOPs (fwd + bwd = 3x fwd) of one step at omission rate ``rate``.

    Attention and MLP shrink by the kept fraction k = (1 - r) in ``heads`` mode: Q and O
    projections, the score/value products and the whole MLP. K/V projections,
    embeddings (no FLOPs), the LM head and norms do not.
    """
    h, f, L, seq = s["hidden"], s["ffn"], s["layers"], s["seq"]
    hd = h // s["heads"]
    kv = 2 * s["groups"] * hd
    q_per_group = s["heads"] // s["groups"]
    keep_heads = (q_per_group - int(q_per_group * rate + 1e-9)) / q_per_group \
        if q_per_group > 1 else 1 - rate
    keep_ffn = (f - int(f * rate + 1e-9)) / f
    if q_per_group == 1:  # MHA: K/V go with the heads
        attn_proj = 2 * tokens * h * (2 * h + kv) * keep_heads
    else:
        attn_proj = 2 * tokens * h * (2 * h * keep_heads + kv)
    scores = 2 * 2 * tokens * seq * h * keep_heads / 2  # causal: half of QK^T and PV
    mlp = 2 * tokens * h * f * 3 * keep_ffn
    head = 2 * tokens * h * s["vocab"]
    return 3 * (L * (attn_proj + scores + mlp) + head)


def pretrain_args(s: dict, mbs: int, gbs: int, iters: int) -> list[str]:
    return [
        "--num-layers", str(s["layers"]), "--hidden-size", str(s["hidden"]),
        "--num-attention-heads", str(s["heads"]), "--group-query-attention",
        "--num-query-groups", str(s["groups"]), "--ffn-hidden-size", str(s["ffn"]),
        "--seq-length", str(s["seq"]), "--max-position-embeddings", str(s["seq"]),
        "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs),
        "--train-iters", str(iters), "--lr", "1e-4", "--min-lr", "1e-5",
        "--lr-decay-style", "cosine", "--mock-data", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", str(s["vocab"] - 1), "--make-vocab-size-divisible-by", "128",
        "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
        "--untie-embeddings-and-output-weights", "--disable-bias-linear",
        "--attention-dropout", "0", "--hidden-dropout", "0", "--bf16",
        "--use-distributed-optimizer", "--no-gradient-accumulation-fusion",
        "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "100000",
        "--no-rope-fusion", "--no-persist-layer-norm", "--seed", "1234",
    ]


_ITER = re.compile(r"iteration\s+(\d+)/\s*\d+.*?elapsed time per iteration \(ms\): ([\d.]+)"
                   r".*?lm loss: ([\d.E+-]+)")


def run_one(s, rate, mbs, gbs, iters, warmup, log_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-port", str(29500 + int(rate * 100)), str(ROOT / "pretrain_sat.py"),
           *pretrain_args(s, mbs, gbs, iters), "--sat-omission-rate", str(rate)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    log = proc.stdout + proc.stderr
    (log_dir / f"pretrain_r{rate}.log").write_text(log)
    if proc.returncode != 0:
        raise RuntimeError(f"rate {rate} failed:\n{log[-4000:]}")
    iters_ms = {int(i): float(ms) for i, ms, _ in _ITER.findall(log)}
    losses = {int(i): float(loss) for i, _, loss in _ITER.findall(log)}
    times = [ms for i, ms in sorted(iters_ms.items()) if i > warmup]
    ms = statistics.median(times)
    return {"rate": rate, "median_ms": ms, "tokens_per_s": gbs * s["seq"] / (ms / 1000),
            "ms_per_iteration": [iters_ms[i] for i in sorted(iters_ms)],
            "loss": [losses[i] for i in sorted(losses)], "wall_s": time.time() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="tinyllama")
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    s = SHAPES[a.shape]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    runs = [run_one(s, r, a.micro_batch_size, a.global_batch_size, a.iters, a.warmup,
                    a.out.parent) for r in a.rates]
    dense = next((r for r in runs if r["rate"] == 0.0), runs[0])
    tokens = a.global_batch_size * s["seq"]
    for r in runs:
        r["speedup"] = r["tokens_per_s"] / dense["tokens_per_s"]
        r["ideal_speedup"] = step_flops(s, tokens, dense["rate"]) / step_flops(s, tokens, r["rate"])
        r["model_tflops_per_s"] = step_flops(s, tokens, r["rate"]) / (r["median_ms"] / 1000) / 1e12
        print(f"r={r['rate']:.2f}  {r['median_ms']:8.1f} ms/it  {r['tokens_per_s']:9.0f} tok/s  "
              f"speedup {r['speedup']:.3f} (ideal {r['ideal_speedup']:.3f})  "
              f"{r['model_tflops_per_s']:.0f} TFLOP/s computed")
    result = {"shape": a.shape, **s, "micro_batch_size": a.micro_batch_size,
              "global_batch_size": a.global_batch_size, "iters": a.iters, "runs": runs}
    a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
