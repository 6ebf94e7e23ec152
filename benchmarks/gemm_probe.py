"""How fast is this GPU today? bf16 8192^3 matmul TFLOP/s (median of 20), written to JSON.

GPU hosts differ from call to call (clocks, neighbours); benchmarks quote this probe next
to their ratios so that runs on a slow machine are recognisable.

    python benchmarks/gemm_probe.py --out results/gemm_probe.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch


def probe(n: int = 8192, repeats: int = 20) -> dict:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    seconds = statistics.median(times)
    return {"device": torch.cuda.get_device_name(), "n": n, "median_s": seconds,
            "tflops": 2 * n ** 3 / seconds / 1e12}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    out = p.parse_args().out
    result = probe()
    out.write_text(json.dumps(result, indent=1))
    print(f"{result['device']}: bf16 {result['n']}^3 matmul {result['tflops']:.0f} TFLOP/s")
