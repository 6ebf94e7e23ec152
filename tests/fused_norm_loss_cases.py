"""The Triton RMSNorm and cross-entropy kernels against float64 torch references.

Used two ways:

* ``python tests/fused_norm_loss_cases.py OUT.json`` under ``TRITON_INTERPRET=1``: CPU, in
  Triton's interpreter, small fp32 shapes, plus the cross-entropy split over a two-rank
  gloo group (``tests/test_fused_norm_loss.py``, in CI);
* :func:`norm_records` / :func:`loss_records` on CUDA with bf16 at model shapes.

Each record holds the largest error of every output next to the scale it is judged by.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

from megatron_sat.fused_cross_entropy import vocab_parallel_cross_entropy
from megatron_sat.fused_rmsnorm import fused_rms_norm, fused_rms_norm_with_residual


def _err(got: torch.Tensor, want: torch.Tensor) -> dict:
    got, want = got.double().cpu(), want.double().cpu()
    return {"max_abs": (got - want).abs().max().item(), "scale": want.abs().max().item(),
            "shape": list(got.shape), "finite": bool(torch.isfinite(got).all())}


def norm_records(shapes, device="cpu", dtype=torch.float32, eps=1e-5,
                 residual=False, token_mean=False) -> list[dict]:
    """y, dx, dw of the kernels against F.rms_norm in float64 (same inputs, same dy).
    ``residual``: the norm that also returns x (gradient dr), so dx = the norm's + dr.
    ``token_mean`` (with ``residual``): also y's mean over the rows, against the float64
    mean of the y returned, and whether y equals the kernels' y without the mean."""
    out = []
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        n = shape[-1]
        x = (torch.randn(shape, generator=gen) * 3 + 0.5).to(device, dtype)
        w = (torch.rand(n, generator=gen) + 0.5).to(device, dtype)
        dy = torch.randn(shape, generator=gen).to(device, dtype)
        dr = torch.randn(shape, generator=gen).to(device, dtype)
        xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
        xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
        yr = F.rms_norm(xr, (n,), wr, eps)
        record = {"case": f"rmsnorm {list(shape)} {dtype}" + (" residual" if residual else "")
                  + (" token mean" if token_mean else "")}
        if token_mean:
            y, r, mean = fused_rms_norm_with_residual(xk, wk, eps, token_mean=True)
            rows = y.detach().double().reshape(-1, n)
            record["mean"] = _err(mean, rows.mean(0))
            record["mean_dtype_kept"] = mean.dtype == dtype and not mean.requires_grad
            record["y_unchanged"] = torch.equal(
                y, fused_rms_norm_with_residual(x.clone().requires_grad_(), w, eps)[0])
        if residual:
            if not token_mean:
                y, r = fused_rms_norm_with_residual(xk, wk, eps)
            record["r_is_x"] = torch.equal(r, x) and r.data_ptr() == xk.data_ptr()
            torch.autograd.backward([y, r], [dy, dr])
            torch.autograd.backward([yr, xr], [dy.double(), dr.double()])
        else:
            y = fused_rms_norm(xk, wk, eps)
            y.backward(dy)
            yr.backward(dy.double())
        out.append({**record, "dtype_kept": y.dtype == dtype, "y": _err(y, yr),
                    "dx": _err(xk.grad, xr.grad), "dw": _err(wk.grad, wr.grad)})
    return out


def _reference(logits: torch.Tensor, target: torch.Tensor, grad_loss: torch.Tensor):
    """float64 loss and logits gradient; targets outside the vocabulary: loss = logsumexp."""
    x = logits.double().requires_grad_()
    lse = torch.logsumexp(x, dim=-1)
    inside = (target >= 0) & (target < x.shape[-1])
    picked = x.gather(-1, target.clamp(0, x.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    loss = lse - torch.where(inside, picked, torch.zeros_like(picked))
    loss.backward(grad_loss.double())
    return loss.detach(), x.grad


def _case(shape, vocab, out_of_range, device, dtype, gen):
    logits = (torch.randn(*shape, vocab, generator=gen) * 4).to(device, dtype)
    target = torch.randint(0, vocab, shape, generator=gen)
    if out_of_range:
        target.view(-1)[::3] = -1
        target.view(-1)[1::5] = vocab
    grad_loss = torch.rand(shape, generator=gen)
    return logits, target.to(device), grad_loss.to(device)


def loss_records(cases, device="cpu", dtype=torch.float32) -> list[dict]:
    """Loss and logits gradient of the kernels (one rank) against :func:`_reference`.
    ``cases``: (leading shape, vocabulary, with out-of-range targets)."""
    out = []
    gen = torch.Generator().manual_seed(1)
    for shape, vocab, out_of_range in cases:
        logits, target, grad_loss = _case(shape, vocab, out_of_range, device, dtype, gen)
        x = logits.clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(x, target)
        loss.backward(grad_loss)
        want, want_grad = _reference(logits, target, grad_loss)
        out.append({"case": f"ce {list(shape)} V{vocab} oor{int(out_of_range)} {dtype}",
                    "loss_dtype": str(loss.dtype), "grad_dtype_kept": x.grad.dtype == dtype,
                    "loss": _err(loss, want), "grad": _err(x.grad, want_grad)})
    return out


def _tp_worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}",
                                         rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(2)
    shape, vocab = (3, 4), 6000  # 3000 columns a rank: both ranks loop over two blocks
    logits, target, grad_loss = _case(shape, vocab, True, "cpu", torch.float32, gen)
    shard = vocab // world
    mine = logits[..., rank * shard:(rank + 1) * shard].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(mine, target, torch.distributed.group.WORLD)
    loss.backward(grad_loss)
    want, want_grad = _reference(logits, target, grad_loss)
    record = {"case": f"ce tp{world} rank{rank}", "loss": _err(loss, want),
              "grad": _err(mine.grad, want_grad[..., rank * shard:(rank + 1) * shard])}
    with open(f"{result_file}.{rank}", "w") as f:
        json.dump(record, f)
    torch.distributed.destroy_process_group()


def tensor_parallel_records(world: int = 2) -> list[dict]:
    """The cross-entropy over ``world`` gloo ranks, each holding a vocabulary shard."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "rank")
        torch.multiprocessing.spawn(_tp_worker, args=(world, os.path.join(tmp, "init"), result),
                                    nprocs=world)
        return [json.load(open(f"{result}.{rank}")) for rank in range(world)]


NORM_SHAPES = [(7, 48), (33, 128), (5, 3, 64), (2, 1000)]
LOSS_CASES = [((4, 3), 100, False), ((6,), 5000, True), ((2, 2), 4096, True)]

if __name__ == "__main__":
    record = {"norm": norm_records(NORM_SHAPES), "loss": loss_records(LOSS_CASES),
              "norm_residual": norm_records(NORM_SHAPES[:2], residual=True),
              # 37 rows: 10 programs of 4 rows (two tiles of two) in the interpreter,
              # the last one a single row; rows over FORWARD_TILE_VALUES / 2 wide
              # (5000: a block of 8192) take tiles of one
              "norm_token_mean": norm_records(NORM_SHAPES + [(37, 40), (3, 5000)],
                                              residual=True, token_mean=True),
              "tp": tensor_parallel_records()}
    with open(sys.argv[1], "w") as f:
        json.dump(record, f)
