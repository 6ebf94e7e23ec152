"""Tests of tools/extend_vocab.py: merging a Chinese SentencePiece model into a Llama-style one.

The base model is trained here with tools/train_tokenizer.py on English text plus a little
Chinese (so that some Chinese pieces already exist and must not be duplicated); the Chinese
corpus is generated from a fixed word list, so the tests need no network and run in seconds.
Expected values come from the base model, SentencePiece itself, hand counts and transformers.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import sentencepiece
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from _tools import load_tool

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
ENGLISH = sorted((REPO / "examples" / "data" / "tiny_corpus").glob("*.txt"))[:6]
WORDS = ("我们 中国 人民 经济 发展 今天 天气 朋友 工作 学习 北京 上海 城市 公司 市场 技术 "
         "政府 国家 世界 历史 文化 教育 学生 老师 医院 银行 电影 音乐 书店 火车 飞机 问题 "
         "方法 时间 生活 社会 科学 研究 新闻 记者 报道 会议 领导 群众 改革 开放 农村 企业").split()
PUNCT = ("，", "。", "、", "；", "！", "？", "：")
LATIN = ("GDP", "WTO", "APEC", "iPhone")  # Latin words the Chinese model learns, Llama may not
NORMAL = model_pb2.ModelProto.SentencePiece.NORMAL
MIXED = [
    "Call me Ishmael. 我们今天在北京学习中国历史。",
    "The whale, 鲸鱼, swam past 上海 at 10:45 —— twice!",
    "a  b   c\n\n中文\t混合 text  with double  spaces",
    "罕见字龘靐 and emoji 🐳 fall back to bytes.",
    "“引号”与《书名号》，还有全角１２３。",
]


extend_vocab = load_tool("extend_vocab")
train_tokenizer = load_tool("train_tokenizer")
preprocess_data = load_tool("preprocess_data")


def chinese_docs(seed: int, n: int) -> list[str]:
    """``n`` documents of 1-4 sentences, each 3-9 words (a few Latin) with punctuation."""
    rng = random.Random(seed)
    word = lambda: rng.choice(LATIN) if rng.random() < 0.05 else rng.choice(WORDS)
    docs = []
    for _ in range(n):
        sentences = ["".join(word() + (rng.choice(PUNCT[:3]) if rng.random() < 0.3 else "")
                             for _ in range(rng.randint(3, 9)))
                     + rng.choice(PUNCT[1:]) for _ in range(rng.randint(1, 4))]
        docs.append("\n".join(sentences))
    return docs


def write_docs(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def is_han(char: str) -> bool:
    return unicodedata.name(char, "").startswith(("CJK UNIFIED IDEOGRAPH",
                                                  "CJK COMPATIBILITY IDEOGRAPH"))


def is_chinese(piece: str) -> bool:
    """Whether a piece of the test corpus holds a Han character or Chinese punctuation."""
    return any(is_han(c) or c in PUNCT for c in piece)


def load_proto(path: Path):
    proto = model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("extend")
    base_text = root / "base.txt"
    base_text.write_text("".join(p.read_text(encoding="utf-8") for p in ENGLISH)
                         + "\n".join(chinese_docs(7, 40)) + "\n" + "to  be,  or   not\n" * 50,
                         encoding="utf-8")
    base = model_pb2.ModelProto()
    base.ParseFromString(train_tokenizer.train([str(base_text)], 700, 1234))
    # Like Llama-2, park "▁▁" at a sentinel score so that it merges last (its id stays low).
    (double_space,) = [p for p in base.pieces if p.piece == "▁▁"]
    double_space.score = -1e9
    (root / "base").mkdir()
    (root / "base" / "tokenizer.model").write_bytes(base.SerializeToString())
    return {"root": root, "base": root / "base" / "tokenizer.model",
            "zh": write_docs(root / "zh.txt", chinese_docs(1, 600)),
            "heldout": write_docs(root / "heldout.txt", chinese_docs(2, 60))}


@pytest.fixture(scope="module")
def extended(data) -> dict:
    """One run through the command line, exactly as the data pipeline calls it."""
    out = data["root"] / "out"
    result = subprocess.run(
        [sys.executable, str(TOOLS / "extend_vocab.py"), "--base-tokenizer", str(data["base"]),
         "--input", str(data["zh"]), "--heldout", str(data["heldout"]),
         "--output-dir", str(out), "--seed", "3"],
        capture_output=True, text=True, check=True)
    return {"out": out, "stdout": result.stdout,
            "stats": json.loads((out / "extend_stats.json").read_text()),
            "base": load_proto(data["base"]), "merged": load_proto(out / "tokenizer.model"),
            "sp_base": sentencepiece.SentencePieceProcessor(model_file=str(data["base"])),
            "sp": sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))}


def test_output_files_and_report(extended):
    out, stats = extended["out"], extended["stats"]
    assert sorted(p.name for p in out.iterdir()) == sorted(extend_vocab.OUTPUT_FILES)
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".out")) == []
    assert f"added {stats['added']:,} pieces" in extended["stdout"]
    assert f"final vocabulary {stats['final_vocab_size']:,}" in extended["stdout"]
    assert "Chinese characters per token on --heldout" in extended["stdout"]


def test_every_base_piece_keeps_its_id_score_and_type(extended):
    base, merged = extended["base"].pieces, extended["merged"].pieces
    assert len(base) == 700
    for i, piece in enumerate(base):
        assert (merged[i].piece, merged[i].score, merged[i].type) == \
            (piece.piece, piece.score, piece.type), i
    sp_base, sp = extended["sp_base"], extended["sp"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == \
        (sp_base.unk_id(), sp_base.bos_id(), sp_base.eos_id(), sp_base.pad_id())
    assert extended["merged"].normalizer_spec == extended["base"].normalizer_spec


def test_new_pieces_are_appended_unique_chinese_and_ranked_after_the_base(data, extended):
    base, merged, stats = extended["base"], extended["merged"], extended["stats"]
    new = merged.pieces[len(base.pieces):]
    texts = [p.piece for p in merged.pieces]
    assert len(texts) == len(set(texts)) == stats["final_vocab_size"]
    assert len(new) == stats["added"] > 100
    assert all(p.type == NORMAL and is_chinese(p.piece) for p in new)
    base_floor = min(p.score for p in base.pieces if p.type == NORMAL and p.piece != "▁▁")
    scores = [p.score for p in new]
    assert scores == [base_floor - k for k in range(1, len(new) + 1)]

    # The same training run by hand: its Chinese pieces minus the base's, in its order.
    trained = model_pb2.ModelProto()
    trained.ParseFromString(train_tokenizer.train([str(data["zh"])], stats["trained_pieces"], 3))
    base_texts = {p.piece for p in base.pieces}
    normal = [p.piece for p in trained.pieces if p.type == NORMAL]
    assert [p.piece for p in new] == [t for t in normal
                                      if t not in base_texts and is_chinese(t)]
    assert stats["skipped_in_base"] == sum(t in base_texts for t in normal) > 20
    assert stats["skipped_without_cjk"] == sum(t not in base_texts and not is_chinese(t)
                                               for t in normal) > 0
    assert stats["skipped_special_or_byte"] == 259
    assert stats["added"] + stats["skipped_in_base"] + stats["skipped_without_cjk"] \
        + stats["skipped_special_or_byte"] == stats["trained_pieces"]


def test_piece_count_is_capped_for_a_small_corpus(data, extended):
    lines = [line.strip() for line in data["zh"].read_text(encoding="utf-8").splitlines()]
    chars = sum(map(len, lines))
    distinct = len(set("".join(lines)))
    stats = extended["stats"]
    assert stats["requested_pieces"] == 33000
    assert stats["trained_pieces"] == 259 + distinct + chars // 100
    assert "capped from 33,000" in extended["stdout"]
    assert extend_vocab.piece_budget(500, chars, distinct) == (
        500, f"not capped: the corpus supports up to 259 special/byte + {distinct:,} "
             f"characters + {chars:,} // 100 merges = {259 + distinct + chars // 100:,}")


def test_text_without_chinese_tokenizes_exactly_as_before(extended):
    text = "".join(p.read_text(encoding="utf-8") for p in ENGLISH[:2]) + " 1998: £3 ☃ 🐳 —"
    text += " " + " ".join(LATIN) + "".join(LATIN)  # learned from the Chinese text, not added
    assert extended["sp"].encode(text) == extended["sp_base"].encode(text)


def test_round_trip_mixed_text_with_sentencepiece_and_hugging_face(extended):
    from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

    sp, out = extended["sp"], str(extended["out"])
    exact = PreTrainedTokenizerFast.from_pretrained(out)  # tokenizer.json as written
    llama = [AutoTokenizer.from_pretrained(out), LlamaTokenizer.from_pretrained(out)]
    for text in MIXED + [" leading space"]:
        ids = sp.encode(text)
        assert sp.decode(ids) == text
        assert exact.encode(text, add_special_tokens=False) == ids, text
        assert exact.decode(ids) == text
        if not text[0].isspace():  # transformers' Llama class re-adds "▁" only when absent
            for tok in llama:
                assert tok.encode(text) == [sp.bos_id()] + ids, (type(tok), text)
                assert tok.decode(ids) == text
    assert all(len(tok) == sp.vocab_size() and tok.eos_token_id == sp.eos_id()
               for tok in llama + [exact])
    zh_ids = sp.encode("我们今天在北京学习中国历史")
    assert max(zh_ids) >= len(extended["base"].pieces)  # the new pieces are used


def test_chinese_chars_per_token_improves_and_is_reported_right(data, extended):
    docs = data["heldout"].read_text(encoding="utf-8").strip().split("\n\n")
    han = sum(is_han(c) for d in docs for c in d)
    before = sum(len(extended["sp_base"].encode(d)) for d in docs)
    after = sum(len(extended["sp"].encode(d)) for d in docs)
    reported = extended["stats"]["chars_per_token"][str(data["heldout"])]
    assert (reported["docs"], reported["han_chars"]) == (60, han)
    assert (reported["tokens_before"], reported["tokens_after"]) == (before, after)
    assert reported["han_chars_per_token_after"] == round(han / after, 4)
    assert han / after > 1.5 * han / before
    assert reported["hf_tokenizer_matches_sentencepiece_docs"] == 60


def test_extended_tokenizer_feeds_preprocess_data_and_megatron(data, extended, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.tokenizers import MegatronTokenizer

    sp = extended["sp"]
    megatron_tokenizer = MegatronTokenizer.from_pretrained(
        tokenizer_path=str(extended["out"] / "tokenizer.model"),
        metadata_path={"library": "sentencepiece"})
    assert (megatron_tokenizer.vocab_size, megatron_tokenizer.eod) == \
        (extended["stats"]["final_vocab_size"], sp.eos_id())
    for name, tokenizer in (("sp", extended["out"] / "tokenizer.model"), ("hf", extended["out"])):
        assert preprocess_data.main(["--input", str(data["heldout"]), "--tokenizer-model",
                                     str(tokenizer), "--output-prefix", str(tmp_path / name)]) == 0
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"hf{suffix}").read_bytes() == (tmp_path / f"sp{suffix}").read_bytes()
    docs = data["heldout"].read_text(encoding="utf-8").strip().split("\n\n")
    ds = IndexedDataset(str(tmp_path / "sp"))
    assert [ds[i].tolist() for i in range(len(ds))] == [sp.encode(d) + [sp.eos_id()]
                                                        for d in docs]


# --- refusals and atomicity ---------------------------------------------------------------


def _run(data, out: Path, *extra: str, inputs: list[Path] | None = None) -> int:
    argv = ["--base-tokenizer", str(data["base"]), "--output-dir", str(out), "--input",
            *map(str, inputs or [data["zh"]]), *extra]
    return extend_vocab.main(argv)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case, flag", [
    ("out_not_empty", "--force"),
    ("out_holds_input", "--output-dir"),
    ("out_holds_base", "--output-dir"),
    ("missing_base", "--base-tokenizer"),
    ("base_not_sentencepiece", "--base-tokenizer"),
    ("base_not_bpe", "--base-tokenizer"),
    ("missing_input", "--input"),
    ("empty_input", "--input"),
    ("missing_heldout", "--heldout"),
    ("vocab_too_small", "--vocab-size"),
])
def test_refusals_name_the_flag_and_touch_nothing(data, tmp_path, capsys, case, flag):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    inside = out / "zh.txt"
    inside.write_bytes(data["zh"].read_bytes())
    extra: list[str] = []
    inputs = None
    if case == "out_holds_input":
        inputs, extra = [inside], ["--force"]
    elif case == "out_holds_base":
        (out / "tokenizer.model").write_bytes(data["base"].read_bytes())
        data, extra = {**data, "base": out / "tokenizer.model"}, ["--force"]
    elif case in ("missing_base", "base_not_sentencepiece", "base_not_bpe"):
        bad = tmp_path / "bad.model"
        if case == "base_not_sentencepiece":
            bad.write_bytes(b"not a model")
        elif case == "base_not_bpe":
            sentencepiece.SentencePieceTrainer.train(
                input=str(data["zh"]), model_prefix=str(tmp_path / "bad"), model_type="unigram",
                vocab_size=300, minloglevel=2)
        data = {**data, "base": bad}
        extra = ["--force"]
    elif case == "missing_input":
        inputs, extra = [tmp_path / "none.txt"], ["--force"]
    elif case == "empty_input":
        (tmp_path / "empty.txt").write_text("\n  \n")
        inputs, extra = [tmp_path / "empty.txt"], ["--force"]
    elif case == "missing_heldout":
        extra = ["--heldout", str(tmp_path / "none.txt"), "--force"]
    elif case == "vocab_too_small":
        extra = ["--vocab-size", "100", "--force"]
    before = _snapshot(out)
    assert _run(data, out, *extra, inputs=inputs) == 2
    err = capsys.readouterr().err
    assert err.startswith("extend_vocab.py: error: ") and flag in err, err
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("crash_at", ["building", "renaming"])
def test_force_replaces_the_directory_and_a_failed_run_keeps_the_old_one(data, tmp_path,
                                                                         monkeypatch, crash_at):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert _run(data, out, "--vocab-size", "400", "--force") == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(extend_vocab.OUTPUT_FILES)
    assert json.loads((out / "extend_stats.json").read_text())["cap"].startswith("not capped")
    good = _snapshot(out)

    real_replace = extend_vocab.os.replace

    def crash(*args):
        if crash_at == "building" or Path(args[0]).name.startswith(".out.tmp-"):
            raise RuntimeError("disk full")
        return real_replace(*args)

    if crash_at == "building":
        monkeypatch.setattr(extend_vocab, "hf_config_files", crash)
    else:  # the new directory is complete, the old one already moved aside
        monkeypatch.setattr(extend_vocab.os, "replace", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        _run(data, out, "--force")
    assert _snapshot(out) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind
