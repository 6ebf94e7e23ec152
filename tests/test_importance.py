"""Tests of megatron_sat/importance.py: Eq. 5 (neuron scores) and Eq. 6-7 (head scores).

Every expected value is worked out by hand in the comments, or computed by an
independent loop written here; the sequence-parallel case runs two gloo processes.
"""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_sat.importance import head_scores, input_statistic, neuron_scores

# Input Z: m = 3 tokens (rows), d = 2 features (columns).
Z = torch.tensor([[3.0, 2.0],
                  [4.0, -2.0],
                  [0.0, 1.0]])
# Column L2 norms: ||Z^1|| = sqrt(9 + 16 + 0) = 5,  ||Z^2|| = sqrt(4 + 4 + 1) = 3.
# Token mean:      ((3 + 4 + 0) / 3, (2 - 2 + 1) / 3) = (7/3, 1/3).

# Three neurons (rows of the weight), each a v in R^2.
W = torch.tensor([[1.0, 2.0],
                  [-2.0, 1.0],
                  [3.0, -4.0]])


def test_uniform_is_one_and_needs_no_statistic():
    assert input_statistic("uniform", Z) is None
    assert input_statistic("magnitude", Z) is None
    s = neuron_scores("uniform", W, None)
    assert s.dtype == torch.float32
    assert s.tolist() == [1.0, 1.0, 1.0]


def test_magnitude_is_row_l2_norm():
    # ||(1, 2)|| = sqrt5, ||(-2, 1)|| = sqrt5, ||(3, -4)|| = 5
    s = neuron_scores("magnitude", W, None)
    assert s.tolist() == pytest.approx([math.sqrt(5), math.sqrt(5), 5.0], abs=1e-6)


def test_wanda_statistic_is_column_norms():
    stat = input_statistic("wanda", Z)
    assert stat.dtype == torch.float32
    assert stat.tolist() == pytest.approx([5.0, 3.0], abs=1e-6)


def test_wanda_scores_use_abs_weight():
    # [5, 3] . |v|:  5*1 + 3*2 = 11,  5*2 + 3*1 = 13,  5*3 + 3*4 = 27.
    # (Without |.|, neuron 2 would score 5*(-2) + 3*1 = -7 and neuron 3 15 - 12 = 3.)
    s = neuron_scores("wanda", W, input_statistic("wanda", Z))
    assert s.tolist() == pytest.approx([11.0, 13.0, 27.0], abs=1e-5)


def test_maxip_statistic_is_token_mean():
    stat = input_statistic("maxip", Z)
    assert stat.dtype == torch.float32
    assert stat.tolist() == pytest.approx([7 / 3, 1 / 3], abs=1e-6)


def test_maxip_scores_are_signed():
    # (7/3, 1/3) . v:  7/3 + 2/3 = 3,  -14/3 + 1/3 = -13/3,  7 - 4/3 = 17/3.
    s = neuron_scores("maxip", W, input_statistic("maxip", Z))
    assert s.tolist() == pytest.approx([3.0, -13 / 3, 17 / 3], abs=1e-5)


def test_unknown_metric_raises():
    with pytest.raises(ValueError, match="unknown metric"):
        neuron_scores("l1", W, None)


def test_3d_input_equals_2d():
    # Z as [s=3, b=1, d=2] gives the same hand values as the 2-D Z.
    assert input_statistic("maxip", Z.view(3, 1, 2)).tolist() == pytest.approx(
        [7 / 3, 1 / 3], abs=1e-6)
    assert input_statistic("wanda", Z.view(3, 1, 2)).tolist() == pytest.approx(
        [5.0, 3.0], abs=1e-6)
    # A random [s, b, d] input against the plain per-token definition, computed in float64.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 3, 7, generator=g)
    tokens = [z[i, j].double() for i in range(5) for j in range(3)]  # m = 15 tokens
    mean = sum(tokens) / len(tokens)
    norms = torch.sqrt(sum(t * t for t in tokens))
    assert torch.allclose(input_statistic("maxip", z).double(), mean, atol=1e-6)
    assert torch.allclose(input_statistic("wanda", z).double(), norms, atol=1e-5)
    assert torch.equal(input_statistic("maxip", z), input_statistic("maxip", z.reshape(15, 7)))
    assert torch.equal(input_statistic("wanda", z), input_statistic("wanda", z.reshape(15, 7)))


def test_low_precision_input_gives_fp32_statistic():
    zb = Z.to(torch.bfloat16)  # these small integers are exact in bf16
    assert input_statistic("maxip", zb).dtype == torch.float32
    assert input_statistic("maxip", zb).tolist() == pytest.approx([7 / 3, 1 / 3], abs=1e-6)
    assert input_statistic("wanda", zb).tolist() == pytest.approx([5.0, 3.0], abs=1e-6)


def test_statistic_is_detached():
    z = Z.clone().requires_grad_()
    assert not input_statistic("maxip", z).requires_grad
    assert not input_statistic("wanda", z).requires_grad


# ------------------------------------------------------------------ head aggregation

def test_head_scores_mha_by_hand():
    # MHA: 2 groups of 1 query head, head_dim 2. Rows per group: q (2), k (2), v (2).
    rows = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 6.0,      # head 0: q 2, k 2, v 3
                         4.0, 0.0, -1.0, -3.0, 5.0, 7.0])  # head 1: q 2, k -2, v 6
    # head 0: (2 + 2 + 3) / 3 = 7/3;  head 1: (2 - 2 + 6) / 3 = 2
    h = head_scores(rows, groups=2, heads_per_group=1, head_dim=2)
    assert h.shape == (2, 1)
    assert h.flatten().tolist() == pytest.approx([7 / 3, 2.0], abs=1e-6)


def test_head_scores_gqa_by_hand():
    # GQA: 2 groups x 3 query heads, head_dim 2 -> 2 * (3 + 2) * 2 = 20 rows, row r scores r.
    # Group 0: q0 rows 0,1 -> 0.5; q1 rows 2,3 -> 2.5; q2 rows 4,5 -> 4.5;
    #          k rows 6,7 -> 6.5;  v rows 8,9 -> 8.5;  head = (q + 6.5 + 8.5) / 3 = (q + 15) / 3.
    # Group 1: every row + 10, so head = (q + 10 + 16.5 + 18.5) / 3 = (q + 45) / 3 with q of group 0.
    h = head_scores(torch.arange(20, dtype=torch.float32), groups=2, heads_per_group=3,
                    head_dim=2)
    assert h.shape == (2, 3)
    expected = [[15.5 / 3, 17.5 / 3, 19.5 / 3], [45.5 / 3, 47.5 / 3, 49.5 / 3]]
    assert h.tolist() == [pytest.approx(r, abs=1e-5) for r in expected]


def _head_scores_loop(rows, groups, hpg, hd):
    """Eq. 6-7 by a plain loop over megatron's fused-QKV layout [q_0..q_{hpg-1}, k, v]."""
    out = torch.zeros(groups, hpg, dtype=torch.float64)
    block = (hpg + 2) * hd
    for g in range(groups):
        base = g * block
        k = sum(float(rows[base + hpg * hd + j]) for j in range(hd)) / hd
        v = sum(float(rows[base + (hpg + 1) * hd + j]) for j in range(hd)) / hd
        for i in range(hpg):
            q = sum(float(rows[base + i * hd + j]) for j in range(hd)) / hd
            out[g, i] = (q + k + v) / 3
    return out


@pytest.mark.parametrize("groups,hpg,hd", [(4, 1, 3), (2, 3, 2), (1, 4, 5), (3, 2, 4)])
def test_head_scores_against_loop(groups, hpg, hd):
    g = torch.Generator().manual_seed(groups * 100 + hpg * 10 + hd)
    rows = torch.randn(groups * (hpg + 2) * hd, generator=g)
    h = head_scores(rows, groups=groups, heads_per_group=hpg, head_dim=hd)
    assert h.shape == (groups, hpg)
    assert torch.allclose(h.double(), _head_scores_loop(rows, groups, hpg, hd), atol=1e-6)


def test_head_scores_from_neuron_scores_end_to_end():
    # The full chain on a fused QKV weight: Eq. 5 per row, then Eq. 6-7 per head.
    g = torch.Generator().manual_seed(3)
    groups, hpg, hd, d = 2, 2, 3, 5
    w = torch.randn(groups * (hpg + 2) * hd, d, generator=g)
    z = torch.randn(4, 2, d, generator=g)
    zm = z.reshape(-1, d).double().mean(0)
    row = torch.stack([w[r].double() @ zm for r in range(w.shape[0])])  # maxip per row
    got = head_scores(neuron_scores("maxip", w, input_statistic("maxip", z)), groups, hpg, hd)
    assert torch.allclose(got.double(), _head_scores_loop(row, groups, hpg, hd), atol=1e-5)


# ------------------------------------------------------------------ sequence parallelism

def _sp_worker(rank: int, world: int, z_full: torch.Tensor, out_dir: str):
    # A rendezvous file in the test's own temporary folder: no port to race for.
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rdzv')}",
                            rank=rank, world_size=world)
    try:
        # Megatron's sequence-parallel shard: this rank's slice of the sequence dim.
        shard = z_full.chunk(world, dim=0)[rank].contiguous()
        group = dist.group.WORLD
        res = {m: input_statistic(m, shard, sp_group=group) for m in ("maxip", "wanda")}
        res["local_maxip"] = input_statistic("maxip", shard)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sequence_parallel_statistic_equals_full_sequence():
    g = torch.Generator().manual_seed(7)
    z_full = torch.randn(6, 2, 5, generator=g)  # [s, b, d], each rank holds 3 of 6 positions
    full = {m: input_statistic(m, z_full) for m in ("maxip", "wanda")}
    # Sanity of the reference itself (float64 definition).
    flat = z_full.reshape(-1, 5).double()
    assert torch.allclose(full["maxip"].double(), flat.mean(0), atol=1e-6)
    assert torch.allclose(full["wanda"].double(), flat.norm(dim=0), atol=1e-5)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_sp_worker, args=(2, z_full, tmp), nprocs=2, join=True)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for rank, res in enumerate(results):
        for m in ("maxip", "wanda"):
            assert torch.allclose(res[m], full[m], atol=1e-6), (rank, m, res[m], full[m])
        # Without the group, a rank sees only its own half (so the all-reduce matters).
        local = z_full.chunk(2, dim=0)[rank].reshape(-1, 5).double().mean(0)
        assert torch.allclose(res["local_maxip"].double(), local, atol=1e-6)
        assert not torch.allclose(res["local_maxip"], full["maxip"], atol=1e-3)


def test_a_block_takes_an_offered_token_mean_only_for_its_own_input():
    """A layer norm offers maxip's token mean with the output it belongs to
    (``SparseBlock.offer_token_mean``): the block uses it for that very tensor, once, and
    computes Eq. 5's statistic itself for anything else (even a view of it)."""
    from megatron_sat import runtime
    from megatron_sat.block import SparseBlock
    from megatron_sat.config import SATConfig

    runtime.set_iteration(1)
    block = SparseBlock(SATConfig(omission_rate=0.5, metric="maxip"), 0, tp_group=None,
                        sequence_parallel=False)
    z = Z.reshape(3, 1, 2)
    own = input_statistic("maxip", z)
    assert torch.allclose(own, torch.tensor([7 / 3, 1 / 3]))
    offered = torch.tensor([5.0, 6.0])  # not the mean: shows which one was used
    block.offer_token_mean(z, offered)
    assert torch.equal(block.statistic(z.view_as(z)), own)
    block.offer_token_mean(z, offered)
    assert block.statistic(z) is offered
    assert torch.equal(block.statistic(z), own)  # consumed by the first use
    # wanted only in training, at a rate above 0, for maxip, on an unsharded sequence
    assert block.wants_token_mean(True) and not block.wants_token_mean(False)
    for cfg, sp in ((SATConfig(omission_rate=0.0, metric="maxip"), False),
                    (SATConfig(omission_rate=0.5, metric="wanda"), False),
                    (SATConfig(omission_rate=0.5, metric="maxip"), True)):
        assert not SparseBlock(cfg, 0, None, sequence_parallel=sp).wants_token_mean(True)
    # ... and only while the next forward draws: not once the iteration's selection exists
    block.draw(lambda: torch.ones(4), lambda scores, seed: seed)
    assert not block.wants_token_mean(True)
    runtime.set_iteration(2)
    assert block.wants_token_mean(True)
    micro = SparseBlock(SATConfig(omission_rate=0.5, selection_scope="microbatch"), 0, None,
                        sequence_parallel=False)
    micro.draw(lambda: torch.ones(4), lambda scores, seed: seed)
    assert micro.wants_token_mean(True)
