"""Tests of tools/evaluate_ppl.py against references computed independently.

A tiny random Hugging Face Llama and a tiny SentencePiece tokenizer are built here. The
reference perplexity encodes the documents with SentencePiece directly, cuts the windows
by hand and takes transformers' own shifted loss (``labels=``) per window.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import sentencepiece
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from _tools import load_tool, train_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
CORPUS = sorted((REPO / "examples" / "data" / "tiny_corpus").glob("*.txt"))[:3]
VOCAB = 400
DOCS = [
    "Call me Ishmael. Some years ago, never mind how long precisely, I went to sea.",
    "There now is your insular city of the Manhattoes,\nbelted round by wharves.",
    "Circumambulate the city of a dreamy Sabbath afternoon.",
    "Whaling voyage by one Ishmael.",
]


evaluate_ppl = load_tool("evaluate_ppl")


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> Path:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"), VOCAB, CORPUS)


def _llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default init, so the logits are far from flat
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else None
    return model.eval()


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf")
    _llama(VOCAB).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    return path


def _run(tmp_path: Path, *args: str) -> tuple[int, dict | None]:
    out = tmp_path / "ppl.json"
    code = evaluate_ppl.main([*args, "--json", str(out), "--device", "cpu", "--dtype", "fp32"])
    return code, json.loads(out.read_text()) if out.exists() else None


def _reference_ppl(model_dir: Path, tokenizer_model: Path, seq_length: int):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    stream = [t for doc in DOCS for t in sp.encode(doc) + [sp.eos_id()]]
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    total, count, windows = 0.0, 0, 0
    for start in range(0, len(stream) - 1, seq_length):
        ids = torch.tensor([stream[start:start + seq_length + 1]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()  # mean over len - 1 tokens
        total += loss * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
        windows += 1
    return math.exp(total / count), len(stream), windows


@pytest.mark.parametrize("seq_length", [16, 48])
def test_ppl_is_exp_of_mean_token_cross_entropy(tmp_path, hf_model, tokenizer_model,
                                                text_file, seq_length):
    code, report = _run(tmp_path, "--model", str(hf_model), "--tokenizer-model",
                        str(tokenizer_model), "--input", str(text_file),
                        "--seq-length", str(seq_length), "--batch-size", "3")
    assert code == 0
    ppl, n, windows = _reference_ppl(hf_model, tokenizer_model, seq_length)
    (result,) = report["results"]
    assert n > 3 * seq_length // 2  # several windows, the last one shorter
    assert (n - 1) % seq_length
    assert result["tokens"] == n - 1
    assert result["windows"] == windows == math.ceil((n - 1) / seq_length)
    assert result["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert ppl > 50  # random weights: far from trivial, so the comparison means something
    assert report["seq_length"] == seq_length and report["dtype"] == "float32"


def test_flat_logits_give_the_vocabulary_size(tmp_path, tokenizer_model, text_file):
    model = _llama(VOCAB)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits all 0: uniform over the vocabulary
    model.save_pretrained(tmp_path / "flat")
    code, report = _run(tmp_path, "--model", str(tmp_path / "flat"), "--tokenizer-model",
                        str(tokenizer_model), "--input", str(text_file), str(text_file))
    assert code == 0
    assert [r["ppl"] for r in report["results"]] == [pytest.approx(VOCAB, rel=1e-5)] * 2


def test_megatron_padded_vocabulary_is_accepted(tmp_path, tokenizer_model, text_file):
    _llama(512).save_pretrained(tmp_path / "padded")  # ceil(400 / 128) * 128
    code, report = _run(tmp_path, "--model", str(tmp_path / "padded"), "--tokenizer-model",
                        str(tokenizer_model), "--input", str(text_file))
    assert code == 0 and math.isfinite(report["results"][0]["ppl"])


@pytest.mark.parametrize("case,message", [
    ("missing-input", "--input: no such file:"),
    ("missing-model", "--model: no such directory:"),
    ("not-a-model", "is neither a Hugging Face model directory"),
    ("vocab-mismatch", "has 400 pieces but the model's embedding has 420 rows"),
    ("bad-tokenizer", "--tokenizer-model: no such tokenizer file or directory"),
])
def test_bad_input_fails_naming_the_flag_and_writes_nothing(tmp_path, capsys, hf_model,
                                                            tokenizer_model, text_file,
                                                            case, message):
    model, tokenizer, inputs = hf_model, tokenizer_model, [str(text_file)]
    if case == "missing-input":
        inputs.append(str(tmp_path / "nope.txt"))
    elif case == "missing-model":
        model = tmp_path / "nope"
    elif case == "not-a-model":
        model = tmp_path
    elif case == "vocab-mismatch":
        model = tmp_path / "other"
        _llama(420).save_pretrained(model)
    else:
        tokenizer = tmp_path / "nope.model"
    code, report = _run(tmp_path, "--model", str(model), "--tokenizer-model", str(tokenizer),
                        "--input", *inputs)
    assert code == 2 and report is None
    assert message in capsys.readouterr().err


def test_prints_a_table(capsys, hf_model, tokenizer_model, text_file):
    assert evaluate_ppl.main(["--model", str(hf_model), "--tokenizer-model", str(tokenizer_model),
                              "--input", str(text_file), "--seq-length", "16",
                              "--device", "cpu"]) == 0
    ppl, n, windows = _reference_ppl(hf_model, tokenizer_model, 16)
    header, row = capsys.readouterr().out.splitlines()[1:3]
    assert header.split() == ["file", "tokens", "windows", "nll/token", "ppl"]
    assert row.split()[:3] == [str(text_file), str(n - 1), str(windows)]
    assert float(row.split()[4]) == pytest.approx(ppl, abs=1e-3)


def test_megatron_checkpoint_gives_the_same_ppl_as_the_hf_model(tmp_path, hf_model,
                                                                 tokenizer_model, text_file):
    from megatron_sat import convert
    convert.hf_to_megatron(hf_model, tmp_path / "megatron")  # vocabulary padded to 512 rows
    assert (tmp_path / "megatron" / "latest_checkpointed_iteration.txt").is_file()
    args = ["--tokenizer-model", str(tokenizer_model), "--input", str(text_file),
            "--seq-length", "16"]
    code, from_megatron = _run(tmp_path, "--model", str(tmp_path / "megatron"), *args)
    assert code == 0
    code, from_hf = _run(tmp_path, "--model", str(hf_model), *args)
    assert code == 0
    assert from_megatron["results"][0]["ppl"] == pytest.approx(from_hf["results"][0]["ppl"],
                                                               rel=1e-6)


@pytest.mark.parametrize("pieces,message", [
    (600, "has 600 pieces but the model's embedding has 512 rows"),  # pads to 640, not 512
    (450, "has 450 pieces but"),  # pads to 512 like 400: megatron_sat.convert refuses it
])
def test_megatron_checkpoint_with_the_wrong_tokenizer_fails(tmp_path, capsys, hf_model,
                                                            text_file, pieces, message):
    from megatron_sat import convert
    convert.hf_to_megatron(hf_model, tmp_path / "megatron")
    other = train_tiny_tokenizer(tmp_path / "other", pieces, CORPUS)
    code, report = _run(tmp_path, "--model", str(tmp_path / "megatron"), "--tokenizer-model",
                        str(other), "--input", str(text_file))
    assert code == 2 and report is None
    err = capsys.readouterr().err
    assert "--tokenizer-model" in err and message in err, err
