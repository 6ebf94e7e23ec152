"""The Triton scatter of the kept rows' weight gradient against torch's ``index_add_`` and
``index_copy_``.

* ``python tests/fused_scatter_cases.py OUT.json`` under ``TRITON_INTERPRET=1``: CPU, in
  Triton's interpreter, fp32 (``tests/test_sparse_kernels.py``, in CI);
* :func:`records` on CUDA (the ``cuda`` test), also at a Llama-2-7B fc1 shape.

Each record holds whether the kernel's ``main_grad`` is bitwise torch's.
"""

from __future__ import annotations

import json
import sys

import torch

from megatron_sat.fused_scatter import triton_scatter_rows

# (rows, columns, kept rows): sizes that fill no tile evenly
STRIDED_COLUMNS = 33  # this shape scatters into a column view of a wider main_grad
SHAPES = [(37, 70, 13), (5, 300, 3), (70, 1030, 41), (9, 2049, 9), (21, STRIDED_COLUMNS, 8)]
# Llama-2-7B's fc1 (rows [gate; up]) at r = 0.5, TinyLlama's QKV in heads mode
MODEL_SHAPES = [(22016, 4096, 11008), (3072, 2048, 1536)]


def records(shapes=SHAPES, device="cpu", dtype=torch.float32) -> list[dict]:
    out = []
    gen = torch.Generator().manual_seed(0)
    for rows, cols, n_kept in shapes:
        index = torch.randperm(rows, generator=gen)[:n_kept].sort().values.to(device)
        grad_kept = torch.randn(n_kept, cols, generator=gen).to(device, dtype)
        before = torch.randn(rows, cols, generator=gen).to(device, dtype)
        for accumulate in (True, False):
            got = before.clone()
            triton_scatter_rows(got, index, grad_kept, accumulate)
            want = before.clone()
            if cols == STRIDED_COLUMNS:  # a view whose rows are longer than its columns
                wide = torch.randn(rows, cols + 5, generator=gen).to(device, dtype)
                wide[:, :cols] = before
                outside = wide[:, cols:].clone()
                triton_scatter_rows(wide[:, :cols], index, grad_kept, accumulate)
                got = wide[:, :cols]
                assert torch.equal(wide[:, cols:], outside), "wrote outside the view"
            if accumulate:
                want.index_add_(0, index, grad_kept)
            else:
                want.index_copy_(0, index, grad_kept)
            out.append({"case": f"{rows}x{cols} kept {n_kept} rows "
                                f"{'add' if accumulate else 'write'} {dtype}",
                        "equal": torch.equal(got, want),
                        "changed": int((got != before).sum()),
                        "changed_by_torch": int((want != before).sum()),
                        "kept_elements": grad_kept.numel()})
    return out


if __name__ == "__main__":
    with open(sys.argv[1], "w") as f:
        json.dump(records(), f)
