"""The Triton selection kernels (``megatron_sat/fused_selection.py``) against the torch path.

Both are fed the same noise (``tests/fused_selection_cases.py``), so they must keep the same
neurons: MLP channels (with the gated fc1 rows), attention heads in ``heads`` and
``groups`` mode, every score scale, top-k and sampling. In CI the kernels run in Triton's
CPU interpreter on small shapes; the ``cuda`` tests repeat the comparison on a GPU with
bf16 scores of the benchmark models' shapes, and check that the SAT blocks use the kernels.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from _tools import run_interpreted, run_snippet

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return run_interpreted("fused_selection_cases.py", tmp_path_factory)


def _assert_cases(cases, near_ties=0):
    """Every case equal; on a GPU up to ``near_ties`` may differ at keys within rounding
    of the k-th (sums in another order), none in the interpreter."""
    assert len(cases) > 40
    inexact = [c["case"] for c in cases if not c["equal"]]
    assert len(inexact) <= near_ties, inexact
    for c in cases:
        assert c["equal"] or c.get("near_ties_only"), c["case"]
        assert c.get("ascending", True), c["case"]


def test_kernels_keep_what_the_torch_path_keeps_given_the_same_noise(interpreted):
    _assert_cases(interpreted["cases"])
    shapes = {c["case"]: c["shape"] for c in interpreted["cases"]}
    assert shapes["select n1000 k640 sampling standard rows1 shift1000 torch.float32"] == [1280]
    assert shapes["select n40 k13 sampling standard rows3 shiftNone torch.float32"] == [3, 13]
    assert shapes["select n40 k13 topk raw rows3 shift40 torch.float32"] == [3, 26]
    # heads mode: 4 groups x (4 kept queries + K + V) x 16 rows; 4 x 4 x 16 columns
    assert shapes["heads g4 q8 hd16 k4 heads sampling standard torch.float32"] == [[384], [256]]
    # groups mode: 2 kept groups x (8 queries + K + V) x 16 rows
    assert shapes["heads g4 q8 hd16 k2 groups topk standard torch.float32"] == [[320], [256]]


def test_ties_go_to_the_lower_index(interpreted):
    # scores [1, 3, 3, -2, 3, 0, 3]: four 3s tie for the top
    assert interpreted["ties_k2"] == [1, 2]
    assert interpreted["ties_k5"] == [0, 1, 2, 4, 6]
    # -0.0 ties with +0.0; NaN (either sign) is the largest key, as in the torch path on CPU
    assert interpreted["special"]["signed_zero"] == [[0, 2], [0, 2]]
    assert interpreted["special"]["nan"] == [[1, 3], [1, 3]]


def test_one_draw_per_row_follows_softmax(interpreted):
    """4096 rows of the same scores, one sample each: the frequencies are softmax(s),
    so the noise is Gumbel and differs between rows (within 4 standard errors)."""
    for freq, p in zip(interpreted["freq"], interpreted["softmax"]):
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / 4096), (freq, p)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_kernels_keep_what_the_torch_path_keeps(dtype):
    sys.path.insert(0, str(ROOT / "tests"))
    from fused_selection_cases import run_cases, tie_and_distribution_records

    _assert_cases(run_cases("cuda", dtype, large=True), near_ties=2)
    rec = tie_and_distribution_records("cuda")
    assert rec["ties_k2"] == [1, 2] and rec["ties_k5"] == [0, 1, 2, 4, 6]
    # the kernel's rule on a GPU too; torch's CUDA sort puts a negative NaN last, so the
    # torch path is compared on NaN only on CPU (above)
    assert rec["special"]["signed_zero"] == [[0, 2], [0, 2]]
    assert rec["special"]["nan"][0] == [1, 3]


@cuda
def test_cuda_maxip_statistic_is_the_token_mean_rounded_once():
    """On a GPU the bf16 maxip statistic is a GEMV: the fp32 mean, rounded once to bf16."""
    from megatron_sat.importance import input_statistic

    for tokens, d in ((16384, 2048), (3000, 512)):  # x 2 sequences; 1/m exact, and not
        z = torch.randn(tokens, 2, d, device="cuda").bfloat16()
        got = input_statistic("maxip", z)
        want = z.float().reshape(-1, d).mean(dim=0)
        assert got.dtype == torch.bfloat16 and got.shape == (d,)
        ulp = want.abs().clamp_min(1e-6) * 2 ** -7  # one bf16 ulp at most
        assert torch.all((got.float() - want).abs() <= ulp), (got.float() - want).abs().max()


@cuda
def test_cuda_kernels_compile_once_whatever_the_seed():
    """Seeds change every draw; Triton must not specialise (and compile) on them."""
    from megatron_sat import fused_selection as fs

    scores = torch.randn(1000, device="cuda")
    rows = torch.randn(4 * 10 * 64, device="cuda")

    def draw(seed):
        fs.select(scores, 320, "sampling", 0.05, "standard", seed)
        fs.select_heads(rows, 4, 8, 64, 4, False, "sampling", 0.05, "standard", seed)

    def variants():  # other tests in this process may have compiled other shapes
        return [sum(len(c[0]) for c in k.device_caches.values())
                for k in (fs._select_kernel, fs._head_select_kernel)]

    draw(2**40 + 1)
    before = variants()
    for seed in [16 * i for i in range(1, 6)] + [2**62 - 3, 7, 1]:
        draw(seed)
    assert variants() == before


_BLOCKS_CHECK = r"""
import json, sys
import torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmarks"]
import bench_layers as bl
from megatron_sat import fused_selection, runtime

bl.SHAPE.update(seq=256, batch=2)
bl.setup()
calls = {"select": 0, "select_heads": 0}
for name in calls:
    fn = getattr(fused_selection, name)
    def counted(*a, _fn=fn, _name=name, **kw):
        calls[_name] += 1
        return _fn(*a, **kw)
    setattr(fused_selection, name, counted)
out = {}
for block in ("mlp", "attention"):
    fused = bl.build(block, 0.5, kernel="auto", selection="topk")
    plain = bl.build(block, 0.5, kernel="torch", selection="topk")
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(256, 2, 2048, device="cuda", dtype=torch.bfloat16)
    runtime.set_iteration(0)
    ys = [(m(x) if block == "mlp" else m(x, None))[0] for m in (fused, plain)]
    last = [m.sat.state.last for m in (fused, plain)]
    if block == "attention":
        last = [torch.cat([s.qkv_rows, s.proj_columns]) for s in last]
    else:
        last = [rows for rows, _ in last]
    out[block] = {"same_indices": torch.equal(*last), "same_output": torch.equal(*ys),
                  "kept": last[0].numel()}
out["calls"] = calls
print(json.dumps(out))
"""


@cuda
def test_cuda_sat_blocks_select_with_the_kernels_and_match_the_torch_path():
    """SAT MLP and attention with ``--sat-selection-kernel auto`` call the kernels, and with
    top-k (no noise) keep the same neurons and give bitwise the same output as ``torch``."""
    rec = run_snippet(_BLOCKS_CHECK, str(ROOT))
    assert rec["calls"] == {"select": 1, "select_heads": 1}, rec
    for block in ("mlp", "attention"):
        assert rec[block]["same_indices"] and rec[block]["same_output"], rec
    assert rec["mlp"]["kept"] == 2 * 2816  # [gate; up] rows of 2816 channels
