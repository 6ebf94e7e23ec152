"""torchrun worker: SAT layers against independent dense references, at any TP size.

Run as ``torchrun --nproc-per-node TP tests/layer_worker.py OUT.json``. Every case builds a
SAT block with megatron-core on CPU/gloo, runs forward and backward at r = 0.5, and
compares output, input gradient and every weight gradient with a float64 dense reference
written here in plain torch, in which the omitted neurons' weights are zeroed. Rank 0
writes one record per case (max errors, omitted-gradient counts) for
``tests/test_sparse_layers.py`` to assert on.
"""

from __future__ import annotations

import json
import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_sat.cpu import enable_cpu_mode

enable_cpu_mode()

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules  # noqa
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.mlp import MLPSubmodules  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from megatron_sat import runtime  # noqa: E402
from megatron_sat.attention import SATSelfAttention  # noqa: E402
from megatron_sat.config import SELECTION_SCOPES, SATConfig  # noqa: E402
from megatron_sat.core_attention import SDPAttention  # noqa: E402
from megatron_sat.mlp import SATMLP  # noqa: E402
from megatron_sat.sparse_linear import SATColumnParallelLinear, SATRowParallelLinear  # noqa

SEQ, BATCH, HIDDEN, FFN = 8, 2, 32, 64


def transformer_config(tp, sp, heads=4, groups=4, gated=True, bias=False):
    return TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=heads, num_query_groups=groups,
        ffn_hidden_size=FFN, tensor_model_parallel_size=tp, sequence_parallel=sp,
        use_cpu_initialization=True, gated_linear_unit=gated,
        activation_func=F.silu if gated else F.gelu, add_bias_linear=bias,
        bias_activation_fusion=False, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=0.3, params_dtype=torch.float32)


def pg():
    return ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])


def build_mlp(cfg, sat):
    mlp = SATMLP.as_mlp_submodule(
        submodules=MLPSubmodules(linear_fc1=SATColumnParallelLinear,
                                 linear_fc2=SATRowParallelLinear),
        config=cfg, pg_collection=pg(), is_mtp_layer=False, sat_config=sat,
        ffn_hidden_size=cfg.ffn_hidden_size)
    mlp.set_layer_number(1)
    return mlp


def build_attention(cfg, sat, stock=False):
    sub = SelfAttentionSubmodules(
        linear_qkv=SATColumnParallelLinear,
        core_attention=DotProductAttention if stock else SDPAttention,
        linear_proj=SATRowParallelLinear)
    if stock:
        return SelfAttention(cfg, sub, layer_number=1, attn_mask_type=AttnMaskType.causal,
                             pg_collection=pg())
    return SATSelfAttention(cfg, sub, layer_number=1, attn_mask_type=AttnMaskType.causal,
                            pg_collection=pg(), sat_config=sat)


def reseed(seed):
    """Same weights for the same shapes in every case, so cases can be compared."""
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shared_randn(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def local_input(x_full, sp):
    """This rank's input: the sequence shard under sequence parallelism."""
    if not sp:
        return x_full.clone()
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    return x_full.chunk(tp, dim=0)[rank].clone()


def gather_list(t):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def run(module, x_full, sp, use_main_grad):
    """Forward + backward with a fixed output cotangent; returns (y_local, x.grad, grads)."""
    params = dict(module.named_parameters())
    if use_main_grad:
        for p in params.values():
            p.main_grad = torch.zeros_like(p, dtype=torch.float32)
            p.grad_added_to_main_grad = False
    x = local_input(x_full, sp).requires_grad_(True)
    y, bias = module(x, None) if isinstance(module, SelfAttention) else module(x)
    if bias is not None:
        y = y + bias
    cot = local_input(shared_randn(*x_full.shape, seed=7), sp)
    (y * cot).sum().backward()
    grads = {}
    for name, p in params.items():
        g = p.main_grad if use_main_grad and hasattr(p, "main_grad") else p.grad
        if use_main_grad and p.grad is not None:
            g = g + p.grad  # params without a SAT path (e.g. biases) still use .grad
        grads[name] = g.detach().clone()
    return y.detach(), x.grad.detach(), grads


def mlp_reference(w1s, w2s, b1s, b2, channels, x, gated):
    """Dense float64 TP MLP: sum over ranks, omitted channels' weights zeroed."""
    y = 0
    leaves = []
    for w1, w2, b1, ch in zip(w1s, w2s, b1s, channels):
        f = w2.shape[1]
        keep = torch.zeros(f, dtype=torch.float64)
        keep[ch] = 1
        rows = torch.cat([keep, keep]) if gated else keep
        w1 = w1.double().requires_grad_(True)
        w2 = w2.double().requires_grad_(True)
        leaves += [w1, w2]
        h = x @ (w1 * rows[:, None]).t()
        if b1 is not None:
            b1 = b1.double().requires_grad_(True)
            leaves.append(b1)
            h = h + b1 * rows
        a = F.silu(h[..., :f]) * h[..., f:] if gated else F.gelu(h)
        y = y + a @ (w2 * keep[None, :]).t()
    if b2 is not None:
        y = y + b2.double()
    return y, leaves


def attention_reference(wqkvs, wos, selections, x, groups_l, qpg, hn):
    """Dense float64 causal GQA attention per rank, summed; omitted heads zeroed."""
    s = x.shape[0]
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    y, leaves = 0, []
    for wqkv, wo, (gsel, qsel) in zip(wqkvs, wos, selections):
        wqkv = wqkv.double().requires_grad_(True)
        wo = wo.double().requires_grad_(True)
        leaves += [wqkv, wo]
        qkv = (x @ wqkv.t()).view(s, x.shape[1], groups_l, qpg + 2, hn)
        head_keep = torch.zeros(groups_l, qpg, dtype=torch.float64)
        for g, qs in zip(gsel, qsel):
            head_keep[g, qs] = 1
        group_keep = (head_keep.sum(1) > 0).double()
        q = qkv[:, :, :, :qpg] * head_keep[:, :, None]
        k = qkv[:, :, :, qpg] * group_keep[:, None]
        v = qkv[:, :, :, qpg + 1] * group_keep[:, None]
        scores = torch.einsum("sbgqd,tbgd->bgqst", q, k) / math.sqrt(hn)
        probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
        ctx = torch.einsum("bgqst,tbgd->sbgqd", probs, v).reshape(s, x.shape[1], -1)
        col_keep = head_keep.reshape(-1).repeat_interleave(hn)
        y = y + ctx @ (wo * col_keep[None, :]).t()
    return y, leaves


def compare(tag, y, xg, grads, y_ref, x_ref, leaves, names, sp, omitted):
    """Max abs errors of forward and all grads; counts of non-zero omitted gradients."""
    y_ref_l = local_input(y_ref.detach(), sp)
    cot = shared_randn(*y_ref.shape, seed=7).double()
    (y_ref * cot).sum().backward()
    errs = {"forward": (y.double() - y_ref_l).abs().max().item(),
            "grad_input": (xg.double() - local_input(x_ref.grad, sp)).abs().max().item()}
    rank = ps.get_tensor_model_parallel_rank()
    for name, leaf_list in names.items():
        ref = leaf_list[rank].grad
        errs[f"grad_{name}"] = (grads[name].double() - ref).abs().max().item()
    nonzero_omitted = sum(int(torch.count_nonzero(fn(grads))) for fn in omitted)
    return {"case": tag, "errors": errs, "nonzero_omitted_grads": nonzero_omitted,
            "scale": y_ref.abs().max().item()}


def mlp_case(tp, sp, gated, bias, metric, use_main_grad, rate=0.5, multiple=64,
             expected_kept=None):
    tag = f"mlp tp{tp} sp{int(sp)} {'swiglu' if gated else 'gelu'} {metric}"
    if rate != 0.5:
        tag += f" r{rate} multiple{multiple}"
    reseed(21)
    cfg = transformer_config(tp, sp, gated=gated, bias=bias)
    sat = SATConfig(omission_rate=rate, metric=metric, selection="sampling",
                    channel_multiple=multiple)
    mlp = build_mlp(cfg, sat).train()
    x_full = shared_randn(SEQ, BATCH, HIDDEN, seed=3)
    y, xg, grads = run(mlp, x_full, sp, use_main_grad)
    fc1_rows = mlp.sat.state.last[0]  # [gate; up] rows of a gated unit: the channels twice
    ch = fc1_rows[: fc1_rows.numel() // 2] if gated else fc1_rows
    f_l = FFN // tp
    w1s = gather_list(mlp.linear_fc1.weight.detach())
    w2s = gather_list(mlp.linear_fc2.weight.detach())
    chans = gather_list(ch)
    b1s = gather_list(mlp.linear_fc1.bias.detach()) if bias else [None] * tp
    b2 = mlp.linear_fc2.bias.detach() if bias else None
    x_ref = x_full.double().requires_grad_(True)
    y_ref, leaves = mlp_reference(w1s, w2s, b1s, b2, chans, x_ref, gated)
    per = 3 if bias else 2
    names = {"linear_fc1.weight": leaves[0::per], "linear_fc2.weight": leaves[1::per]}
    if bias:
        names["linear_fc1.bias"] = leaves[2::per]
    dropped = torch.ones(f_l, dtype=torch.bool)
    dropped[ch] = False
    rows = torch.cat([dropped, dropped]) if gated else dropped
    omitted = [lambda g: g["linear_fc1.weight"][rows], lambda g: g["linear_fc2.weight"][:, dropped]]
    rec = compare(tag, y, xg, grads, y_ref, x_ref, leaves, names, sp, omitted)
    rec["selection"] = ch.tolist()
    rec["kept"] = int(ch.numel())
    rec["expected_kept"] = f_l // 2 if expected_kept is None else expected_kept
    return rec


def attention_case(tp, sp, heads, groups, gqa_mode, metric, use_main_grad):
    tag = f"attn tp{tp} sp{int(sp)} h{heads}g{groups} {gqa_mode} {metric}"
    reseed(22)
    cfg = transformer_config(tp, sp, heads=heads, groups=groups)
    sat = SATConfig(omission_rate=0.5, metric=metric, selection="sampling", gqa_mode=gqa_mode)
    attn = build_attention(cfg, sat).train()
    x_full = shared_randn(SEQ, BATCH, HIDDEN, seed=5)
    y, xg, grads = run(attn, x_full, sp, use_main_grad)
    sel = attn.sat.state.last
    hn, g_l = HIDDEN // heads, groups // tp
    qpg = heads // groups
    kept_idx = sel.heads()  # local query-head indices [kept groups, kept queries per group]
    sels = list(zip(gather_list(kept_idx[:, 0] // qpg), gather_list(kept_idx % qpg)))
    wqkvs = gather_list(attn.linear_qkv.weight.detach())
    wos = gather_list(attn.linear_proj.weight.detach())
    x_ref = x_full.double().requires_grad_(True)
    y_ref, leaves = attention_reference(wqkvs, wos, sels, x_ref, g_l, qpg, hn)
    names = {"linear_qkv.weight": leaves[0::2], "linear_proj.weight": leaves[1::2]}
    rows = torch.ones(wqkvs[0].shape[0], dtype=torch.bool)
    rows[sel.qkv_rows] = False
    cols = torch.ones(wos[0].shape[1], dtype=torch.bool)
    cols[sel.proj_columns] = False
    omitted = [lambda g: g["linear_qkv.weight"][rows], lambda g: g["linear_proj.weight"][:, cols]]
    rec = compare(tag, y, xg, grads, y_ref, x_ref, leaves, names, sp, omitted)
    kept_heads = sel.groups * sel.queries
    rec["selection"] = sel.qkv_rows.tolist()
    rec["kept"] = kept_heads
    rec["expected_kept"] = (heads // tp) // 2
    rec["kv_groups_computed"] = sel.groups
    return rec


def stock_equivalence(tp):
    """r = 0: SAT blocks vs megatron-core's stock MLP / SelfAttention (DotProductAttention)."""
    out = []
    cfg = transformer_config(tp, False, heads=8, groups=4)
    off = SATConfig(omission_rate=0.0)
    reseed(11)
    sat_attn = build_attention(cfg, off)
    stock = build_attention(cfg, off, stock=True)
    stock.load_state_dict(sat_attn.state_dict())
    x = shared_randn(SEQ, BATCH, HIDDEN, seed=9)
    mask = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)[None, None]
    res = []
    for m in (sat_attn, stock):
        xi = x.clone().requires_grad_(True)
        y, _ = m(xi, mask)
        (y * shared_randn(*y.shape, seed=2)).sum().backward()
        res.append((y.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    err = max([(res[0][0] - res[1][0]).abs().max().item(), (res[0][1] - res[1][1]).abs().max().item()]
              + [(res[0][2][n] - res[1][2][n]).abs().max().item() for n in res[0][2]])
    out.append({"case": f"stock attention tp{tp}", "max_error": err})
    return out


def stock_model_equivalence(tp):
    """r = 0: GPTModel with the SAT spec vs megatron-core's stock local GPT spec.

    Same seed, so the same parameters (names, shapes, values); the logits and every
    gradient then agree up to the attention kernel's rounding (SDPA vs the local
    DotProductAttention).
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron_sat.spec import get_sat_layer_spec
    cfg = transformer_config(tp, False, heads=8, groups=4)
    cfg.num_layers = 2
    cfg.normalization = "RMSNorm"
    specs = {"stock": get_gpt_layer_local_spec(normalization="RMSNorm"),
             "sat": get_sat_layer_spec(SATConfig(omission_rate=0.0))}
    tokens = torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1)
    out = {}
    for name, spec in specs.items():
        reseed(31)
        model = GPTModel(cfg, spec, vocab_size=128, max_sequence_length=SEQ,
                         position_embedding_type="rope", share_embeddings_and_output_weights=False)
        logits = model(tokens, positions, mask)
        (logits.float() * shared_randn(*logits.shape, seed=4)).sum().backward()
        out[name] = (logits.detach(), {n: (p.detach().clone(), p.grad)
                                       for n, p in model.named_parameters()})
    (l_stock, p_stock), (l_sat, p_sat) = out["stock"], out["sat"]
    same_params = (list(p_stock) == list(p_sat)
                   and all(torch.equal(p_stock[n][0], p_sat[n][0]) for n in p_stock))
    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    grad_err = max(rel(p_sat[n][1], p_stock[n][1]) for n in p_stock)
    return {"case": f"stock gpt model tp{tp}", "same_params": same_params,
            "max_rel_error": max(rel(l_sat, l_stock), grad_err), "num_params": len(p_stock)}


def token_mean_case(tp, sp):
    """A GPTModel with the SAT spec at r = 0.5 (maxip): the layers' norms offer their
    output's token mean to the next block (``SATTransformerLayer``, norm.py's torch hook as
    on CPU), against the same model with the norms unlinked, where every block computes the
    mean itself. Records how many blocks computed it, and the largest difference of the
    logits and gradients (same draws: the same selections)."""
    from megatron.core.models.gpt import GPTModel

    from megatron_sat import block, norm
    from megatron_sat.spec import get_sat_block_spec
    cfg = transformer_config(tp, sp, heads=8, groups=4)
    cfg.num_layers = 2
    cfg.normalization = "RMSNorm"
    spec = get_sat_block_spec(SATConfig(omission_rate=0.5, metric="maxip",
                                        selection="sampling"), cfg)
    tokens = torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    computed = []
    own_statistic = block.input_statistic

    def counted(*args, **kwargs):
        computed.append(1)
        return own_statistic(*args, **kwargs)

    block.input_statistic, saved_hook = counted, norm.RMS_NORM_WITH_RESIDUAL
    norm.RMS_NORM_WITH_RESIDUAL = norm.rms_norm_with_residual
    out, counts = {}, {}
    try:
        for linked in (True, False):
            reseed(37)
            model = GPTModel(cfg, spec, vocab_size=128, max_sequence_length=SEQ,
                             position_embedding_type="rope",
                             share_embeddings_and_output_weights=False).train()
            if not linked:
                for module in model.modules():
                    if isinstance(module, norm.TorchNorm):
                        module.token_mean_sink = None
            computed.clear()
            logits = model(tokens, positions, None)
            (logits.float() * shared_randn(*logits.shape, seed=6)).sum().backward()
            counts[linked] = len(computed)
            out[linked] = [logits.detach()] + [p.grad for p in model.parameters()]
    finally:
        block.input_statistic, norm.RMS_NORM_WITH_RESIDUAL = own_statistic, saved_hook
    diff = max((a - b).abs().max().item() for a, b in zip(out[True], out[False]))
    return {"case": f"token mean tp{tp} sp{int(sp)}", "computed_linked": counts[True],
            "computed_unlinked": counts[False], "max_difference": diff,
            "logits_scale": out[False][0].abs().max().item()}


def recompute_case(tp, scope):
    """Full activation recompute of a SAT MLP reuses the first forward's channels."""
    from megatron.core import tensor_parallel
    cfg = transformer_config(tp, False)
    sat = SATConfig(omission_rate=0.5, metric="maxip", selection="sampling",
                    selection_scope=scope)
    mlp = build_mlp(cfg, sat).train()
    x = shared_randn(SEQ, BATCH, HIDDEN, seed=4)
    grads, draws = [], []
    for recompute in (False, True):
        mlp.zero_grad()
        mlp.set_layer_number(1)  # fresh selection state: both runs draw micro-batch 0
        drawn, pick = [], mlp.sat.pick

        def counted_pick(*args, _drawn=drawn, _pick=pick):
            _drawn.append(1)
            return _pick(*args)
        mlp.sat.pick = counted_pick
        xi = x.clone().requires_grad_(True)
        if recompute:
            y, _ = tensor_parallel.checkpoint(lambda t: mlp(t), False, xi)
        else:
            y, _ = mlp(xi)
        (y * shared_randn(*y.shape, seed=1)).sum().backward()
        grads.append([xi.grad] + [p.grad.clone() for p in mlp.parameters()])
        draws.append(len(drawn))
        del mlp.sat.pick
    diff = max((a - b).abs().max().item() for a, b in zip(*grads))
    # a second draw in the recompute pass would take new noise (and count 2 draws)
    return {"case": f"recompute tp{tp} {scope}", "max_error": diff, "draws": draws}


def ddp_accumulation_case(tp, scope, seq, chunks=1):
    """Micro-batches accumulated in megatron's DDP grad buffer, whose ``zero_grad_buffer``
    marks ``main_grad`` zeroed (``attach_to_megatron_ddp``): the first kept slice handed
    over writes, later ones add; a dense micro-batch before them keeps its gradient, and
    the next iteration starts from zero. With ``scope`` iteration the SAT micro-batches of
    an iteration share one selection (``runtime.set_micro_batches``) and, at ``seq`` 32,
    where the layers' omitted activations outweigh a compact sum of their kept gradients,
    hand over one summed slice after the last of them; at ``seq`` 8 each hands over its
    own. With ``microbatch`` each draws and hands over its own. ``chunks`` > 1 runs the MLP
    on that many pieces of each micro-batch (megatron's ``--mlp-chunks-for-training``):
    one selection still, and each piece hands over its own slice.
    Reference: the same module without ``main_grad``, where autograd sums each
    micro-batch's dense ``.grad``."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron_sat.sparse_linear import attach_to_megatron_ddp
    attach_to_megatron_ddp()
    cfg = transformer_config(tp, False)
    cfg.mlp_chunks_for_training = chunks
    sat = SATConfig(omission_rate=0.5, metric="maxip", selection="sampling",
                    selection_scope=scope)
    reseed(23)
    mlp = build_mlp(cfg, sat)
    reseed(23)
    reference = build_mlp(cfg, sat)  # the same weights
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(), mlp)
    fc1_grad = mlp.linear_fc1.weight.main_grad
    out = []
    # (iteration, [training mode of each micro-batch]): eval = dense (r = 0) forward
    for it, modes in ((1, [True, True]), (2, [False, True]), (3, [True, True, True])):
        runtime.set_iteration(it)
        runtime.set_micro_batches(sum(modes) if scope == "iteration" else 1)
        ddp.zero_grad_buffer()
        marked = all(getattr(p, "sat_main_grad_zeroed", False) for p in mlp.parameters())
        reference.zero_grad()
        for module in (mlp, reference):
            module.set_layer_number(1)  # the same draws in both
        selections, untouched = [], []
        for mb, training in enumerate(modes):
            x = shared_randn(seq, BATCH, HIDDEN, seed=40 + 10 * it + mb)
            cot = shared_randn(seq, BATCH, HIDDEN, seed=41 + 10 * it + mb)
            for module in (ddp, reference):
                module.train(training)
                y = torch.cat([module(piece)[0] for piece in x.chunk(chunks, dim=0)])
                (y * cot).sum().backward()
            if training:
                selections.append(mlp.sat.state.last[0])
                untouched.append(bool(torch.all(fc1_grad == 0)))
        want = {name: p.grad for name, p in reference.named_parameters()}
        errs = {name: (p.main_grad - want[name]).abs().max().item()
                for name, p in mlp.named_parameters()}
        out.append({"case": f"ddp accumulation tp{tp} {scope} seq{seq}"
                    + (f" chunks{chunks}" if chunks > 1 else "") + f" iteration {it}",
                    "seq": seq,
                    "micro_batches": ["sat" if t else "dense" for t in modes],
                    "marked_zeroed": marked, "main_grad_errors": errs,
                    "one_selection": all(s is selections[0] for s in selections),
                    "main_grad_zero_after_each_sat_micro_batch": untouched,
                    "scale": max(want[name].abs().max().item() for name in errs)})
    runtime.set_micro_batches(1)
    return out


def main(path):
    dist.init_process_group(backend="gloo")
    tp = dist.get_world_size()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(1234)
    runtime.set_iteration(0)
    records = []
    for sp in ((False, True) if tp > 1 else (False,)):
        for gated, bias in ((True, False), (False, True)):
            records.append(mlp_case(tp, sp, gated, bias, "maxip", use_main_grad=sp))
        for heads, groups, modes in ((4, 4, ("heads",)), (8, 4, ("heads", "groups"))):
            for mode in modes:
                records.append(attention_case(tp, sp, heads, groups, mode, "maxip",
                                              use_main_grad=sp))
    records.append(mlp_case(tp, False, True, False, "wanda", use_main_grad=False))
    # --sat-channel-multiple 8 at r = 0.3: floor(64 * 0.7) = 44 -> 40 channels at TP 1,
    # floor(32 * 0.7) = 22 -> 16 per rank at TP 2
    records.append(mlp_case(tp, False, True, False, "maxip", use_main_grad=True, rate=0.3,
                            multiple=8, expected_kept={1: 40, 2: 16}[tp]))
    records.append(attention_case(tp, tp > 1, 8, 4, "heads", "magnitude", use_main_grad=True))
    records += stock_equivalence(tp)
    records.append(stock_model_equivalence(tp))
    runtime.set_iteration(3)
    for sp in ((False, True) if tp > 1 else (False,)):
        records.append(token_mean_case(tp, sp))
    for scope in SELECTION_SCOPES:
        records.append(recompute_case(tp, scope))
        for seq in (SEQ, 4 * SEQ):
            records += ddp_accumulation_case(tp, scope, seq)
    records += ddp_accumulation_case(tp, "iteration", 4 * SEQ, chunks=2)
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(records, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
