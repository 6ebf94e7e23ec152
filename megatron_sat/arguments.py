"""The ``--sat-*`` command-line flags, added to megatron's parser as extra arguments.

:func:`add_sat_arguments` is megatron's ``extra_args_provider``; :func:`sat_config_from_args`
turns the parsed namespace into a validated :class:`~megatron_sat.config.SATConfig`. The
throughput logger's flags (``megatron_sat/throughput.py``) and the switch of the torch
fusions (``megatron_sat/torch_fusions.py``) are groups of their own.
"""

from __future__ import annotations

import argparse
import os

from megatron_sat.config import (CHANNEL_MULTIPLE, DP_SELECTIONS, GQA_MODES, METRICS,
                                 MODULES, SCORE_SCALES, SELECTION_KERNELS, SELECTION_SCOPES,
                                 SELECTIONS, SATConfig)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _rate(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(
            f"{value} is outside [0, 1); use 0 for dense training, e.g. 0.5 to omit half")
    return value


def _positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def add_sat_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("SAT", "Sparsity-Accelerated Training (arXiv 2406.01392)")
    g.add_argument("--sat-omission-rate", type=_rate, default=0.0, metavar="R",
                   help="Maximum neuron omission rate r in [0, 1). 0 (default) trains densely.")
    g.add_argument("--sat-metric", choices=METRICS, default="maxip",
                   help="Neuron importance metric, Eq. 5 (default: maxip).")
    g.add_argument("--sat-selection", choices=SELECTIONS, default="sampling",
                   help="topk, or sampling without replacement from softmax(s/tau), Eq. 8 "
                        "(default: sampling).")
    g.add_argument("--sat-temperature", type=_positive_float, default=0.05, metavar="TAU",
                   help="Sampling temperature tau of Eq. 8 (default: 0.05).")
    g.add_argument("--sat-score-scale", choices=SCORE_SCALES, default="standard",
                   help="Rescaling of the scores before division by tau: standard (z-score "
                        "per layer and rank, default), minmax (to [0, 1]) or raw.")
    g.add_argument("--sat-lors-start", type=int, default=None, metavar="ETA",
                   help="LORS (Eq. 11): iteration eta after which the rate falls in ladders. "
                        "Unset (default) keeps the rate constant.")
    g.add_argument("--sat-lors-ladders", type=int, default=5, metavar="L",
                   help="LORS: number of ladders L (default: 5).")
    g.add_argument("--sat-gqa-mode", choices=GQA_MODES, default="heads",
                   help="GQA: 'heads' keeps the same number of query heads in every kv group "
                        "and computes K/V in full (default); 'groups' keeps whole kv groups "
                        "and drops their K/V too.")
    g.add_argument("--sat-dp-selection", choices=DP_SELECTIONS, default="local",
                   help="'local': each data-parallel rank selects from its own micro-batch "
                        "(default); 'shared': scores are averaged over the data-parallel "
                        "group so every rank trains the same sub-network.")
    g.add_argument("--sat-modules", nargs="+", choices=MODULES, default=list(MODULES),
                   help="Blocks to sparsify (default: mlp attention).")
    g.add_argument("--sat-channel-multiple", type=int, default=CHANNEL_MULTIPLE, metavar="M",
                   help="Round the MLP channels kept per tensor-parallel rank down to a "
                        f"multiple of M (default: {CHANNEL_MULTIPLE}; tensor-core-friendly GEMM "
                        "widths); a count below M stays exact. 1 keeps floor(n (1 - r)).")
    g.add_argument("--sat-selection-kernel", choices=SELECTION_KERNELS, default="auto",
                   help="'auto' (default): on a GPU with Triton installed, each block's "
                        "selection runs as one Triton kernel (megatron_sat/fused_selection.py); "
                        "'torch': torch operations everywhere. Both draw from the same "
                        "distribution with different noise streams.")
    g.add_argument("--sat-selection-scope", choices=SELECTION_SCOPES, default="iteration",
                   help="'iteration' (default): each block draws one sub-network per "
                        "training iteration (Eq. 1-2), on its first micro-batch, and every "
                        "micro-batch of the iteration trains it; 'microbatch': a new draw "
                        "for every micro-batch.")
    _add_throughput_arguments(parser)
    parser.add_argument_group(
        "Torch fusions", "Stand-ins for Transformer Engine / Apex kernels "
        "(megatron_sat/torch_fusions.py)").add_argument(
        "--no-sat-torch-fusions", dest="sat_torch_fusions", action="store_false",
        help="Keep megatron-core's plain-torch fallbacks for RoPE, Adam, the gradient norm "
             "and gradient-accumulation fusion, and its compiled SwiGLU, instead of "
             "megatron-sat's fused stand-ins and Triton SwiGLU (for A/B benchmarks). Without "
             "Apex it then needs --no-gradient-accumulation-fusion.")
    return parser


def _jsonl_path(text: str) -> str:
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name, e.g. "
                                         f"{os.path.join(text, 'throughput.jsonl')}")
    return text


def _add_throughput_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "SAT throughput logger", "One line per --log-interval with tokens/s, model TFLOP/s "
        "per GPU (computed and dense-equivalent), MFU, omission rate and peak memory; also "
        "written to TensorBoard and a JSONL file.")
    g.add_argument("--sat-peak-tflops", type=_positive_float, default=None, metavar="TFLOPS",
                   help="Peak dense TFLOP/s of one GPU for the MFU. Default: from the GPU "
                        "name for bf16/fp16 runs (H100 and H200 989, their NVL versions 835, "
                        "H100 PCIe 756, A100 312); otherwise MFU is not reported.")
    g.add_argument("--sat-throughput-jsonl", type=_jsonl_path, default=None, metavar="PATH",
                   help="JSONL file of the throughput log, one object per log interval, "
                        "appended to on resume. Default: throughput.jsonl in "
                        "--tensorboard-dir, else in --save, else none.")


def sat_config_from_args(args: argparse.Namespace) -> SATConfig:
    """Build the SAT config from megatron's parsed args. Does not validate the model shape."""
    return SATConfig(
        omission_rate=args.sat_omission_rate,
        metric=args.sat_metric,
        selection=args.sat_selection,
        temperature=args.sat_temperature,
        score_scale=args.sat_score_scale,
        lors_start=args.sat_lors_start,
        lors_ladders=args.sat_lors_ladders,
        train_iters=args.train_iters,
        gqa_mode=args.sat_gqa_mode,
        dp_selection=args.sat_dp_selection,
        modules=tuple(dict.fromkeys(args.sat_modules)),
        seed=args.seed,
        channel_multiple=args.sat_channel_multiple,
        selection_kernel=args.sat_selection_kernel,
        selection_scope=args.sat_selection_scope,
    ).validate()
