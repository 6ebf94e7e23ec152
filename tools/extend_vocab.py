#!/usr/bin/env python3
"""Extend a Llama SentencePiece tokenizer with pieces learned from Chinese text.

Following Chinese-LLaMA (the SAT paper adds about 33,000 Chinese tokens to TinyLlama), this
trains a SentencePiece BPE model on the ``--input`` corpora with ``tools/train_tokenizer.py``'s
settings (identity normalization, byte fallback, split digits: Llama's own) and appends its
pieces to the ``--base-tokenizer`` model:

* every base piece keeps its id, string, score and type, so old token ids stay valid;
* a trained piece is appended only if it is a normal piece, not already in the base, and
  contains a CJK character (Han, CJK punctuation or a full-width form). Text without such
  characters therefore tokenizes exactly as with the base model, and no piece repeats;
* appended pieces keep their trained order and get scores below every base score (the
  lowest base score minus 1, 2, ...), so SentencePiece's BPE applies all base merges first.
  Sentinel scores at or below -1e6 are ignored for that floor: Llama-2 parks ``▁▁`` at
  -1e9 so that it merges last, and it keeps that place.

The requested ``--vocab-size`` (pieces of the Chinese model; the paper's 33,000 by default)
is capped for small corpora at ``259 + distinct characters + characters // 100``: the special
and byte pieces, one piece per character, and one merge per 100 characters of text. Beyond
that SentencePiece's BPE keeps going with merges seen once, which only waste embedding rows.

``--output-dir`` receives ``tokenizer.model``, Hugging Face files (``tokenizer.json`` with
SentencePiece's exact normalization and score-ordered merges, ``tokenizer_config.json`` for
``LlamaTokenizer``, ``special_tokens_map.json``) and ``extend_stats.json``. Everything is
written into a temporary directory beside it and renamed into place; an existing non-empty
directory is replaced only with ``--force``, and never if it contains one of the inputs.

Example::

    python tools/extend_vocab.py --base-tokenizer data/corpora/tokenizer/llama2/tokenizer.model \\
        --input data/corpora/zh/train/*.txt --heldout data/corpora/zh/heldout/*.txt \\
        --output-dir data/tokenizer-zh
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import preprocess_data  # noqa: E402  (sibling tool: its document reader)
import train_tokenizer  # noqa: E402  (sibling tool: Llama-style SentencePiece training)

SPECIAL_AND_BYTE_PIECES = 259  # <unk>, <s>, </s> and 256 byte pieces of the trained model
CHARS_PER_MERGE = 100
SENTINEL_SCORE = -1e6
HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
HAN_CHAR = re.compile(f"[{HAN}]")
CJK_CHAR = re.compile(f"[{HAN}\u3000-\u303f\uff00-\uffef]")
OUTPUT_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "extend_stats.json")


class InputError(Exception):
    """A problem with the command line or the inputs; reported with exit status 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-tokenizer", required=True, type=Path, metavar="MODEL",
                        help="The base SentencePiece BPE tokenizer.model (e.g. Llama-2's).")
    parser.add_argument("--input", nargs="+", required=True, type=Path, metavar="FILE",
                        help="Chinese UTF-8 text files; every non-empty line is a sentence.")
    parser.add_argument("--output-dir", required=True, type=Path, metavar="OUT")
    parser.add_argument("--vocab-size", type=int, default=33000,
                        help="Pieces of the Chinese model before merging (default: 33000, "
                             "the paper's; capped for small corpora, see above).")
    parser.add_argument("--heldout", nargs="+", type=Path, default=[], metavar="FILE",
                        help="Held-out text (blank-line-separated documents) on which Chinese "
                             "characters per token are measured; default: the --input text.")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--force", action="store_true",
                        help="Replace a non-empty --output-dir.")
    return parser.parse_args(argv)


# --- checks -------------------------------------------------------------------------------


def check_paths(args: argparse.Namespace) -> None:
    """Refuse missing inputs and an output directory that is occupied or holds an input."""
    for flag, paths in (("--base-tokenizer", [args.base_tokenizer]), ("--input", args.input),
                        ("--heldout", args.heldout)):
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise InputError(f"{flag}: no such file: {', '.join(missing)}")
    out = args.output_dir.resolve()
    for path in [args.base_tokenizer, *args.input, *args.heldout]:
        if out == path.resolve() or out in path.resolve().parents:
            raise InputError(f"--output-dir {args.output_dir} contains the input {path}; "
                             f"choose a directory that holds none of the inputs")
    if out.exists() and not out.is_dir():
        raise InputError(f"--output-dir {args.output_dir} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise InputError(f"--output-dir {args.output_dir} is not empty; pass --force to "
                         f"replace it")


def load_base(path: Path):
    """The base model's protobuf; it must be a SentencePiece BPE model."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError as e:
        raise InputError(f"--base-tokenizer: {path} is not a SentencePiece model ({e})") from None
    if not proto.pieces:
        raise InputError(f"--base-tokenizer: {path} is not a SentencePiece model (no pieces)")
    if proto.trainer_spec.model_type != model_pb2.TrainerSpec.BPE:
        kind = model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        raise InputError(f"--base-tokenizer: {path} is a {kind} model; extend_vocab.py "
                         f"extends BPE models such as Llama's")
    return proto


# --- training -----------------------------------------------------------------------------


def piece_budget(requested: int, chars: int, distinct: int) -> tuple[int, str]:
    """Pieces to train for a corpus of ``chars`` characters, ``distinct`` of them different."""
    cap = SPECIAL_AND_BYTE_PIECES + distinct + chars // CHARS_PER_MERGE
    formula = (f"{SPECIAL_AND_BYTE_PIECES} special/byte + {distinct:,} characters + "
               f"{chars:,} // {CHARS_PER_MERGE} merges = {cap:,}")
    if requested <= cap:
        return requested, f"not capped: the corpus supports up to {formula}"
    return cap, (f"capped from {requested:,}: the corpus supports only {formula} "
                 f"(one merge per {CHARS_PER_MERGE} characters of text)")


def train_chinese(paths: list[Path], requested: int, seed: int) -> tuple[bytes, dict]:
    """Train the Chinese SentencePiece model; return it and what was done."""
    chars, seen = 0, set()
    for line in train_tokenizer.read_sentences([str(p) for p in paths]):
        chars += len(line)
        seen.update(line)
    if chars == 0:
        raise InputError("--input: the files contain no text")
    size, reason = piece_budget(requested, chars, len(seen))
    try:
        model = train_tokenizer.train([str(p) for p in paths], size, seed)
    except RuntimeError as e:
        raise InputError(f"--vocab-size {requested} (training {size} pieces): {e}") from None
    return model, {"train_chars": chars, "train_distinct_chars": len(seen),
                   "requested_pieces": requested, "trained_pieces": size, "cap": reason}


# --- merging ------------------------------------------------------------------------------


def merge(base, chinese: bytes):
    """Append the new Chinese pieces of ``chinese`` to a copy of ``base``; see module doc."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    normal = model_pb2.ModelProto.SentencePiece.NORMAL
    trained = model_pb2.ModelProto()
    trained.ParseFromString(chinese)
    merged = model_pb2.ModelProto()
    merged.CopyFrom(base)
    known = {p.piece for p in base.pieces}
    scores = [p.score for p in base.pieces if p.type == normal and p.score > SENTINEL_SCORE]
    next_score = min(scores, default=0.0) - 1.0
    counts = {"added": 0, "skipped_special_or_byte": 0, "skipped_in_base": 0,
              "skipped_without_cjk": 0}
    for piece in trained.pieces:
        if piece.type != normal:
            counts["skipped_special_or_byte"] += 1
        elif piece.piece in known:
            counts["skipped_in_base"] += 1
        elif not CJK_CHAR.search(piece.piece):
            counts["skipped_without_cjk"] += 1
        else:
            merged.pieces.add(piece=piece.piece, score=next_score, type=normal)
            known.add(piece.piece)
            next_score -= 1.0
            counts["added"] += 1
    merged.trainer_spec.vocab_size = len(merged.pieces)
    return merged, counts


# --- Hugging Face files -------------------------------------------------------------------


def hf_backend(proto):
    """A ``tokenizers`` BPE equivalent to the SentencePiece model ``proto``.

    Merges are ordered by the score of the piece they make (SentencePiece's priority, not the
    id order transformers' converter assumes); the normalizer prepends ``▁`` and escapes
    spaces exactly as SentencePiece does, so ids match ``sp.encode`` for any text.
    """
    from sentencepiece import sentencepiece_model_pb2 as model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    kinds = model_pb2.ModelProto.SentencePiece
    pieces = proto.pieces
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    parts = {p.piece for p in pieces if p.type in (kinds.NORMAL, kinds.USER_DEFINED)}
    merges = []
    for i in sorted((i for i, p in enumerate(pieces) if p.type == kinds.NORMAL),
                    key=lambda i: (-pieces[i].score, i)):
        text = pieces[i].piece
        splits = [(text[:k], text[k:]) for k in range(1, len(text))
                  if text[:k] in parts and text[k:] in parts]
        merges += sorted(splits, key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    spec = proto.trainer_spec
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=spec.unk_piece,
                                   fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Replace(" ", "▁")]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    backend.normalizer = normalizers.Sequence(steps)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if proto.normalizer_spec.add_dummy_prefix else []))
    bos = spec.bos_piece
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, spec.bos_id)])
    backend.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                                for p in pieces if p.type in (kinds.CONTROL, kinds.UNKNOWN)])
    return backend


def hf_config_files(proto) -> dict[str, bytes]:
    """``tokenizer_config.json`` and ``special_tokens_map.json`` for ``LlamaTokenizer``."""
    spec = proto.trainer_spec
    special = {"bos_token": spec.bos_piece, "eos_token": spec.eos_piece,
               "unk_token": spec.unk_piece}
    config = {"tokenizer_class": "LlamaTokenizer", **special, "pad_token": None,
              "add_bos_token": True, "add_eos_token": False, "legacy": True,
              "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30}
    dump = lambda d: (json.dumps(d, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return {"tokenizer_config.json": dump(config), "special_tokens_map.json": dump(special)}


# --- statistics ---------------------------------------------------------------------------


def chars_per_token(paths: list[Path], base, merged, backend) -> dict:
    """Han characters per token before and after, per file, over blank-line documents."""
    import sentencepiece

    before = sentencepiece.SentencePieceProcessor(model_proto=base.SerializeToString())
    after = sentencepiece.SentencePieceProcessor(model_proto=merged.SerializeToString())
    result = {}
    for path in paths + [None]:
        files = [str(p) for p in paths] if path is None else [str(path)]
        docs = list(preprocess_data.iter_documents(files, "text", doc_per_file=False))
        han = sum(len(HAN_CHAR.findall(d)) for d in docs)
        old = sum(map(len, before.encode(docs)))
        new_ids = after.encode(docs)
        new = sum(map(len, new_ids))
        hf_same = sum(e.ids == ids for e, ids in zip(
            backend.encode_batch(docs, add_special_tokens=False), new_ids))
        result["all" if path is None else str(path)] = {
            "docs": len(docs), "han_chars": han, "tokens_before": old, "tokens_after": new,
            "han_chars_per_token_before": round(han / max(old, 1), 4),
            "han_chars_per_token_after": round(han / max(new, 1), 4),
            "hf_tokenizer_matches_sentencepiece_docs": hf_same}
    return result


# --- writing ------------------------------------------------------------------------------


def write_output_dir(out: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into a temporary sibling of ``out``, then swap it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        for name, content in files.items():
            (tmp / name).write_bytes(content)
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old.exists():
                os.replace(old, out)  # put the previous directory back
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def extend(args: argparse.Namespace) -> dict:
    """Train, merge, measure and write; return the statistics."""
    start = time.perf_counter()
    check_paths(args)
    base = load_base(args.base_tokenizer)
    chinese, stats = train_chinese(args.input, args.vocab_size, args.seed)
    print(f"trained {stats['trained_pieces']:,} Chinese pieces on {stats['train_chars']:,} "
          f"characters ({stats['cap']})", flush=True)
    merged, counts = merge(base, chinese)
    backend = hf_backend(merged)
    heldout = args.heldout or args.input
    stats.update(base_vocab_size=len(base.pieces), **counts, final_vocab_size=len(merged.pieces),
                 heldout_source="--heldout" if args.heldout else "--input (no --heldout given)",
                 chars_per_token=chars_per_token(heldout, base, merged, backend),
                 seconds=round(time.perf_counter() - start, 1))
    files = {"tokenizer.model": merged.SerializeToString(),
             "tokenizer.json": backend.to_str().encode("utf-8"), **hf_config_files(merged),
             "extend_stats.json": (json.dumps(stats, indent=2) + "\n").encode("utf-8")}
    write_output_dir(args.output_dir, files)
    return stats


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        stats = extend(args)
    except InputError as e:
        print(f"extend_vocab.py: error: {e}", file=sys.stderr)
        return 2
    print(f"added {stats['added']:,} pieces to the base's {stats['base_vocab_size']:,}: final "
          f"vocabulary {stats['final_vocab_size']:,} (skipped {stats['skipped_in_base']:,} "
          f"already in the base, {stats['skipped_without_cjk']:,} without CJK characters, "
          f"{stats['skipped_special_or_byte']:,} special/byte)")
    print(f"Chinese characters per token on {stats['heldout_source']}:")
    for name, s in stats["chars_per_token"].items():
        print(f"  {name}: {s['han_chars_per_token_before']:.3f} -> "
              f"{s['han_chars_per_token_after']:.3f} ({s['han_chars']:,} characters, "
              f"{s['tokens_before']:,} -> {s['tokens_after']:,} tokens)")
    print(f"wrote {args.output_dir}/{{{','.join(OUTPUT_FILES)}}} in {stats['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
