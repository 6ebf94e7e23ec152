#!/usr/bin/env python3
"""Perplexity of a causal language model on text files, one number per file.

The model is a Hugging Face causal-LM directory (``config.json``) or a checkpoint
directory of ``pretrain_sat.py`` (``--save`` dir, holding
``latest_checkpointed_iteration.txt``), which is turned into a Hugging Face Llama in
memory by ``megatron_sat.convert.load_hf_from_megatron``.

What is measured (the same for every model, so runs that share a tokenizer compare):

* Each file is split into documents exactly as ``tools/preprocess_data.py`` does for
  training (blank-line-separated blocks, or JSON lines), and each document is encoded as
  ``tokenizer.encode(text) + [eos]`` with no BOS. The documents are concatenated into one
  token stream per file.
* The stream is cut into consecutive windows of ``--seq-length`` predicted tokens: window
  ``i`` reads tokens ``[iL, iL + L)`` and predicts ``[iL + 1, iL + L + 1)``. Every token but
  the first of the stream is predicted exactly once, with between 0 and L - 1 tokens of
  context from its own window (no overlap between windows, no context across them).
* perplexity = exp(mean token negative log-likelihood), the NLL computed in float32 from
  the model's logits over its full (possibly padded) vocabulary, as in training.

Example::

    python tools/evaluate_ppl.py --model runs/mini_cpt/full/checkpoint \\
        --tokenizer-model data/mini_cpt/tokenizer/tokenizer.model \\
        --input data/mini_cpt/heldout/zh_news.txt data/mini_cpt/heldout/en.txt \\
        --seq-length 1024 --json ppl.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# The sibling tool (its tokenizer and document reader) and megatron_sat, also when the
# repository is not pip-installed (as on the GPU machines).
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from preprocess_data import InputError, Tokenizer, iter_documents  # noqa: E402

PROG = "evaluate_ppl.py"
# megatron pads its vocabulary to a multiple of --make-vocab-size-divisible-by (128) times
# the tensor-parallel size; a model vocabulary that is such a padding of the tokenizer's
# is accepted, any other difference means the wrong tokenizer.
_PADDING_MULTIPLES = (128, 256, 512, 1024)


@dataclass
class FileResult:
    file: str
    tokens: int  # predicted (scored) tokens
    windows: int
    mean_nll: float  # nats per token
    ppl: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path,
                        help="Hugging Face model directory (config.json) or pretrain_sat.py "
                             "checkpoint directory (latest_checkpointed_iteration.txt).")
    parser.add_argument("--tokenizer-model", required=True, type=Path,
                        help="SentencePiece .model file, or a directory with a Hugging Face "
                             "tokenizer or a tokenizer.model.")
    parser.add_argument("--input", required=True, nargs="+", metavar="FILE",
                        help="Text files (blank-line-separated documents) or .json/.jsonl.")
    parser.add_argument("--json-key", default="text", help="Document field of JSON lines.")
    parser.add_argument("--seq-length", type=int, default=1024,
                        help="Predicted tokens per window (default: 1024).")
    parser.add_argument("--batch-size", type=int, default=8, help="Windows per forward.")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="Score only the first N tokens of each file (default: all).")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda.")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                        help="Model weights and activations: auto = bf16 on GPU, fp32 on CPU. "
                             "The loss is always computed in fp32.")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT",
                        help="Also write the results to this JSON file.")
    args = parser.parse_args(argv)
    for flag, value in (("--seq-length", args.seq_length), ("--batch-size", args.batch_size),
                        ("--max-tokens", args.max_tokens or 1)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    return args


# --- model and tokenizer ------------------------------------------------------------------


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    return dev, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


def is_megatron_checkpoint(path: Path) -> bool:
    return (path / "latest_checkpointed_iteration.txt").is_file()


def load_model(path: Path, device: torch.device, dtype: torch.dtype, tokenizer_model: Path,
               tokenizer_vocab: int) -> torch.nn.Module:
    """A causal LM in eval mode on ``device`` from an HF or pretrain_sat.py directory,
    after checking that its vocabulary is the tokenizer's (see :func:`check_vocab`).

    A megatron checkpoint is checked before it is read, against megatron's padded size;
    the model then gets the unpadded vocabulary (``tokenizer_model``'s rows when that is a
    SentencePiece file).
    """
    if (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
        check_vocab(model.get_input_embeddings().weight.shape[0], tokenizer_vocab,
                    tokenizer_model)
    elif is_megatron_checkpoint(path):
        from megatron_sat.convert import ConversionError, load_hf_from_megatron
        from megatron_sat.megatron_checkpoint import MegatronCheckpoint

        try:
            padded = MegatronCheckpoint.open(path, "--model").args.padded_vocab_size
            check_vocab(padded, tokenizer_vocab, tokenizer_model)
            model = load_hf_from_megatron(
                path, device=device, dtype=dtype,
                tokenizer_model=tokenizer_model if tokenizer_model.is_file() else None)
        except ConversionError as e:
            raise InputError(str(e).replace("--load-dir", "--model")) from None
    else:
        raise InputError(f"--model: {path} is neither a Hugging Face model directory "
                         "(config.json) nor a pretrain_sat.py checkpoint directory "
                         "(latest_checkpointed_iteration.txt)")
    return model.to(device=device, dtype=dtype).eval()


def check_vocab(model_vocab: int, tokenizer_vocab: int, tokenizer: Path) -> None:
    """Fail unless the model's vocabulary is the tokenizer's, or megatron's padding of it."""
    padded = {math.ceil(tokenizer_vocab / m) * m for m in _PADDING_MULTIPLES}
    if model_vocab == tokenizer_vocab or model_vocab in padded:
        return
    raise InputError(
        f"--tokenizer-model: {tokenizer} has {tokenizer_vocab} pieces but the model's "
        f"embedding has {model_vocab} rows; use the tokenizer the model was trained with (after a "
        "vocabulary extension, resize the checkpoint with tools/convert_checkpoint.py resize)")


def token_stream(path: str, tokenizer: Tokenizer, json_key: str,
                 max_tokens: int | None) -> torch.Tensor:
    """The documents of ``path``, each encoded + [eos], concatenated (int64)."""
    ids: list[int] = []
    for doc in iter_documents([path], json_key, doc_per_file=False):
        ids.extend(tokenizer.encode(doc)[1].tolist())
        if max_tokens is not None and len(ids) > max_tokens:
            ids = ids[:max_tokens + 1]  # max_tokens predicted tokens
            break
    if len(ids) < 2:
        raise InputError(f"--input: {path} holds fewer than 2 tokens; nothing to predict")
    return torch.tensor(ids, dtype=torch.int64)


# --- evaluation ---------------------------------------------------------------------------


def windows(stream: torch.Tensor, seq_length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) of the consecutive non-overlapping windows of ``stream``."""
    out = []
    for start in range(0, len(stream) - 1, seq_length):
        end = min(start + seq_length, len(stream) - 1)
        out.append((stream[start:end], stream[start + 1:end + 1]))
    return out


@torch.no_grad()
def stream_nll(model: torch.nn.Module, stream: torch.Tensor, seq_length: int,
               batch_size: int, device: torch.device) -> tuple[float, int, int]:
    """(summed NLL in nats, predicted tokens, windows) of one token stream."""
    pairs = windows(stream, seq_length)
    total = 0.0
    # Equal-length windows go in batches; the shorter last window, if any, on its own.
    groups: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for pair in pairs:
        groups.setdefault(len(pair[0]), []).append(pair)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            inputs = torch.stack([p[0] for p in chunk]).to(device)
            labels = torch.stack([p[1] for p in chunk]).to(device)
            logits = model(input_ids=inputs).logits.float()
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                reduction="sum").item()
    return total, len(stream) - 1, len(pairs)


def evaluate_files(model: torch.nn.Module, tokenizer: Tokenizer, files: list[str], *,
                   seq_length: int, batch_size: int, device: torch.device,
                   json_key: str = "text", max_tokens: int | None = None) -> list[FileResult]:
    """Perplexity of ``model`` on each file (see the module docstring)."""
    results = []
    for path in files:
        stream = token_stream(path, tokenizer, json_key, max_tokens)
        nll, tokens, count = stream_nll(model, stream, seq_length, batch_size, device)
        mean = nll / tokens
        results.append(FileResult(path, tokens, count, mean, math.exp(mean)))
    return results


def evaluate(model_path: Path, tokenizer_path: Path, files: list[str], *, seq_length: int,
             batch_size: int = 8, device: str = "auto", dtype: str = "auto",
             json_key: str = "text", max_tokens: int | None = None) -> dict:
    """Load, check and evaluate; returns the JSON-ready report. Raises InputError."""
    missing = [p for p in files if not os.path.isfile(p)]
    if missing:
        raise InputError(f"--input: no such file: {', '.join(missing)}")
    if not model_path.is_dir():
        raise InputError(f"--model: no such directory: {model_path}")
    tokenizer = Tokenizer(tokenizer_path)
    dev, torch_dtype = resolve_device_dtype(device, dtype)
    start = time.perf_counter()
    model = load_model(model_path, dev, torch_dtype, tokenizer_path, tokenizer.vocab_size)
    results = evaluate_files(model, tokenizer, files, seq_length=seq_length,
                             batch_size=batch_size, device=dev, json_key=json_key,
                             max_tokens=max_tokens)
    return {
        "model": str(model_path), "tokenizer": str(tokenizer_path),
        "seq_length": seq_length, "dtype": str(torch_dtype).removeprefix("torch."),
        "device": str(dev), "seconds": round(time.perf_counter() - start, 2),
        "results": [asdict(r) for r in results],
    }


def format_table(report: dict) -> str:
    rows = [("file", "tokens", "windows", "nll/token", "ppl")]
    rows += [(r["file"], str(r["tokens"]), str(r["windows"]), f"{r['mean_nll']:.4f}",
              f"{r['ppl']:.3f}") for r in report["results"]]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows)


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = evaluate(args.model, args.tokenizer_model, args.input,
                          seq_length=args.seq_length, batch_size=args.batch_size,
                          device=args.device, dtype=args.dtype, json_key=args.json_key,
                          max_tokens=args.max_tokens)
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"model {report['model']} ({report['dtype']} on {report['device']}), "
          f"windows of {report['seq_length']} tokens")
    print(format_table(report))
    if args.json is not None:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
