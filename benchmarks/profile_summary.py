"""Where the GPU time of a training iteration goes, from a torch profiler chrome trace.

megatron's ``--profile --use-pytorch-profiler`` writes ``torch_profile/rank-N.json.gz``
with one ``ProfilerStep#k`` range per iteration. Each GPU kernel is assigned to the
iteration whose CPU range launched it (through the launch's correlation id), then per
iteration this reports:

* ``wall_ms``: the CPU range of the iteration (what the training loop waited for);
* ``gpu_span_ms``: from the first kernel of the iteration to the end of its last one: the
  iteration as the GPU ran it. Once the host runs ahead of the GPU (no read between
  iterations), the host's range and the GPU's no longer line up, so the figures below are
  taken over the GPU span; ``host_lead_ms`` is how long after the host's range began the
  first kernel started;
* ``gpu_busy_ms``: the union of kernel intervals (overlapping streams counted once);
* ``gpu_idle_fraction``: 1 - busy / span: the GPU waiting for the host (launch overhead,
  Python, synchronisation) when large;
* ``host_sync_ms``: time the host spent in CUDA calls that wait for the device;
* kernel time by category (matmul, attention, index gather/scatter, elementwise, ...), the
  top kernels, and the number of kernel launches;
* ``gpu_idle_by_op_ms``: the GPU's idle gaps (>= 20 us) by what the host was doing: each
  gap is charged to the host operation that launched the kernel ending it (the outermost
  one under the step, e.g. ``aten::index_select`` or an autograd backward function), so
  host-bound stretches show which code the GPU waited for;
* ``gpu_idle_by_pass_ms``: the same gaps by pass: ``backward`` when an autograd engine
  function launched the kernel ending the gap, else ``forward/other``;
* ``timeline``: the iteration's GPU span in 20 equal slices, each with the GPU's busy fraction and
  the median lead of the host (kernel start minus its launch: near zero where the GPU
  waits for the host, large where the host runs ahead), and the largest gaps with their
  offset in the iteration and the host's op stack.

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
    # torch's top-k and sort, and megatron_sat.fused_selection's *_select_kernel
    ("sort/top-k", re.compile(r"sort|topk|radix|bitonic|select_kernel", re.I)),
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


def _enclosing_ops(ops: list[dict], times: list[float]) -> list[list[str]]:
    """For each time (sorted), the names of the ops of one thread that contain it,
    outermost first (a sweep with a stack: ops of one thread nest)."""
    ops = sorted(ops, key=lambda e: (e["ts"], -e["dur"]))
    stack, out, i = [], [], 0
    for t in times:
        while i < len(ops) and ops[i]["ts"] <= t:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] < ops[i]["ts"]:
                stack.pop()
            stack.append(ops[i])
            i += 1
        while stack and stack[-1]["ts"] + stack[-1]["dur"] < t:
            stack.pop()
        out.append([e["name"] for e in stack if e["ts"] + e["dur"] >= t])
    return out


def _gaps(kernels: list[dict], launches: dict, cpu_ops: dict,
          min_us: float = 20.0) -> list[tuple[float, float, list[str]]]:
    """GPU idle gaps (>= ``min_us``): (start us, length us, the host op stack, outermost
    first, of the launch of the kernel that ends the gap)."""
    gaps, end = [], None
    for k in sorted(kernels, key=lambda k: k["ts"]):
        if end is not None and k["ts"] - end >= min_us:
            launch = launches.get(k.get("args", {}).get("correlation"))
            if launch is not None:
                gaps.append((launch["tid"], launch["ts"], end, k["ts"] - end))
        end = k["ts"] + k["dur"] if end is None else max(end, k["ts"] + k["dur"])
    out = []
    for tid in {g[0] for g in gaps}:
        mine = sorted((g for g in gaps if g[0] == tid), key=lambda g: g[1])
        names = _enclosing_ops(cpu_ops.get(tid, []), [g[1] for g in mine])
        for (_, _, start, gap), chain in zip(mine, names):
            out.append((start, gap, [n for n in chain if not n.startswith("ProfilerStep#")]))
    return sorted(out)


def _idle_by_op(gaps, top: int = 15) -> dict:
    """GPU idle gaps charged to the host op that launched the kernel ending each gap."""
    by_op = defaultdict(float)
    for _, gap, chain in gaps:
        by_op[chain[0][:90] if chain else "(no op)"] += gap / 1e3
    return dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:top])


def _idle_by_pass(gaps) -> dict:
    by_pass = defaultdict(float)
    for _, gap, chain in gaps:
        backward = any(n.startswith("autograd::engine") for n in chain)
        by_pass["backward" if backward else "forward/other"] += gap / 1e3
    return dict(by_pass)


def _timeline(kernels: list[dict], launches: dict, gaps, start: float, stop: float,
              slices: int = 20, top: int = 12) -> dict:
    """Busy fraction and median host lead per slice of [start, stop]; the largest gaps."""
    width = (stop - start) / slices
    busy, leads = [0.0] * slices, [[] for _ in range(slices)]
    for k in kernels:
        a, b = k["ts"], k["ts"] + k["dur"]
        first, last = int((a - start) // width), int((b - start) // width)
        for i in range(max(0, first), min(slices, last + 1)):
            lo, hi = start + i * width, start + (i + 1) * width
            busy[i] += max(0.0, min(b, hi) - max(a, lo))
        launch = launches.get(k.get("args", {}).get("correlation"))
        i = int((a - start) // width)
        if launch is not None and 0 <= i < slices:
            leads[i].append(a - launch["ts"])
    return {
        "slice_ms": width / 1e3,
        "busy_fraction": [round(b / width, 3) for b in busy],
        "median_host_lead_ms": [round(sorted(x)[len(x) // 2] / 1e3, 3) if x else None
                                for x in leads],
        "largest_gaps": [{"at_ms": round((t - start) / 1e3, 2), "gap_ms": round(g / 1e3, 3),
                          "host_ops": [n[:70] for n in chain[:4]]}
                         for t, g, chain in sorted(gaps, key=lambda x: -x[1])[:top]],
    }


_SYNC = re.compile(r"Synchronize|cudaMemcpy(?!Async)|cudaStreamWaitEvent", re.I)


def phase_of(iteration: int, rates: dict[int, float]) -> str:
    """``sat`` or ``dense`` for a 1-based iteration, from megatron's logged rates. With a
    log interval above 1 only every interval-th iteration is logged, with its window's
    mean: an iteration takes the rate of the first logged iteration at or after it."""
    logged = [i for i in sorted(rates) if i >= iteration]
    return "sat" if logged and rates[logged[0]] > 0 else "dense"


def summarize(path: Path, rates: dict[int, float] | None = None, top: int = 40) -> dict:
    """Per-iteration summary of the trace. ``ProfilerStep#k`` is megatron's 1-based
    iteration k; ``rates`` (iteration -> omission rate, from megatron's log) labels each
    step ``sat`` or ``dense`` (:func:`phase_of`). Kernels belong to the iteration whose
    host range launched them (through the launch's correlation id), whenever they ran."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    # A step appears on the host's track (``user_annotation``) and, as the span of the
    # kernels it launched, on the GPU's (``gpu_user_annotation``); launches are matched to
    # the host's range. Taking the longer of the two (as before) picked the GPU's range
    # once the host ran a step ahead, and charged launches to the wrong steps.
    host_range = {}
    for e in events:
        if (e.get("ph") == "X" and e.get("cat") == "user_annotation"
                and e.get("name", "").startswith("ProfilerStep#")):
            host_range[e["name"]] = (e["ts"], e["ts"] + e["dur"])
    steps = sorted((start, stop, name) for name, (start, stop) in host_range.items())
    launch_step, syncs = {}, defaultdict(lambda: defaultdict(float))
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver"):
            for i, (start, stop, _) in enumerate(steps):
                if start <= e["ts"] <= stop:
                    launch_step[e.get("args", {}).get("correlation")] = i
                    if _SYNC.search(e.get("name", "")):
                        syncs[i][e["name"]] += e["dur"] / 1e3
                    break
    launches = {e.get("args", {}).get("correlation"): e for e in events
                if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver")}
    cpu_ops = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation"):
            cpu_ops[e["tid"]].append(e)
    kernels = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            i = launch_step.get(e.get("args", {}).get("correlation"))
            if i is not None:
                kernels[i].append(e)
    out = []
    for i, (start, stop, name) in enumerate(steps):
        ks = kernels[i]
        gaps = _gaps(ks, launches, cpu_ops)
        by_cat, by_name = defaultdict(float), defaultdict(float)
        for k in ks:
            by_cat[category(k["name"])] += k["dur"] / 1e3
            by_name[k["name"][:120]] += k["dur"] / 1e3
        busy = _union_ms([(k["ts"], k["ts"] + k["dur"]) for k in ks])
        gpu_start = min((k["ts"] for k in ks), default=start)
        gpu_stop = max((k["ts"] + k["dur"] for k in ks), default=start)
        span = (gpu_stop - gpu_start) / 1e3
        out.append({
            "step": name, "phase": phase_of(int(name.split("#")[1]), rates or {}),
            "wall_ms": (stop - start) / 1e3, "gpu_span_ms": span,
            "host_lead_ms": (gpu_start - start) / 1e3, "host_sync_ms": dict(syncs[i]),
            "gpu_busy_ms": busy, "gpu_idle_fraction": 1 - busy / span if span else None,
            "kernel_launches": len(ks),
            "by_category_ms": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
            "top_kernels_ms": dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:top]),
            "gpu_idle_by_op_ms": _idle_by_op(gaps),
            "gpu_idle_by_pass_ms": _idle_by_pass(gaps),
            "timeline": _timeline(ks, launches, gaps, gpu_start, gpu_stop),
        })
    return {"trace": str(path), "steps": out}


def gpu_ms(step, iters: int = 20) -> float:
    """GPU kernel time of one ``step()`` in ms, from the torch profiler (after one warm-up
    call): what the step costs when the host runs ahead of the GPU."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / iters / 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", type=Path)
    a = p.parse_args()
    print(json.dumps(summarize(a.trace), indent=1))


if __name__ == "__main__":
    main()
