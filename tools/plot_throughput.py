#!/usr/bin/env python3
"""Plot tokens/s and the training loss against the iteration for several runs in one PNG.

Each RUN is a directory holding the run's ``throughput.jsonl`` (written by
``pretrain_sat.py``'s throughput logger) and megatron's TensorBoard event files (the
``lm loss`` scalar), i.e. the run's ``--tensorboard-dir``; or the JSONL file itself, in
which case the loss is read from the event files beside it. The legend names the runs by
``--label`` (one per run, in order) or by their directory names::

    python tools/plot_throughput.py runs/dense/tensorboard runs/sat/tensorboard \\
        --label dense "SAT r=0.5" --out throughput.png

The PNG is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util.tensor_util import make_ndarray

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

JSONL_NAME = "throughput.jsonl"
LOSS_TAG = "lm loss"


@dataclass
class Series:
    label: str
    tokens_per_s: dict[int, float]  # iteration -> tokens/s of the interval ending there
    loss: dict[int, float]  # iteration -> lm loss


def read_jsonl(path: Path) -> dict[int, float]:
    """Iteration -> tokens/s; a resumed run that repeats an iteration keeps the later line."""
    values = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                values[int(record["iteration"])] = float(record["tokens_per_s"])
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number}: not a throughput record ({error})") from None
    return values


def read_loss(directory: Path, tag: str = LOSS_TAG) -> dict[int, float]:
    """Scalar ``tag`` per step from megatron's TensorBoard event files in ``directory``."""
    values = {}
    for path in sorted(glob.glob(str(directory / "events.out.tfevents.*"))):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(make_ndarray(value.tensor).item())
    return values


def load_run(run: Path, label: str | None) -> Series:
    jsonl, directory = (run, run.parent) if run.is_file() else (run / JSONL_NAME, run)
    tokens = read_jsonl(jsonl) if jsonl.is_file() else {}
    loss = read_loss(directory)
    if not tokens and not loss:
        raise ValueError(f"{run}: neither {JSONL_NAME} records nor '{LOSS_TAG}' TensorBoard "
                         "scalars found; give the run's --tensorboard-dir or its JSONL file")
    return Series(label or directory.resolve().name, tokens, loss)


def plot(series: list[Series], out: Path) -> None:
    fig, (ax_tokens, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for s in series:
        if s.tokens_per_s:
            steps = sorted(s.tokens_per_s)
            ax_tokens.plot(steps, [s.tokens_per_s[i] for i in steps], marker=".", label=s.label)
        if s.loss:
            steps = sorted(s.loss)
            ax_loss.plot(steps, [s.loss[i] for i in steps], label=s.label)
    ax_tokens.set(xlabel="iteration", ylabel="tokens/s (global)",
                  title="throughput per log interval")
    ax_loss.set(xlabel="iteration", ylabel=LOSS_TAG, title="training loss")
    for ax in (ax_tokens, ax_loss):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                        help=f"A run's TensorBoard directory (with {JSONL_NAME}) or a JSONL file.")
    parser.add_argument("--label", nargs="+", default=None,
                        help="Legend names, one per RUN (default: the directory names).")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write.")
    args = parser.parse_args(argv)
    if args.label is not None and len(args.label) != len(args.runs):
        parser.error(f"--label got {len(args.label)} names for {len(args.runs)} runs; "
                     "give one per RUN")
    for run in args.runs:
        if not run.exists():
            parser.error(f"RUN {run}: no such file or directory")
    try:
        series = [load_run(run, label)
                  for run, label in zip(args.runs, args.label or [None] * len(args.runs))]
    except ValueError as error:
        parser.error(str(error))
    plot(series, args.out)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
