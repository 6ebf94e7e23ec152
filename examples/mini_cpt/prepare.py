#!/usr/bin/env python3
"""Stage 0 of the mini CPT study (CPU): tokenizers, tokenized training data, held-out text.

Reads the corpora of ``examples/data/prepare_corpora.py`` and writes everything the GPU
stages need into one directory (``data/mini_cpt`` by default, carried to the GPU machine):

==================================  =========================================================
``tokenizer/base/tokenizer.model``  the base tokenizer (Llama-2's), copied
``tokenizer/extended/``             the base + Chinese pieces (``tools/extend_vocab.py``
                                    trained on the Chinese training text)
``en_train_text_document.*``        English training text, base tokenizer (stage 1)
``zh_train_text_document.*``        Chinese training text of all domains, extended
                                    tokenizer (stage 3)
``heldout/{news,...,en}.txt``       held-out documents per domain (stage 4)
``prepare.json``                    what was done: sizes, token counts, settings
==================================  =========================================================

Training text beyond the profile's token cap (``max_en_tokens``, ``max_zh_tokens``) is
subsampled by whole documents spread evenly over the file (the cap keeps the directory
under the 64 MiB the GPU machine can receive). The directory is built beside its final
place and renamed into it; an existing one is replaced only with ``--force``.

    python examples/mini_cpt/prepare.py                      # data/corpora -> data/mini_cpt
    MINI_CPT_TOY=1 python examples/mini_cpt/prepare.py --corpora C --output-dir D
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from settings import REPO, ZH_DOMAINS, Profile, profile

sys.path.insert(0, str(REPO / "tools"))
import extend_vocab  # noqa: E402
import preprocess_data  # noqa: E402

PROG = "prepare.py"
MAX_DIR_MIB = 55  # the carry limit is 64 MiB, with the 2.4 MB megatron-core wheel
RATIO_SAMPLE_STRIDE = 20  # chars/token is measured on every 20th document


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpora", type=Path, default=REPO / "data" / "corpora",
                        help="Output of examples/data/prepare_corpora.py (default: data/corpora).")
    parser.add_argument("--base-tokenizer", type=Path, default=None,
                        help="Default: CORPORA/tokenizer/llama2/tokenizer.model.")
    parser.add_argument("--output-dir", type=Path, default=REPO / "data" / "mini_cpt")
    parser.add_argument("--seed", type=int, default=1234, help="Seed of the Chinese tokenizer.")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="Tokenizer processes.")
    parser.add_argument("--force", action="store_true", help="Replace --output-dir.")
    args = parser.parse_args(argv)
    if args.base_tokenizer is None:
        args.base_tokenizer = args.corpora / "tokenizer" / "llama2" / "tokenizer.model"
    return args


def input_files(corpora: Path) -> dict[str, Path]:
    files = {"en_train": corpora / "en" / "train.txt", "en_heldout": corpora / "en" / "heldout.txt"}
    for d in ZH_DOMAINS:
        files[f"zh_train_{d}"] = corpora / "zh" / "train" / f"{d}.txt"
        files[f"zh_heldout_{d}"] = corpora / "zh" / "heldout" / f"{d}.txt"
    return files


def documents(paths: list[Path]) -> list[str]:
    return list(preprocess_data.iter_documents([str(p) for p in paths], "text", False))


def subsample(docs: list[str], max_tokens: int, tokenizer: preprocess_data.Tokenizer
              ) -> tuple[list[str], float]:
    """Whole documents, evenly spread, whose estimated token count is at most ``max_tokens``.

    Returns the kept documents and the fraction kept. Characters per token are measured
    on every ``RATIO_SAMPLE_STRIDE``-th document.
    """
    sample = docs[::RATIO_SAMPLE_STRIDE]
    chars_per_token = sum(map(len, sample)) / sum(len(tokenizer.encode(d)[1]) for d in sample)
    fraction = max_tokens * chars_per_token / sum(map(len, docs))
    if fraction >= 1.0:
        return docs, 1.0
    # preprocess_data's evenly spread selection: floor(N * fraction) of N documents
    kept = [d for i, d in enumerate(docs) if preprocess_data.is_valid_document(i, fraction)]
    return kept, fraction


def write_docs(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")


def tokenize(text_file: Path, tokenizer: Path, prefix: Path, workers: int) -> dict:
    (split,) = preprocess_data.preprocess(preprocess_data.parse_args(
        ["--input", str(text_file), "--tokenizer-model", str(tokenizer),
         "--output-prefix", str(prefix), "--workers", str(workers)]))
    text_file.unlink()
    return {"documents": split.documents, "tokens": split.tokens}


def heldout(paths: list[Path], max_chars: int) -> list[str]:
    """The first documents of ``paths`` up to ``max_chars`` characters (at least one)."""
    kept, chars = [], 0
    for doc in documents(paths):
        if kept and chars + len(doc) > max_chars:
            break
        kept.append(doc)
        chars += len(doc)
    return kept


def build(args: argparse.Namespace, prof: Profile, out: Path) -> dict:
    """Write every output into ``out``; return the record for prepare.json."""
    files = input_files(args.corpora)
    base_tok = out / "tokenizer" / "base" / "tokenizer.model"
    base_tok.parent.mkdir(parents=True)
    shutil.copyfile(args.base_tokenizer, base_tok)
    ext_dir = out / "tokenizer" / "extended"
    zh_train = [files[f"zh_train_{d}"] for d in ZH_DOMAINS]
    zh_heldout = [files[f"zh_heldout_{d}"] for d in ZH_DOMAINS]
    if extend_vocab.main(["--base-tokenizer", str(base_tok), "--input", *map(str, zh_train),
                          "--heldout", *map(str, zh_heldout), "--output-dir", str(ext_dir),
                          "--vocab-size", str(prof.zh_pieces), "--seed", str(args.seed)]):
        raise preprocess_data.InputError("tools/extend_vocab.py failed (see above)")
    ext_tok = ext_dir / "tokenizer.model"
    record: dict = {"profile": prof.name, "corpora": str(args.corpora),
                    "base_tokenizer": str(args.base_tokenizer),
                    "extend_stats": json.loads((ext_dir / "extend_stats.json").read_text())}
    for lang, paths, tok, cap in (("en", [files["en_train"]], base_tok, prof.max_en_tokens),
                                  ("zh", zh_train, ext_tok, prof.max_zh_tokens)):
        docs = documents(paths)
        kept, fraction = subsample(docs, cap, preprocess_data.Tokenizer(tok))
        text = out / f"{lang}_train.txt"
        write_docs(text, kept)
        record[f"{lang}_train"] = {
            "tokenizer": str(tok.relative_to(out)), "source_documents": len(docs),
            "kept_fraction": round(fraction, 4),
            **tokenize(text, tok, out / f"{lang}_train_text_document", args.workers)}
        print(f"{lang} train: {record[f'{lang}_train']}", flush=True)
    record["heldout"] = {}
    for name in (*ZH_DOMAINS, "en"):
        source = files[f"zh_heldout_{name}" if name != "en" else "en_heldout"]
        docs = heldout([source], prof.max_heldout_chars)
        write_docs(out / "heldout" / f"{name}.txt", docs)
        record["heldout"][name] = {"documents": len(docs), "chars": sum(map(len, docs))}
    return record


def directory_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prof = profile()
    out = args.output_dir
    try:
        missing = [str(p) for p in [args.base_tokenizer, *input_files(args.corpora).values()]
                   if not p.is_file()]
        if missing:
            raise preprocess_data.InputError(
                f"--corpora/--base-tokenizer: missing {', '.join(missing)}; run "
                "examples/data/prepare_corpora.py first")
        if out.exists() and any(out.iterdir()) and not args.force:
            raise preprocess_data.InputError(
                f"--output-dir {out} is not empty; pass --force to replace it")
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            record = build(args, prof, tmp)
            record["mib"] = round(directory_mib(tmp), 2)
            record["seconds"] = round(time.perf_counter() - start, 1)
            if record["mib"] > MAX_DIR_MIB:
                raise preprocess_data.InputError(
                    f"the output would be {record['mib']} MiB, over {MAX_DIR_MIB} MiB; lower "
                    "max_en_tokens / max_zh_tokens in examples/mini_cpt/settings.py")
            (tmp / "prepare.json").write_text(json.dumps(record, indent=1, ensure_ascii=False)
                                              + "\n", encoding="utf-8")
            tmp.chmod(0o755)
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            if out.exists():
                os.replace(out, old)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(out.with_name(f".{out.name}.old-{os.getpid()}"), ignore_errors=True)
    except preprocess_data.InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({record['mib']} MiB in {record['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
