"""Launch ``pretrain_sat.py`` in subprocesses on CPU and read back what it logged.

``pretrain`` runs ``torchrun --standalone --nproc-per-node N pretrain_sat.py`` with a tiny
GPT on megatron's mock data (the gloo backend: ``CUDA_VISIBLE_DEVICES`` is emptied, so
``megatron_sat.cpu`` takes over even on a GPU machine). Losses come back twice:

* as megatron prints them (``lm loss: 5.543737E+00``, 7 significant digits);
* exactly, as the float32 values megatron writes to TensorBoard every iteration.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util.tensor_util import make_ndarray

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "pretrain_sat.py")

# 2 layers, hidden 64, 4 heads in 2 kv groups, ffn 128, sequence 64, vocab 256.
TINY_GPT = [
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
    "--seq-length", "64", "--max-position-embeddings", "64",
    "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
    "--untie-embeddings-and-output-weights", "--disable-bias-linear",
    # megatron's defaults that need Apex or Transformer Engine
    "--no-rope-fusion", "--no-persist-layer-norm", "--no-gradient-accumulation-fusion",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "256",
]
# megatron's synthetic sequences 1, 2, 3, ...: quickly learnable
MOCK_DATA = ["--mock-data"]
# 12 iterations of 4 sequences; every iteration is logged. CPU initialisation draws the
# full weights before splitting them, so TP=1 and TP=2 start from the same model.
TRAINING = [
    "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "12",
    "--lr", "1e-2", "--seed", "1234", "--use-cpu-initialization",
    "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
    "--num-workers", "0", "--distributed-timeout-minutes", "2",
]

_PRINTED_LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: (\S+) \|")


@dataclass
class Run:
    returncode: int
    output: str  # stdout and stderr together
    printed: dict[int, str]  # iteration -> loss as printed
    exact: dict[int, float]  # iteration -> loss from TensorBoard (float32, exact)
    tensorboard_dir: Path


def _env() -> dict[str, str]:
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")


def pretrain(nproc: int, flags: list[str], tensorboard_dir: Path, timeout: int = 300,
             model: list[str] = TINY_GPT) -> Run:
    """Train ``model`` (default the tiny GPT) on mock data with ``flags`` added, logging to
    ``tensorboard_dir``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", SCRIPT, *model, *TRAINING, *MOCK_DATA, *flags,
           "--tensorboard-dir", str(tensorboard_dir)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    output = proc.stdout + proc.stderr
    printed = {int(i): loss for i, loss in _PRINTED_LOSS.findall(output)}
    return Run(proc.returncode, output, printed, read_tensorboard(tensorboard_dir, "lm loss"),
               tensorboard_dir)


def run_script(args: list[str], env: dict[str, str] | None = None,
               timeout: int = 120) -> subprocess.CompletedProcess:
    """``python pretrain_sat.py ARGS`` in one process (no torchrun)."""
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO,
                          env={**_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def read_tensorboard(directory: Path, tag: str) -> dict[int, float]:
    """Scalar ``tag`` per step from every event file in ``directory``."""
    values = {}
    for path in sorted(glob.glob(str(directory / "events.out.tfevents.*"))):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                if value.tag == tag:  # torch writes a float32 tensor
                    values[event.step] = make_ndarray(value.tensor).item()
    return values
