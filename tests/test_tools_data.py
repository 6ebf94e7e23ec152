"""Tests of tools/train_tokenizer.py and tools/preprocess_data.py.

Documents go through the tokenizer trainer and the preprocessor, then are read back with
megatron-core's ``IndexedDataset`` and ``GPTDataset``; each must come back as exactly
``sp.encode(doc) + [eos]``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import sentencepiece

from _tools import load_tool, train_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
CORPUS = sorted((REPO / "examples" / "data" / "tiny_corpus").glob("*.txt"))

DOCS = [
    "Call me Ishmael. Some years ago, never mind how long precisely, I went to sea.",
    "There now is your insular city of the Manhattoes,\nbelted round by wharves.",
    "Circumambulate the city of a dreamy Sabbath afternoon.",
    "Posted like silent sentinels all around the town stand thousands upon thousands of "
    "mortal men fixed in ocean reveries. Some leaning against the spiles; some seated upon "
    "the pier-heads; some looking over the bulwarks of ships from China.",
    "Whaling voyage by one Ishmael.",
    "Grand Contested Election for the Presidency of the United States.",
    "BLOODY BATTLE IN AFFGHANISTAN.",
    "Though I cannot tell why it was exactly that those stage managers, the Fates, put me "
    "down for this shabby part of a whaling voyage, when others were set down for "
    "magnificent parts in high tragedies, and short and easy parts in genteel comedies.",
]


train_tokenizer = load_tool("train_tokenizer")
preprocess_data = load_tool("preprocess_data")


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> Path:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"), 512, CORPUS)


@pytest.fixture(scope="module")
def sp(tokenizer_model) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))


def _expected(sp, docs):
    return [sp.encode(d) + [sp.eos_id()] for d in docs]


def _write_text(path: Path, docs) -> Path:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def _read(prefix: Path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    assert list(ds.document_indices) == list(range(len(ds) + 1))  # one sequence per document
    return ds, [ds[i].tolist() for i in range(len(ds))]


def _preprocess(tmp_path, tokenizer_model, *extra) -> int:
    return preprocess_data.main(["--tokenizer-model", str(tokenizer_model),
                                 "--output-prefix", str(tmp_path / "out" / "train"), *extra])


# --- tokenizer --------------------------------------------------------------------------


def test_tokenizer_is_llama_style_and_reproducible(tmp_path, tokenizer_model, sp):
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.vocab_size() == 512
    text = "Ahab's 1851 voyage cost £3, ☃ included."
    assert sp.decode(sp.encode(text)) == text  # identity normalizer + byte fallback
    assert train_tiny_tokenizer(tmp_path, 512, CORPUS).read_bytes() == \
        tokenizer_model.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.model", "tokenizer.vocab"]


@pytest.mark.parametrize("case", ["missing", "empty", "vocab"])
def test_tokenizer_errors(tmp_path, capsys, case):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    inputs = {"missing": tmp_path / "nope.txt", "empty": empty, "vocab": CORPUS[0]}[case]
    argv = ["--input", str(inputs), "--output-dir", str(tmp_path / "tok")]
    if case == "vocab":
        argv += ["--vocab-size", "100"]
    assert train_tokenizer.main(argv) == 2
    err = capsys.readouterr().err
    assert ("--vocab-size" if case == "vocab" else "--input") in err
    assert not (tmp_path / "tok" / "tokenizer.model").exists()


# --- preprocessing ----------------------------------------------------------------------


def test_round_trip_through_indexed_and_gpt_dataset(tmp_path, tokenizer_model, sp):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.tokenizers import MegatronTokenizer

    src = _write_text(tmp_path / "docs.txt", DOCS)
    assert _preprocess(tmp_path, tokenizer_model, "--input", str(src)) == 0
    ds, docs = _read(tmp_path / "out" / "train")
    assert ds.index.dtype == numpy.uint16
    expected = _expected(sp, DOCS)
    assert docs == expected

    # megatron's own tokenizer wrapper and GPTDataset, as pretraining builds them
    tokenizer = MegatronTokenizer.from_pretrained(
        tokenizer_path=str(tokenizer_model), metadata_path={"library": "sentencepiece"})
    assert (tokenizer.vocab_size, tokenizer.eod) == (512, sp.eos_id())
    seq = 16
    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=seq, blend=([str(tmp_path / "out" / "train")], None),
        split="100,0,0", tokenizer=tokenizer, path_to_cache=str(tmp_path / "cache"),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False)
    gpt, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [None, None, None], lambda: True, config).build()

    # Undo the sample shuffle, stitch the samples back into one stream (consecutive samples
    # share one token), and compare it with the documents in the dataset's epoch order.
    unshuffled = [None] * len(gpt)
    for idx in range(len(gpt)):
        unshuffled[gpt.shuffle_index[idx]] = gpt[idx]
    stream = [t for s in unshuffled for t in s["tokens"].tolist()]
    stream.append(unshuffled[-1]["labels"][-1].item())
    for s in unshuffled:
        assert s["labels"][:-1].tolist() == s["tokens"][1:].tolist()
    epoch = [t for d in gpt.document_index for t in expected[d]]
    assert sorted(gpt.document_index.tolist()) == list(range(len(DOCS)))
    assert len(stream) == (len(epoch) - 1) // seq * seq + 1  # only the partial tail is dropped
    assert stream == epoch[:len(stream)]


def test_jsonl_with_custom_key_and_doc_per_file(tmp_path, tokenizer_model, sp):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(DOCS[:3]))
                   + "\n", encoding="utf-8")
    whole = tmp_path / "whole.txt"
    _write_text(whole, DOCS[3:5])
    assert _preprocess(tmp_path, tokenizer_model, "--input", str(src), str(whole),
                       "--json-key", "body", "--doc-per-file") == 0
    _, docs = _read(tmp_path / "out" / "train")
    assert docs == _expected(sp, DOCS[:3] + ["\n\n".join(DOCS[3:5])])


def _word_level_tokenizer(directory: Path, words: list[str]) -> None:
    """A Hugging Face tokenizer directory: one id per whitespace-separated word, in order
    (``words[0]`` must be ``<unk>``, ``words[1]`` the EOS ``</s>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>",
                            eos_token="</s>").save_pretrained(directory)


def test_hugging_face_tokenizer_directory(tmp_path):
    _word_level_tokenizer(tmp_path / "hf", ["<unk>", "</s>", "call", "me", "ishmael", "."])
    src = _write_text(tmp_path / "docs.txt", ["call me", "ishmael . whale"])
    assert _preprocess(tmp_path, tmp_path / "hf", "--input", str(src)) == 0
    _, docs = _read(tmp_path / "out" / "train")
    assert docs == [[2, 3, 1], [4, 5, 0, 1]]


def test_vocabulary_over_65500_is_stored_as_int32(tmp_path):
    _word_level_tokenizer(tmp_path / "hf",
                          ["<unk>", "</s>"] + [f"w{i}" for i in range(2, 70000)])
    src = _write_text(tmp_path / "docs.txt", ["w69999 w65535 w2", "w65536 w40000"])
    assert _preprocess(tmp_path, tmp_path / "hf", "--input", str(src)) == 0
    ds, docs = _read(tmp_path / "out" / "train")
    assert ds.index.dtype == numpy.int32  # uint16 would wrap 65536 and 69999
    assert docs == [[69999, 65535, 2, 1], [65536, 40000, 1]]


def test_valid_split_partitions_documents(tmp_path, tokenizer_model, sp):
    src = _write_text(tmp_path / "docs.txt", DOCS)
    assert _preprocess(tmp_path, tokenizer_model, "--input", str(src), "--valid-fraction", "0.25",
                       "--valid-output-prefix", str(tmp_path / "out" / "valid")) == 0
    _, train = _read(tmp_path / "out" / "train")
    _, valid = _read(tmp_path / "out" / "valid")
    expected = _expected(sp, DOCS)
    assert valid == [expected[3], expected[7]]  # floor(8 * 0.25) = 2, spread evenly
    assert train == [d for i, d in enumerate(expected) if i not in (3, 7)]


def test_workers_cli_matches_in_process(tmp_path, tokenizer_model):
    src = _write_text(tmp_path / "docs.txt", DOCS * 20)
    common = ["--input", str(src), "--tokenizer-model", str(tokenizer_model.parent)]
    assert preprocess_data.main(common + ["--output-prefix", str(tmp_path / "one")]) == 0
    run = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), *common,
                          "--output-prefix", str(tmp_path / "two"), "--workers", "2"],
                         check=True, capture_output=True, text=True)
    assert "with 2 worker(s)" in run.stdout
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"two{suffix}").read_bytes() == (tmp_path / f"one{suffix}").read_bytes()


@pytest.mark.parametrize("case, flag", [
    ("no_tokenizer", "--tokenizer-model"),
    ("broken_hf_directory", "--tokenizer-model"),
    ("no_input_file", "--input"),
    ("empty_input", "--input"),
    ("missing_json_key", "--json-key"),
    ("valid_fraction_too_small", "--valid-fraction"),
])
def test_preprocess_errors_name_the_flag(tmp_path, tokenizer_model, capsys, case, flag):
    text = _write_text(tmp_path / "docs.txt", DOCS[:2])
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "a"}) + "\n" +
                                         json.dumps({"body": "b"}) + "\n")
    argv = {
        "no_input_file": ["--input", str(tmp_path / "none.txt")],
        "empty_input": ["--input", str(tmp_path / "empty.txt")],
        "missing_json_key": ["--input", str(tmp_path / "docs.jsonl")],
        "valid_fraction_too_small": ["--input", str(text), "--valid-fraction", "0.1",
                                     "--valid-output-prefix", str(tmp_path / "out" / "valid")],
    }
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer_config.json").write_text('{"tokenizer_class": "Nope"}')
    argv.setdefault(case, ["--input", str(text)])
    tokenizer = {"no_tokenizer": tmp_path / "none",
                 "broken_hf_directory": tmp_path / "broken"}.get(case, tokenizer_model)
    assert _preprocess(tmp_path, tokenizer, *argv[case]) == 2
    err = capsys.readouterr().err
    assert err.startswith("preprocess_data.py: error: ") and flag in err
    leftovers = list((tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    assert leftovers == []  # nothing half-written


def test_bad_valid_fraction_is_a_usage_error(tmp_path, tokenizer_model, capsys):
    with pytest.raises(SystemExit) as exc:
        _preprocess(tmp_path, tokenizer_model, "--input", "x.txt", "--valid-fraction", "1.5",
                    "--valid-output-prefix", "v")
    assert exc.value.code == 2 and "--valid-fraction" in capsys.readouterr().err
