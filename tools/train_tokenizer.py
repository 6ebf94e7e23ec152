#!/usr/bin/env python3
"""Train a small Llama-style SentencePiece BPE tokenizer on plain-text files.

The model uses unk/bos/eos = 0/1/2 (no pad piece), byte fallback, split digits and the
identity normalizer, so decoding returns the input text. Training is single-threaded and
seeded, so the same input files and flags give a byte-identical model.

Writes ``tokenizer.model`` and ``tokenizer.vocab`` into ``--output-dir``; both are first
written to a temporary directory next to them and then renamed into place, so an
interrupted run never leaves a half-written model behind.

Example::

    python tools/train_tokenizer.py --input examples/data/tiny_corpus/*.txt \\
        --output-dir data/demo --vocab-size 3000
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import sentencepiece as spm

MODEL_NAME = "tokenizer.model"
VOCAB_NAME = "tokenizer.vocab"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="UTF-8 text files; every non-empty line is one training sentence.")
    parser.add_argument("--output-dir", required=True, type=Path,
                        help=f"Directory that receives {MODEL_NAME} and {VOCAB_NAME}.")
    parser.add_argument("--vocab-size", type=int, default=3000,
                        help="Number of pieces, including the 3 special and 256 byte pieces.")
    parser.add_argument("--seed", type=int, default=1234,
                        help="Seed of SentencePiece's random generator.")
    return parser.parse_args(argv)


def read_sentences(paths: list[str]) -> Iterator[str]:
    """Yield the non-empty lines of ``paths``, in order."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    yield line


def check_inputs(paths: list[str]) -> str | None:
    """Return an error message for unusable ``--input`` files, or None if they are fine."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        return f"--input: no such file: {', '.join(missing)}"
    if next(read_sentences(paths), None) is None:
        return "--input: the files contain no text"
    return None


def train(paths: list[str], vocab_size: int, seed: int) -> bytes:
    """Train the tokenizer on ``paths`` and return the serialized model."""
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=read_sentences(paths),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        character_coverage=0.99995,
        max_sentence_length=1 << 16,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2,
    )
    return model.getvalue()


def vocab_text(model: bytes) -> str:
    """The ``piece<TAB>score`` listing SentencePiece writes next to a model."""
    sp = spm.SentencePieceProcessor(model_proto=model)
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))


def write_atomically(output_dir: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` (name -> content) into ``output_dir`` via a temporary directory."""
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=output_dir))
    try:
        for name, content in files.items():
            (tmp / name).write_bytes(content)
        for name in files:
            os.replace(tmp / name, output_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    error = check_inputs(args.input)
    if error:
        print(f"train_tokenizer.py: error: {error}", file=sys.stderr)
        return 2
    try:
        model = train(args.input, args.vocab_size, args.seed)
    except RuntimeError as e:  # a vocabulary too small for the characters, or too large
        print(f"train_tokenizer.py: error: --vocab-size {args.vocab_size}: {e}", file=sys.stderr)
        return 2
    write_atomically(args.output_dir, {MODEL_NAME: model,
                                       VOCAB_NAME: vocab_text(model).encode("utf-8")})
    print(f"wrote {args.output_dir / MODEL_NAME} ({args.vocab_size} pieces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
