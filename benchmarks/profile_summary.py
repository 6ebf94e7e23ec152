"""Where the GPU time of a training iteration goes, from a torch profiler chrome trace.

megatron's ``--profile --use-pytorch-profiler`` writes ``torch_profile/rank-N.json.gz``
with one ``ProfilerStep#k`` range per iteration. Each GPU kernel is assigned to the
iteration whose CPU range launched it (through the launch's correlation id), then per
iteration this reports:

* ``wall_ms``: the CPU range of the iteration (what the training loop waited for);
* ``gpu_busy_ms``: the union of kernel intervals (overlapping streams counted once);
* ``gpu_idle_fraction``: 1 - busy / wall: the GPU waiting for the host (launch overhead,
  Python, synchronisation) when large;
* ``host_sync_ms``: time the host spent in CUDA calls that wait for the device;
* kernel time by category (matmul, attention, index gather/scatter, elementwise, ...), the
  top kernels, and the number of kernel launches.

    python benchmarks/profile_summary.py runs/x/torch_profile/rank-0.json.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

CATEGORIES = [  # first match wins
    ("attention", re.compile(r"flash|fmha|cudnn|attention|sdpa", re.I)),
    ("matmul", re.compile(r"nvjet|gemm|cutlass|xmma|cublas|sm\d+_.*(tn|nt|nn|tt)", re.I)),
    ("index gather/scatter", re.compile(r"index|gather|scatter|indexing", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach|l2norm|lerp", re.I)),
    ("communication", re.compile(r"nccl|allreduce|all_gather|reduce_scatter", re.I)),
    ("sort/top-k", re.compile(r"sort|topk|radix|bitonic", re.I)),
    ("norm/reduction", re.compile(r"norm|reduce|softmax|cross_entropy|log_softmax", re.I)),
    ("copy/cast", re.compile(r"copy|cast|memcpy|memset|cat|fill", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|triton|unrolled|pointwise", re.I)),
]


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total / 1e3


_SYNC = re.compile(r"Synchronize|cudaMemcpy(?!Async)|cudaStreamWaitEvent", re.I)


def summarize(path: Path, last_sat_step: int = -1, top: int = 15) -> dict:
    """Per-iteration summary of the trace. ``ProfilerStep#k`` is megatron's 1-based
    iteration k; steps up to ``last_sat_step`` are labelled ``sat``, later ones ``dense``
    (bench_step.py profiles across its switch from SAT to dense)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    longest = {}  # a step appears on more than one track: keep the CPU range
    for e in events:
        if e.get("ph") == "X" and e.get("name", "").startswith("ProfilerStep#"):
            if e["dur"] > longest.get(e["name"], (0, 0))[1] - longest.get(e["name"], (0, 0))[0]:
                longest[e["name"]] = (e["ts"], e["ts"] + e["dur"])
    steps = sorted((start, stop, name) for name, (start, stop) in longest.items())
    launch_step, syncs = {}, defaultdict(lambda: defaultdict(float))
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver"):
            for i, (start, stop, _) in enumerate(steps):
                if start <= e["ts"] <= stop:
                    launch_step[e.get("args", {}).get("correlation")] = i
                    if _SYNC.search(e.get("name", "")):
                        syncs[i][e["name"]] += e["dur"] / 1e3
                    break
    kernels = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            i = launch_step.get(e.get("args", {}).get("correlation"))
            if i is not None:
                kernels[i].append(e)
    out = []
    for i, (start, stop, name) in enumerate(steps):
        ks = kernels[i]
        by_cat, by_name = defaultdict(float), defaultdict(float)
        for k in ks:
            by_cat[category(k["name"])] += k["dur"] / 1e3
            by_name[k["name"][:90]] += k["dur"] / 1e3
        wall = (stop - start) / 1e3
        busy = _union_ms([(k["ts"], k["ts"] + k["dur"]) for k in ks])
        number = int(name.split("#")[1])
        out.append({
            "step": name, "phase": "sat" if number <= last_sat_step else "dense",
            "wall_ms": wall, "host_sync_ms": dict(syncs[i]),
            "gpu_busy_ms": busy, "gpu_idle_fraction": 1 - busy / wall if wall else None,
            "kernel_launches": len(ks),
            "by_category_ms": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
            "top_kernels_ms": dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:top]),
        })
    return {"trace": str(path), "steps": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", type=Path)
    p.add_argument("--last-sat-step", type=int, default=-1)
    a = p.parse_args()
    print(json.dumps(summarize(a.trace, a.last_sat_step), indent=1))


if __name__ == "__main__":
    main()
