"""A whole LORS run against a dense run on the same data: wall-clock saving vs FLOPs saving.

Two launches of ``pretrain_sat.py`` (mock data, bf16, distributed optimizer, same seed and
batches): dense for T iterations, and SAT with LORS (r, eta, L; maxip + sampling). The
training time of each is the sum of megatron's per-iteration times (start-up and the
first ``--warmup`` iterations of both runs excluded). The FLOPs-predicted saving sums
``megatron_sat.flops.step_flops`` at each iteration's logged rate. Reports the measured
saving, the predicted one and their ratio (issue 4, target 5: >= 90%).

    python benchmarks/bench_lors.py --shape tinyllama --iters 300 --lors-start 200 \
        --micro-batch-size 8 --global-batch-size 8 --out results/lors_tinyllama.json
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


def launch(a, s: dict, sat: list[str], log: Path, port: int) -> list[tuple[int, float, float]]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-port", str(port), str(ROOT / "pretrain_sat.py"), *model_args(s),
           "--micro-batch-size", str(a.micro_batch_size),
           "--global-batch-size", str(a.global_batch_size), "--train-iters", str(a.iters),
           "--lr", "1e-4", "--min-lr", "1e-5", "--lr-decay-style", "cosine",
           "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size",
           str(s["vocab"] - 1), "--bf16", "--use-distributed-optimizer", "--log-interval", "1",
           "--eval-iters", "0", "--eval-interval", "100000", "--seed", "1234", *TUNED, *sat]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=bench_env())
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"pretrain_sat.py failed, see {log}")
    return [(int(i), float(ms), float(rate)) for i, ms, _, rate in
            _LINE.findall(proc.stdout + proc.stderr)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="tinyllama")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--lors-start", type=int, default=200)
    p.add_argument("--lors-ladders", type=int, default=5)
    p.add_argument("--rate", type=float, default=0.5)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    s = SHAPES[a.shape]
    log_dir = a.out.with_suffix("")
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    dense = launch(a, s, [], log_dir / "dense.log", 29541)
    sat = launch(a, s, ["--sat-omission-rate", str(a.rate), "--sat-metric", "maxip",
                        "--sat-selection", "sampling", "--sat-lors-start", str(a.lors_start),
                        "--sat-lors-ladders", str(a.lors_ladders)], log_dir / "sat.log", 29542)
    shape, tokens = shape_of(s), a.global_batch_size * s["seq"]
    timed = range(a.warmup + 1, a.iters + 1)
    ms = {name: {i: t for i, t, _ in rows} for name, rows in (("dense", dense), ("sat", sat))}
    rates = {i: r for i, _, r in sat}
    missing = [i for i in timed if i not in ms["dense"] or i not in ms["sat"]]
    if missing:
        raise RuntimeError(f"iterations missing from the logs: {missing[:10]}")
    dense_s = sum(ms["dense"][i] for i in timed) / 1e3
    sat_s = sum(ms["sat"][i] for i in timed) / 1e3
    dense_flops = sum(step_flops(shape, tokens, 0.0) for _ in timed)
    sat_flops = sum(step_flops(shape, tokens, rates[i]) for i in timed)
    measured, predicted = 1 - sat_s / dense_s, 1 - sat_flops / dense_flops
    dense_median = statistics.median(ms["dense"][i] for i in timed)
    by_rate = {}
    for rate in sorted(set(rates[i] for i in timed), reverse=True):
        times = [ms["sat"][i] for i in timed if rates[i] == rate]
        by_rate[rate] = {"iterations": len(times), "median_ms": statistics.median(times),
                         "dense_median_ms": dense_median}
    # The first iteration at a new rate compiles the fused kernels for the new widths
    # (megatron_fixes fix 3: one static kernel per width): a one-off cost per ladder.
    starts = [i for i in timed if i - 1 in rates and rates[i] != rates[i - 1]]
    ladder_start_s = sum(ms["sat"][i] - by_rate[rates[i]]["median_ms"] for i in starts) / 1e3
    steady = 1 - (sat_s - ladder_start_s) / dense_s
    result = {"shape": a.shape, **s, "iters": a.iters, "lors_start": a.lors_start,
              "lors_ladders": a.lors_ladders, "rate": a.rate,
              "micro_batch_size": a.micro_batch_size, "global_batch_size": a.global_batch_size,
              "timed_iterations": [timed.start, timed.stop - 1],
              "dense_train_s": dense_s, "sat_train_s": sat_s,
              "measured_saving": measured, "flops_predicted_saving": predicted,
              "saving_vs_predicted": measured / predicted,
              "by_rate": by_rate, "ladder_start_iterations": starts,
              "ladder_start_overhead_s": ladder_start_s,
              "saving_without_ladder_starts": steady,
              "saving_without_ladder_starts_vs_predicted": steady / predicted,
              "rates_by_iteration": rates, "ms_by_iteration": ms, "wall_s": time.time() - t0}
    a.out.write_text(json.dumps(result, indent=1))
    print(f"dense {dense_s:.1f} s, SAT+LORS {sat_s:.1f} s: saving {measured:.1%} measured, "
          f"{predicted:.1%} predicted by FLOPs ({measured / predicted:.0%} of it); without "
          f"the {ladder_start_s:.1f} s of the ladders' first iterations (compilation) "
          f"{steady:.1%} ({steady / predicted:.0%})")
    for rate, row in by_rate.items():
        print(f"  r = {rate:.3f}: {row['iterations']:3d} iterations, median "
              f"{row['median_ms']:.1f} ms (dense {row['dense_median_ms']:.1f} ms)")


if __name__ == "__main__":
    main()
