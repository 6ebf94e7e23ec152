"""Offline tests of examples/data/prepare_corpora.py's parsing and splitting (no downloads).

The fetching itself needs the network and is exercised by running the script (docs/data.md).
"""

from __future__ import annotations

import struct
import zlib

from _tools import REPO, load_script

prepare = load_script(REPO / "examples" / "data" / "prepare_corpora.py")


def test_tag_stripping_and_paragraphs():
    assert prepare.untag_chinese("[中国/ns  政府/n]nt  发表/v  １９９８年/t  ３/４/m  ，/w") == \
        "中国政府发表１９９８年３/４，"
    assert prepare.brown_sentence(
        "\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, (/( ok/uh )/) ./.") == \
        'The jury said "no evidence", (ok).'
    assert prepare.unwrap("Call me\nIshmael.\n\n  Some  years \n\n\nago. ") == \
        "Call me Ishmael.\nSome years\nago."


def _r_vector(strings: list[str | None]) -> bytes:
    """A hand-made R XDR serialization (version 3) of a character vector, zlib-compressed."""
    blob = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
    blob += struct.pack(">ii", 16, len(strings))
    for s in strings:
        raw = b"" if s is None else s.encode("utf-8")
        blob += struct.pack(">ii", 0x40009, -1 if s is None else len(raw)) + raw
    return struct.pack(">I", len(blob)) + zlib.compress(blob)


def test_r_lazy_load_database_reader():
    rdb = _r_vector(["CHAPTER I", "", "Emma Woodhouse, handsome—", None]) + _r_vector(["B"])
    assert list(prepare.r_character_vectors(rdb)) == [
        ["CHAPTER I", "", "Emma Woodhouse, handsome—", ""], ["B"]]


def _docs(n: int) -> list:
    return [prepare.Document("t", f"doc {i} " + "x" * (i % 7 * 10)) for i in range(n)]


def test_split_is_deterministic_disjoint_and_bounded():
    docs = _docs(200)
    train, held = prepare.split_documents(docs, "zh/news", 1234, 0, 0.05, 10_000)
    assert len(held) == 10 and len(train) == 190
    assert sorted(d.text for d in train + held) == sorted(d.text for d in docs)  # a partition
    for part in (train, held):  # each written in source order
        assert [docs.index(d) for d in part] == sorted(docs.index(d) for d in part)
    assert prepare.split_documents(docs, "zh/news", 1234, 0, 0.05, 10_000) == (train, held)
    assert prepare.split_documents(docs, "zh/novel", 1234, 0, 0.05, 10_000)[1] != held

    _, small = prepare.split_documents(docs, "zh/news", 1234, 0, 0.05, 60)
    assert 1 <= len(small) < 10 and (len(small) == 1 or sum(len(d.text) for d in small) <= 60)

    train, held = prepare.split_documents(docs, "zh/news", 1234, 3000, 0.05, 10_000)
    kept = sum(len(d.text) for d in train + held)
    assert 3000 <= kept < 3000 + max(len(d.text) for d in docs)  # a prefix up to the cap
