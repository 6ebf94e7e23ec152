"""A whole LORS run against a dense run on the same data: wall-clock saving vs FLOPs saving.

Two launches of ``pretrain_sat.py`` (mock data, bf16, distributed optimizer, same seed and
batches): dense for T iterations, and SAT with LORS (r, eta, L; maxip + sampling). The
training time of each is the sum over megatron's log lines of the mean time per iteration
times the iterations since the previous line (start-up and the log windows that begin
within the first ``--warmup`` iterations excluded, in both runs). The FLOPs-predicted
saving sums ``megatron_sat.flops.step_flops`` at each iteration's rate (Eq. 11; the logged
window means are checked against it). Reports the measured saving, the predicted one and
their ratio (issue 4, target 5: >= 90%).

A run too long for one sitting (a larger global batch) splits in two on the same GPU:
``--dense-only`` launches the dense run and writes its log lines, ``--dense-from`` then
takes them instead of launching it again; the GPU's UUID must be the same.

``--log-interval`` (default 10) is how often megatron logs, as in a production run; every
log line synchronises the GPU. ``--log-interval 1`` times every iteration, for a per-rate
table and the cost of each ladder's first iteration.

    python benchmarks/bench_lors.py --shape tinyllama --iters 300 --lors-start 200 \
        --micro-batch-size 16 --global-batch-size 16 --out results/lors_tinyllama.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import (_LINE, ROOT, SHAPES, TUNED, bench_env, model_args,  # noqa: E402
                        shape_of)
from megatron_sat.flops import step_flops  # noqa: E402
from megatron_sat.schedule import lors_rate  # noqa: E402


def launch(a, s: dict, sat: list[str], log: Path, port: int) -> list[tuple[int, float, float]]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-port", str(port), str(ROOT / "pretrain_sat.py"), *model_args(s),
           "--micro-batch-size", str(a.micro_batch_size),
           "--global-batch-size", str(a.global_batch_size), "--train-iters", str(a.iters),
           "--lr", "1e-4", "--min-lr", "1e-5", "--lr-decay-style", "cosine",
           "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size",
           str(s["vocab"] - 1), "--bf16", "--use-distributed-optimizer", "--log-interval", str(a.log_interval),
           "--eval-iters", "0", "--eval-interval", "100000", "--seed", "1234", *TUNED, *sat,
           *a.extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=bench_env())
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"pretrain_sat.py failed, see {log}")
    return [(int(i), float(ms), float(rate)) for i, ms, _, rate in
            _LINE.findall(proc.stdout + proc.stderr)]


def gpu_uuid() -> str:
    """The UUID of the GPU the runs use (the first visible one), or "" without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""
    return out.split()[0] if out.split() else ""


def windows(rows: list[tuple[int, float, float]], first: int, interval: int) -> list[dict]:
    """Log lines as windows of iterations: ``(previous logged, logged]`` with megatron's mean
    time per iteration and mean omission rate; those starting before ``first`` are dropped.
    megatron's extra line after iteration 1 does not restart its window: it is skipped."""
    out, previous = [], 0
    for iteration, ms, rate in sorted(rows):
        if iteration % interval:
            continue
        if previous + 1 >= first:
            out.append({"iterations": [previous + 1, iteration], "ms": ms, "rate": rate})
        previous = iteration
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="tinyllama")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--lors-start", type=int, default=200)
    p.add_argument("--lors-ladders", type=int, default=5)
    p.add_argument("--rate", type=float, default=0.5)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further pretrain_sat.py flags for both runs")
    p.add_argument("--dense-only", action="store_true",
                   help="launch the dense run only and write its log lines to --out")
    p.add_argument("--dense-from", type=Path, default=None,
                   help="the --out of an earlier --dense-only call with the same flags, "
                        "on the same GPU, instead of launching the dense run")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    s = SHAPES[a.shape]
    log_dir = a.out.with_suffix("")
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    flags = {k: getattr(a, k) for k in ("shape", "iters", "micro_batch_size",
                                        "global_batch_size", "log_interval", "extra")}
    uuid = gpu_uuid()
    if a.dense_from is not None:
        part = json.loads(a.dense_from.read_text())
        if part["flags"] != flags or part["gpu_uuid"] != uuid:
            raise SystemExit(f"--dense-from {a.dense_from}: its run had flags {part['flags']} "
                             f"on GPU {part['gpu_uuid']!r}; this call has {flags} on {uuid!r}")
        dense = [tuple(row) for row in part["dense_rows"]]
    else:
        dense = launch(a, s, [], log_dir / "dense.log", 29541)
    if a.dense_only:
        a.out.write_text(json.dumps({"flags": flags, "gpu_uuid": uuid, "dense_rows": dense,
                                     "wall_s": time.time() - t0}, indent=1))
        print(f"dense run: {len(dense)} log lines on GPU {uuid} -> {a.out}")
        return
    sat = launch(a, s, ["--sat-omission-rate", str(a.rate), "--sat-metric", "maxip",
                        "--sat-selection", "sampling", "--sat-lors-start", str(a.lors_start),
                        "--sat-lors-ladders", str(a.lors_ladders)], log_dir / "sat.log", 29542)
    shape, tokens = shape_of(s), a.global_batch_size * s["seq"]
    runs = {name: windows(rows, a.warmup + 1, a.log_interval)
            for name, rows in (("dense", dense), ("sat", sat))}
    if [w["iterations"] for w in runs["dense"]] != [w["iterations"] for w in runs["sat"]]:
        raise RuntimeError(f"the runs logged different iterations, see {log_dir}")
    first, last = runs["sat"][0]["iterations"][0], runs["sat"][-1]["iterations"][1]
    if last != a.iters:
        raise RuntimeError(f"the logs end at iteration {last}, not {a.iters}")
    rate = {t: lors_rate(t, a.rate, a.lors_start, a.iters, a.lors_ladders)
            for t in range(first, last + 1)}
    for w in runs["sat"]:  # the schedule is what ran (the log prints 7 digits)
        lo, hi = w["iterations"]
        expected = statistics.fmean(rate[t] for t in range(lo, hi + 1))
        if abs(w["rate"] - expected) > 1e-4:
            raise RuntimeError(f"iterations {lo}-{hi} logged rate {w['rate']}, "
                               f"Eq. 11 gives {expected}")
    train_s = {name: sum(w["ms"] * (w["iterations"][1] - w["iterations"][0] + 1) for w in ws)
               / 1e3 for name, ws in runs.items()}
    dense_flops = step_flops(shape, tokens, 0.0) * len(rate)
    sat_flops = sum(step_flops(shape, tokens, r) for r in rate.values())
    measured = 1 - train_s["sat"] / train_s["dense"]
    predicted = 1 - sat_flops / dense_flops
    dense_median = statistics.median(w["ms"] for w in runs["dense"])
    by_rate = {}  # windows that ran one rate throughout
    for r in sorted(set(rate.values()), reverse=True):
        ms = [w["ms"] for w in runs["sat"]
              if {rate[t] for t in range(w["iterations"][0], w["iterations"][1] + 1)} == {r}]
        if ms:
            by_rate[r] = {"windows": len(ms), "median_ms": statistics.median(ms),
                          "dense_median_ms": dense_median,
                          "ideal_ratio": step_flops(shape, tokens, 0.0)
                          / step_flops(shape, tokens, r)}
    result = {"shape": a.shape, **s, "iters": a.iters, "lors_start": a.lors_start,
              "lors_ladders": a.lors_ladders, "rate": a.rate,
              "micro_batch_size": a.micro_batch_size, "global_batch_size": a.global_batch_size,
              "log_interval": a.log_interval, "extra": a.extra, "gpu_uuid": uuid,
              "dense_from": str(a.dense_from) if a.dense_from else None,
              "timed_iterations": [first, last],
              "dense_train_s": train_s["dense"], "sat_train_s": train_s["sat"],
              "measured_saving": measured, "flops_predicted_saving": predicted,
              "saving_vs_predicted": measured / predicted, "by_rate": by_rate,
              "windows": runs, "wall_s": time.time() - t0}
    a.out.write_text(json.dumps(result, indent=1))
    print(f"dense {train_s['dense']:.1f} s, SAT+LORS {train_s['sat']:.1f} s (iterations "
          f"{first}-{last}, log interval {a.log_interval}): saving {measured:.1%} measured, "
          f"{predicted:.1%} predicted by FLOPs ({measured / predicted:.0%} of it)")
    for r, row in by_rate.items():
        print(f"  r = {r:.3f}: {row['windows']:3d} windows, median {row['median_ms']:.1f} ms "
              f"(dense {row['dense_median_ms']:.1f} ms; {dense_median / row['median_ms']:.3f}x,"
              f" ideal {row['ideal_ratio']:.3f}x)")


if __name__ == "__main__":
    main()
