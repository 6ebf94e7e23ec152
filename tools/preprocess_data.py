#!/usr/bin/env python3
"""Tokenize raw text into megatron-core's indexed dataset format (``PREFIX.bin``/``PREFIX.idx``).

Input files ending in ``.json`` or ``.jsonl`` hold one JSON object per line, whose
``--json-key`` field is a document. Any other file is plain UTF-8 text in which
blank-line-separated blocks are documents, or the whole file is one with ``--doc-per-file``.

Each document is stored as ``tokenizer.encode(text) + [eos]``. The token dtype is megatron's
``DType.optimal_dtype(vocab_size)``: uint16 below 65500 pieces, int32 otherwise.
``--workers N`` tokenizes in N processes (output identical to one process); the progress bar
counts input bytes, so it shows an ETA.

``--valid-fraction F`` sends every document ``i`` with ``floor((i+1)F) > floor(iF)`` (exactly
``floor(N F)`` of them, spread evenly through the input) to ``--valid-output-prefix``; the
rest go to ``--output-prefix``. Both datasets are written under temporary names and renamed
into place only once complete, so a failed run leaves no partial output.

Example::

    python tools/preprocess_data.py --input examples/data/tiny_corpus/*.txt \\
        --tokenizer-model data/demo/tokenizer.model \\
        --output-prefix data/demo/train_text_document \\
        --valid-fraction 0.05 --valid-output-prefix data/demo/valid_text_document
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy
from tqdm import tqdm

JSON_SUFFIXES = (".json", ".jsonl")


class InputError(Exception):
    """A problem with the command line or the input data; reported with exit status 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="Text files, or JSON-lines files ending in .json/.jsonl.")
    parser.add_argument("--json-key", default="text",
                        help="Field of each JSON object that holds the document (default: text).")
    parser.add_argument("--doc-per-file", action="store_true",
                        help="Treat each text file as one document instead of splitting it "
                             "at blank lines.")
    parser.add_argument("--tokenizer-model", required=True, type=Path,
                        help="A SentencePiece .model file, or a directory holding a Hugging Face "
                             "tokenizer (tokenizer.json / tokenizer_config.json) or a "
                             "tokenizer.model.")
    parser.add_argument("--output-prefix", required=True,
                        help="Writes PREFIX.bin and PREFIX.idx (the training documents).")
    parser.add_argument("--valid-fraction", type=float, default=0.0, metavar="F",
                        help="Fraction in [0, 1) of documents held out for validation.")
    parser.add_argument("--valid-output-prefix",
                        help="Prefix of the held-out dataset; required with --valid-fraction.")
    parser.add_argument("--workers", type=int, default=1,
                        help="Tokenizer processes (default: 1, tokenize in this process).")
    args = parser.parse_args(argv)
    if not 0.0 <= args.valid_fraction < 1.0:
        parser.error(f"--valid-fraction must be in [0, 1), got {args.valid_fraction}")
    if (args.valid_fraction > 0) != (args.valid_output_prefix is not None):
        parser.error("--valid-fraction and --valid-output-prefix must be given together")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    return args


# --- reading ------------------------------------------------------------------------------


def _text_documents(path: str, doc_per_file: bool) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        if doc_per_file:
            text = f.read().strip()
            if text:
                yield text
            return
        block: list[str] = []
        for line in f:
            if line.strip():
                block.append(line.rstrip("\n"))
            elif block:
                yield "\n".join(block)
                block = []
        if block:
            yield "\n".join(block)


def _json_documents(path: str, key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"--input: {path}:{lineno}: invalid JSON ({e})") from None
            if not isinstance(record, dict) or key not in record:
                raise InputError(f"--json-key: {path}:{lineno} has no field {key!r}")
            text = record[key]
            if not isinstance(text, str):
                raise InputError(f"--json-key: {path}:{lineno}: field {key!r} is "
                                 f"{type(text).__name__}, not a string")
            if text.strip():
                yield text


def iter_documents(paths: Iterable[str], json_key: str, doc_per_file: bool) -> Iterator[str]:
    """Yield the non-empty documents of ``paths``, in order."""
    for path in paths:
        if path.endswith(JSON_SUFFIXES):
            yield from _json_documents(path, json_key)
        else:
            yield from _text_documents(path, doc_per_file)


# --- tokenizing ---------------------------------------------------------------------------


class Tokenizer:
    """Text to token ids with a SentencePiece model or a Hugging Face tokenizer directory."""

    def __init__(self, path: Path):
        if path.is_dir() and any((path / n).is_file()
                                 for n in ("tokenizer.json", "tokenizer_config.json")):
            from transformers import AutoTokenizer  # slow import, only when needed

            try:
                self._hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except (OSError, ValueError) as e:
                raise InputError(f"--tokenizer-model: {path} is not a loadable Hugging Face "
                                 f"tokenizer directory ({e})") from None
            self.eos_id = self._hf.eos_token_id
            self.vocab_size = len(self._hf)
            if self.eos_id is None:
                raise InputError(f"--tokenizer-model: {path} defines no eos token")
            return
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise InputError(f"--tokenizer-model: no such tokenizer file or directory: {path}")
        import sentencepiece

        self._hf = None
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise InputError(
                f"--tokenizer-model: {path} is not a SentencePiece model ({e})") from None
        self.eos_id = self._sp.eos_id()
        self.vocab_size = self._sp.vocab_size()
        if self.eos_id < 0:
            raise InputError(f"--tokenizer-model: {path} defines no eos token")

    def encode(self, text: str) -> tuple[int, numpy.ndarray]:
        """UTF-8 size of ``text`` (for the progress bar) and its token ids followed by eos."""
        ids = (self._hf.encode(text, add_special_tokens=False) if self._hf is not None
               else self._sp.encode(text))
        ids.append(self.eos_id)
        return len(text.encode("utf-8")), numpy.asarray(ids, dtype=numpy.int32)


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(path: Path) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer(path)


def _encode_in_worker(text: str) -> tuple[int, numpy.ndarray]:
    return _WORKER_TOKENIZER.encode(text)


def encode_all(docs: Iterable[str], tokenizer: Tokenizer, path: Path,
               workers: int) -> Iterator[tuple[int, numpy.ndarray]]:
    """``Tokenizer.encode`` of ``docs`` in order, here or in a pool of ``workers`` processes."""
    if workers == 1:
        yield from map(tokenizer.encode, docs)
        return
    # "spawn" keeps workers free of the torch state imported into this process.
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (path,)) as pool:
        yield from pool.imap(_encode_in_worker, docs, chunksize=64)


# --- writing ------------------------------------------------------------------------------


class PendingDataset:
    """An ``IndexedDatasetBuilder`` writing to temporary files, renamed into place by commit()."""

    def __init__(self, prefix: str, dtype: type):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.tmp_prefix = f"{prefix}.tmp{os.getpid()}"
        self.builder = IndexedDatasetBuilder(self.tmp_prefix + ".bin", dtype=dtype)
        self.documents = 0
        self.tokens = 0

    def add(self, ids: numpy.ndarray) -> None:
        self.builder.add_document(ids, [len(ids)])
        self.documents += 1
        self.tokens += len(ids)

    def finalize(self) -> None:
        self.builder.finalize(self.tmp_prefix + ".idx")

    def commit(self) -> None:
        """Move the finalized files to their real names, the index last."""
        os.replace(self.tmp_prefix + ".bin", self.prefix + ".bin")
        os.replace(self.tmp_prefix + ".idx", self.prefix + ".idx")

    def discard(self) -> None:
        self.builder.data_file.close()
        for suffix in (".bin", ".idx"):
            Path(self.tmp_prefix + suffix).unlink(missing_ok=True)


def is_valid_document(index: int, fraction: float) -> bool:
    """Whether document ``index`` belongs to the held-out split (``floor(N*fraction)`` of N)."""
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


def preprocess(args: argparse.Namespace) -> list[PendingDataset]:
    """Tokenize and write every split; return the committed datasets."""
    from megatron.core.datasets.indexed_dataset import DType

    missing = [p for p in args.input if not os.path.isfile(p)]
    if missing:
        raise InputError(f"--input: no such file: {', '.join(missing)}")
    tokenizer = Tokenizer(args.tokenizer_model)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    train = PendingDataset(args.output_prefix, dtype)
    splits = [train]
    try:
        valid = None
        if args.valid_output_prefix is not None:
            valid = PendingDataset(args.valid_output_prefix, dtype)
            splits.append(valid)
        docs = iter_documents(args.input, args.json_key, args.doc_per_file)
        encoded = encode_all(docs, tokenizer, args.tokenizer_model, args.workers)
        input_bytes = sum(os.path.getsize(p) for p in args.input)
        with tqdm(total=input_bytes, desc="tokenizing", unit="B", unit_scale=True,
                  unit_divisor=1024, disable=None) as progress:
            for i, (size, ids) in enumerate(encoded):
                (valid if valid is not None and is_valid_document(i, args.valid_fraction)
                 else train).add(ids)
                progress.update(size)
            progress.update(input_bytes - progress.n)  # separators and blank lines
        total = sum(s.documents for s in splits)
        if total == 0:
            raise InputError(f"--input: no documents found in {', '.join(args.input)}")
        if valid is not None and valid.documents == 0:
            raise InputError(f"--valid-fraction {args.valid_fraction} selects no document "
                             f"out of {total}; raise it or drop the split")
        for split in splits:
            split.finalize()
    except BaseException:
        for split in splits:
            split.discard()
        raise
    for split in splits:
        split.commit()
    return splits


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        splits = preprocess(args)
    except InputError as e:
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        return 2
    for split in splits:
        print(f"wrote {split.prefix}.{{bin,idx}}: {split.documents} documents, "
              f"{split.tokens} tokens ({numpy.dtype(split.builder.dtype).name})")
    print(f"tokenized in {time.perf_counter() - start:.1f} s with {args.workers} worker(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
