"""Layer-level benchmark: SAT MLP / attention vs dense, and vs a dense layer of the kept size.

One GPU, bf16, forward + backward including selection, with megatron-style ``main_grad``
buffers attached (as under megatron's DDP). A "layer" is the block with the RMSNorm before
it and the residual add after it, as in a transformer layer: for SAT the norm computes the
maxip token mean in its own pass and offers it to the block (``megatron_sat.norm``),
as it does in training. For each block and rate it reports the time of

* ``dense``: the stock layer (SAT at r = 0 runs megatron-core's own code),
* ``sat``: the SAT layer at rate r, with the Triton selection kernels (``*_torch_selection``:
  the same with ``--sat-selection-kernel torch``, side by side),
* ``kept``: a dense layer whose width is the kept width (the ideal for SAT),

the GPU kernel time of the SAT and kept layers (``sat_gpu_ms``, ``kept_gpu_ms``: what a
layer costs when the host runs ahead of the GPU, as it does in a whole training step; a
small layer's wall time is the host's), the time of selection alone (scores + sampling,
run back to back: ``selection_ms``, which measures the host's launch latency, as
selection's kernels are tiny) and selection's GPU kernel time (``selection_gpu_ms``: the
norm's extra time for the token mean, the scores and the sampling kernel), the ratios
dense/sat (speedup), kept/sat (how close to ideal, by wall and by GPU time) and
selection/sat (``selection_gpu_share`` over the SAT layer's GPU time), plus a
torch.profiler table of the SAT layer's top kernels. Writes JSON.

    python benchmarks/bench_layers.py --out results/layers.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).parent)]

from profile_summary import gpu_ms  # noqa: E402

SHAPE = dict(hidden=2048, heads=32, groups=4, ffn=5632, seq=2048, batch=4)  # TinyLlama
KERNELS = ("auto", "torch")  # --sat-selection-kernel: Triton selection, torch selection


def setup():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    ps.initialize_model_parallel(1)
    model_parallel_cuda_manual_seed(0)
    from megatron_sat import torch_fusions
    torch_fusions.apply()  # the Triton norm, SwiGLU and the rest, as pretrain_sat.py has them


def config(heads, groups, ffn):
    from megatron.core.transformer.transformer_config import TransformerConfig
    return TransformerConfig(
        num_layers=1, hidden_size=SHAPE["hidden"], num_attention_heads=heads,
        num_query_groups=groups, kv_channels=SHAPE["hidden"] // SHAPE["heads"],
        ffn_hidden_size=ffn, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, bias_activation_fusion=True, bf16=True, normalization="RMSNorm",
        params_dtype=torch.bfloat16, hidden_dropout=0.0, attention_dropout=0.0,
        gradient_accumulation_fusion=False)


def build(block, rate, heads=None, groups=None, ffn=None, kernel="auto", selection="sampling"):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.attention import SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron_sat.attention import SATSelfAttention
    from megatron_sat.config import SATConfig
    from megatron_sat.core_attention import SDPAttention
    from megatron_sat.mlp import SATMLP
    from megatron_sat.sparse_linear import SATColumnParallelLinear, SATRowParallelLinear
    cfg = config(heads or SHAPE["heads"], groups or SHAPE["groups"], ffn or SHAPE["ffn"])
    sat = SATConfig(omission_rate=rate, metric="maxip", selection=selection,
                    selection_kernel=kernel)
    pg = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
    if block == "mlp":
        m = SATMLP.as_mlp_submodule(
            submodules=MLPSubmodules(linear_fc1=SATColumnParallelLinear,
                                     linear_fc2=SATRowParallelLinear),
            config=cfg, pg_collection=pg, is_mtp_layer=False, sat_config=sat,
            ffn_hidden_size=cfg.ffn_hidden_size)
        m.set_layer_number(1)
    else:
        m = SATSelfAttention(cfg, SelfAttentionSubmodules(
            linear_qkv=SATColumnParallelLinear, core_attention=SDPAttention,
            linear_proj=SATRowParallelLinear), layer_number=1,
            attn_mask_type=AttnMaskType.causal, pg_collection=pg, sat_config=sat)
    m = m.cuda().train()
    for p in m.parameters():
        p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        p.grad_added_to_main_grad = False
    return m


def pre_norm(m):
    """The RMSNorm before block ``m``, made ``m``'s token-mean sink as in
    ``SATTransformerLayer``: it returns (output, residual)."""
    from megatron_sat.norm import TorchNorm
    norm = TorchNorm(m.config, SHAPE["hidden"], residual_output=True).cuda().bfloat16()
    norm.token_mean_sink = m.sat
    return norm


def hidden(requires_grad=True):
    return torch.randn(SHAPE["seq"], SHAPE["batch"], SHAPE["hidden"], device="cuda",
                       dtype=torch.bfloat16, requires_grad=requires_grad)


def step_fn(m, block):
    """Forward + backward of one layer: norm, block, residual add."""
    norm, x = pre_norm(m), hidden()
    gy = torch.randn_like(x)
    it = [0]

    def step():
        from megatron_sat import runtime
        runtime.set_iteration(it[0])
        it[0] += 1
        y, residual = norm(x)
        out, _ = m(y) if block == "mlp" else m(y, None)
        (out + residual).backward(gy)
        for p in [*m.parameters(), *norm.parameters()]:
            p.grad = None
    return step


def norm_fn(token_mean: bool):
    """The RMSNorm's forward alone, with or without the token mean (its difference is what
    the statistic costs a SAT layer)."""
    from megatron_sat import norm
    x, w = hidden(), torch.ones(SHAPE["hidden"], device="cuda", dtype=torch.bfloat16)
    return lambda: norm.RMS_NORM_WITH_RESIDUAL(x, (SHAPE["hidden"],), w, 1e-5,
                                                token_mean=token_mean)


def selection_fn(m, block, rate):
    """Selection alone, as the SAT layer runs it after its norm offered the token mean:
    the Eq. 5 scores, then (Gumbel-)top-k, and the kept rows and columns of the layers."""
    x = hidden(requires_grad=False)
    mean = x.float().mean(dim=(0, 1)).to(x.dtype)  # the norm offers it in x's dtype

    @torch.no_grad()
    def step():
        m.sat.offer_token_mean(x, mean)
        if block == "mlp":
            shift = m.ffn_local if m.config.gated_linear_unit else None
            m.sat.pick(m.channel_scores(x), m.kept(m.ffn_local, rate), 0, shift)
        else:
            m.choose_heads(m.row_scores(x), rate, 0)
    return step


def timed(step, iters=20, warmup=5):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def synchronizing_calls(step) -> list[str]:
    """Messages of every host-device synchronisation that one step triggers (torch's sync
    debug mode); a sync stalls the launch queue, so SAT's step should have none."""
    import warnings
    step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0] for w in caught]


def profile_table(step, rows=18):
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--profile-rate", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=SHAPE["batch"],
                    help="micro-batch size (sequences of 2048 tokens)")
    ap.add_argument("--seq", type=int, default=SHAPE["seq"],
                    help="sequence length; a short one makes every block host-bound, so "
                         "the times are the host's cost of issuing the block")
    ap.add_argument("--no-profile", action="store_true")
    a = ap.parse_args()
    SHAPE.update(batch=a.batch, seq=a.seq)
    setup()
    results, tables = [], {}
    # what the token mean adds to the norm before a SAT block (part of selection's cost)
    statistic_gpu_ms = gpu_ms(norm_fn(True)) - gpu_ms(norm_fn(False))
    for block in ("mlp", "attention"):
        dense_ms = timed(step_fn(build(block, 0.0), block))
        for r in a.rates:
            sat_m = {kernel: build(block, r, kernel=kernel) for kernel in KERNELS}
            sat_ms = {kernel: timed(step_fn(m, block)) for kernel, m in sat_m.items()}
            if block == "mlp":
                kept = build(block, 0.0, ffn=SHAPE["ffn"] - int(SHAPE["ffn"] * r))
            else:
                qpg = SHAPE["heads"] // SHAPE["groups"]
                kept = build(block, 0.0, heads=SHAPE["groups"] * (qpg - int(qpg * r)))
            kept_ms, kept_gpu_ms = timed(step_fn(kept, block)), gpu_ms(step_fn(kept, block))
            rec = {"block": block, "rate": r, "dense_ms": dense_ms, "kept_ms": kept_ms,
                   "kept_gpu_ms": kept_gpu_ms}
            for kernel, m in sat_m.items():
                tag = "" if kernel == "auto" else "_torch_selection"
                sel_ms = timed(selection_fn(m, block, r))
                sel_gpu_ms = statistic_gpu_ms + gpu_ms(selection_fn(m, block, r))
                sat_gpu_ms = gpu_ms(step_fn(m, block))
                rec.update({f"sat_ms{tag}": sat_ms[kernel], f"selection_ms{tag}": sel_ms,
                            f"sat_gpu_ms{tag}": sat_gpu_ms,
                            f"sat_vs_kept_gpu{tag}": kept_gpu_ms / sat_gpu_ms,
                            f"selection_gpu_ms{tag}": sel_gpu_ms,
                            f"speedup{tag}": dense_ms / sat_ms[kernel],
                            f"sat_vs_kept{tag}": kept_ms / sat_ms[kernel],
                            f"selection_share{tag}": sel_ms / sat_ms[kernel],
                            f"selection_gpu_share{tag}": sel_gpu_ms / sat_gpu_ms})
            rec["ideal_speedup"] = dense_ms / kept_ms
            print(json.dumps(rec))
            results.append(rec)
            if r == a.profile_rate:
                rec["synchronizing_calls"] = synchronizing_calls(step_fn(sat_m["auto"], block))
            if r == a.profile_rate and not a.no_profile:
                tables[block] = profile_table(step_fn(sat_m["auto"], block))
                print(tables[block])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"shape": SHAPE, "statistic_gpu_ms": statistic_gpu_ms,
                                 "results": results, "profiles": tables}, indent=1))


if __name__ == "__main__":
    main()
