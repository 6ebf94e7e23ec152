"""The Triton selection kernels against the torch selection, fed the same noise.

``fused_selection`` draws its Gumbel noise from Philox (``tl.rand(seed, position)``); the
kernel ``_uniforms`` below produces those very uniforms U, and the torch path is then fed
E = -log(U) as its exponential noise, so both must pick the same neurons. Used two ways:

* ``python tests/fused_selection_cases.py OUT.json`` under ``TRITON_INTERPRET=1``: CPU, in
  Triton's interpreter, small shapes, fp32 (``tests/test_fused_selection.py``, in CI);
* :func:`run_cases` on CUDA with bf16 scores of real model shapes (the CUDA tests).

Each case returns a record: whether the index lists are equal, and what was compared.
"""

from __future__ import annotations

import json
import sys

import torch
import triton
import triton.language as tl

from megatron_sat import fused_selection
from megatron_sat.attention import HeadLayout
from megatron_sat.importance import head_scores
from megatron_sat.selection import sampling_keys, top_k_indices


@triton.jit
def _uniforms_kernel(out_ptr, n, seed, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.rand(seed, offsets), mask=offsets < n)


def uniforms(n: int, seed: int, device) -> torch.Tensor:
    """The U the kernels use for positions 0..n-1 of a draw with ``seed``."""
    out = torch.empty(n, dtype=torch.float32, device=device)
    _uniforms_kernel[(triton.cdiv(n, 1024),)](out, n, seed, BLOCK=1024)
    return out


def reference_keys(scores, method, tau, scale, seed):
    keys = scores.float()
    if method == "sampling":
        u = uniforms(keys.numel(), seed, keys.device).view(keys.shape)
        keys = sampling_keys(keys, -torch.log(u), tau, scale)
    return keys


def reference_select(scores, k, method, tau, scale, seed, shift=None):
    """``selection.select`` with the kernels' noise: its keys and its top-k."""
    return top_k_indices(reference_keys(scores, method, tau, scale, seed), k, shift)


def differ_only_at_near_ties(got, ref, keys, k) -> bool:
    """True if the kept sets of a 1-row selection differ only in neurons whose keys lie
    within float rounding of the k-th key (the rescale's sums run in another order)."""
    diff = set(got[:k].tolist()) ^ set(ref[:k].tolist())
    kth = keys.sort(descending=True).values[k - 1]
    return all(abs(keys[i] - kth) <= 1e-4 * max(1.0, abs(kth)) for i in diff)


def reference_heads(row_scores, groups, qpg, hd, k, by_groups, method, tau, scale, seed):
    """``SATSelfAttention.choose_heads``'s torch path with the kernels' noise."""
    layout = HeadLayout(groups, qpg, hd, row_scores.device)
    scores = head_scores(row_scores, groups, qpg, hd)
    if by_groups:
        kept = reference_select(scores.mean(dim=1), k, method, tau, scale, seed)
        return layout.index_lists(kept, layout.all_queries.expand(k, qpg))
    return layout.index_lists(layout.all_groups,
                              reference_select(scores, k, method, tau, scale, seed))


def select_case(n, k, method, scale, rows=1, shift=None, dtype=torch.float32, device="cpu",
                seed=12345, scores=None):
    g = torch.Generator().manual_seed(n * 7 + k)
    if scores is None:
        scores = torch.randn(rows, n, generator=g) * 2 + 1 if rows > 1 else \
            torch.randn(n, generator=g) * 2 + 1
    scores = scores.to(device=device, dtype=dtype)
    got = fused_selection.select(scores, k, method, 0.05, scale, seed, shift)
    ref = reference_select(scores, k, method, 0.05, scale, seed, shift)
    equal = torch.equal(got.cpu(), ref.cpu())
    rec = {"case": f"select n{n} k{k} {method} {scale} rows{rows} shift{shift} {dtype}",
           "equal": equal, "shape": list(got.shape),
           "ascending": bool((got[..., 1:k] > got[..., : k - 1]).all())}
    if not equal and rows == 1:
        keys = reference_keys(scores, method, 0.05, scale, seed).cpu()
        rec["near_ties_only"] = differ_only_at_near_ties(got.cpu(), ref.cpu(), keys, k)
    return rec


def heads_case(groups, qpg, hd, k, by_groups, method, scale, dtype=torch.float32,
               device="cpu", seed=987654321987):
    g = torch.Generator().manual_seed(groups * 100 + qpg * 10 + hd)
    rows = torch.randn(groups * (qpg + 2) * hd, generator=g).to(device=device, dtype=dtype)
    args = (k, by_groups, method, 0.05, scale, seed)
    got = fused_selection.select_heads(rows, groups, qpg, hd, *args)
    ref = reference_heads(rows, groups, qpg, hd, *args)
    mode = "groups" if by_groups else "heads"
    return {"case": f"heads g{groups} q{qpg} hd{hd} k{k} {mode} {method} {scale} {dtype}",
            "equal": all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(got, ref)),
            "shape": [list(t.shape) for t in got]}


def run_cases(device="cpu", dtype=torch.float32, large=False) -> list[dict]:
    out = []
    sizes = [(5, 2), (37, 1), (37, 37), (256, 100), (1000, 640)]
    if large:
        sizes += [(5632, 2816), (11008, 5504), (2816, 1408)]
    for n, k in sizes:
        for method in ("topk", "sampling"):
            for scale in ("standard", "minmax", "raw"):
                out.append(select_case(n, k, method, scale, dtype=dtype, device=device))
        out.append(select_case(n, k, "sampling", "standard", shift=n, dtype=dtype,
                               device=device))
    out.append(select_case(40, 13, "sampling", "standard", rows=3, dtype=dtype, device=device))
    out.append(select_case(40, 13, "topk", "raw", rows=3, shift=40, dtype=dtype, device=device))
    # distinct keys that agree in their top bits (one exponent, every bf16 mantissa, both
    # signs): the search decides them in its last passes
    g = torch.Generator().manual_seed(5)
    close = (1 + torch.arange(128) * 2**-7)[torch.randperm(128, generator=g)]
    out.append(select_case(128, 37, "topk", "raw", device=device, dtype=dtype, scores=close))
    out.append(select_case(128, 91, "topk", "raw", device=device, dtype=dtype,
                           scores=torch.cat([close[:64], -close[64:]])))
    # uniform metric: all scores equal, so the keys are the noise alone (std clamps to tiny)
    out.append(select_case(64, 20, "sampling", "standard", device=device, dtype=dtype,
                           scores=torch.ones(64)))
    heads = [(1, 8, 4, 4), (2, 3, 6, 2), (4, 8, 16, 4), (3, 1, 8, 2), (4, 8, 16, 1)]
    if large:
        heads += [(4, 8, 64, 4), (32, 1, 128, 16), (8, 8, 128, 4)]
    for groups, qpg, hd, k in heads:
        for by_groups in (False, True):
            kk = max(1, groups // 2) if by_groups or qpg == 1 else k
            for method in ("topk", "sampling"):
                out.append(heads_case(groups, qpg, hd, kk, by_groups or qpg == 1, method,
                                      "standard", dtype=dtype, device=device))
        out.append(heads_case(groups, qpg, hd, k if qpg > 1 else 1, qpg == 1, "sampling",
                              "minmax", dtype=dtype, device=device))
    return out


def tie_and_distribution_records(device="cpu") -> dict:
    """Ties go to the lower index (also -0.0 vs +0.0 and NaNs, against the torch path);
    one draw per row of many equal rows matches softmax."""
    s = torch.tensor([1.0, 3.0, 3.0, -2.0, 3.0, 0.0, 3.0], device=device)
    ties = fused_selection.select(s, 2, "topk", 1.0, "raw").tolist()
    ties3 = fused_selection.select(s, 5, "topk", 1.0, "raw").tolist()
    signed_zero = torch.tensor([-0.0, 0.0, 1.0], device=device)
    nans = torch.tensor([1.0, float("nan"), 2.0, -float("nan")], device=device)
    special = {name: [fused_selection.select(t, k, "topk", 1.0, "raw").tolist(),
                      top_k_indices(t, k).tolist()]
               for name, t, k in (("signed_zero", signed_zero, 2), ("nan", nans, 2))}
    scores = torch.tensor([0.0, 0.5, 1.0, 2.0], device=device)
    rows = 4096
    picks = fused_selection.select(scores.expand(rows, 4).contiguous(), 1, "sampling", 1.0,
                                   "raw", seed=2024)
    freq = torch.bincount(picks.flatten().cpu(), minlength=4).double() / rows
    return {"ties_k2": ties, "ties_k5": ties3, "special": special, "freq": freq.tolist(),
            "softmax": torch.softmax(scores.double().cpu(), 0).tolist()}


if __name__ == "__main__":
    record = {"cases": run_cases(), **tie_and_distribution_records()}
    with open(sys.argv[1], "w") as f:
        json.dump(record, f)
