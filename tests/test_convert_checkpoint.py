"""Tests of megatron_sat/convert.py and tools/convert_checkpoint.py.

Small random Llamas (MHA and GQA, tied and untied, non-default RoPE base, one with Llama-3
RoPE scaling) are built and saved with transformers and converted at TP=1, TP=2 and PP=2.
References are independent of the converter:

* logits: transformers' own forward, against megatron's (``tests/convert_worker.py`` loads
  the checkpoints with megatron's ``load_checkpoint`` into the SAT model under torchrun);
* round trip: the original safetensors, bitwise;
* resize: new rows computed here from SentencePiece's standard encoder and from UTF-8
  bytes by hand; old-token logits against the original model; an end-to-end run of
  ``pretrain_sat.py`` on the resized checkpoint against transformers' loss;
* errors: the exit status, the message and the absence of any output.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import sentencepiece
import torch
from safetensors.torch import load_file
from sentencepiece import sentencepiece_model_pb2 as model_pb2
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from _launch import REPO, _env, read_tensorboard
from _tools import load_tool, train_tiny_tokenizer

from megatron_sat import convert
from megatron_sat.megatron_checkpoint import MegatronCheckpoint
from megatron_sat.vocab import pad_rows

CORPUS = sorted((REPO / "examples" / "data" / "tiny_corpus").glob("*.txt"))[:3]
VOCAB = 400
PIECE = model_pb2.ModelProto.SentencePiece
# Pieces appended to the trained tokenizer: a word-initial piece, Chinese pieces the old
# tokenizer only knows as UTF-8 bytes, and a control piece (no text: mean of all rows).
NEW_PIECES = [("\u2581Ishmaelite", PIECE.NORMAL), ("\u2581whaleship", PIECE.NORMAL),
              ("中国", PIECE.NORMAL), ("的", PIECE.NORMAL), ("<sep>", PIECE.CONTROL)]
VARIANTS = {
    "mha-untied": dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0),
    "gqa-untied": dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
                       max_position_embeddings=16384, rope_scaling={
                           "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True, rope_theta=50000.0),
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0),
}
# (name, --tp, --pp, layout the worker loads it at)
LAYOUTS = [("tp1", 1, 1, [1, 1]), ("tp2", 2, 1, [2, 1]), ("pp2", 1, 2, [1, 2])]


convert_checkpoint = load_tool("convert_checkpoint")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    """``old`` (trained, 400 pieces), ``new`` (old + NEW_PIECES), ``other`` (trained on
    other text: same size, different ids) and ``small`` (380 pieces)."""
    root = tmp_path_factory.mktemp("tokenizers")
    old = train_tiny_tokenizer(root / "old", VOCAB, CORPUS)
    proto = model_pb2.ModelProto()
    proto.ParseFromString(old.read_bytes())
    existing = {p.piece for p in proto.pieces}
    for piece, kind in NEW_PIECES:
        assert piece not in existing
        proto.pieces.add(piece=piece, score=-1000.0, type=kind)
    (root / "new").mkdir()
    (root / "new" / "tokenizer.model").write_bytes(proto.SerializeToString())
    other_text = sorted((REPO / "examples" / "data" / "tiny_corpus").glob("*.txt"))[10:13]
    return {"old": old, "new": root / "new" / "tokenizer.model",
            "other": train_tiny_tokenizer(root / "other", VOCAB + 20, other_text),
            "small": train_tiny_tokenizer(root / "small", VOCAB - 20, CORPUS)}


def _llama(variant: str, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(sorted(VARIANTS).index(variant))
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, rms_norm_eps=1e-5,
                         **{"max_position_embeddings": 128, **VARIANTS[variant]})
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default init: logits far from flat
        for name, p in model.named_parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.normal_(1, 0.2)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for variant in VARIANTS:
        _llama(variant).save_pretrained(root / variant)
        dirs[variant] = root / variant
    return dirs


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory) -> dict[tuple[str, str], convert.Result]:
    """Every variant converted at each of LAYOUTS."""
    root = tmp_path_factory.mktemp("megatron")
    return {(variant, name): convert.hf_to_megatron(hf_dirs[variant], root / variant / name,
                                                    tp=tp, pp=pp)
            for variant in VARIANTS for name, tp, pp, _ in LAYOUTS}


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))


def _hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def _without(flags: list[str], flag: str, count: int) -> list[str]:
    i = flags.index(flag)
    return flags[:i] + flags[i + 1 + count:]


@pytest.fixture(scope="module")
def megatron_logits(converted, tokens, tmp_path_factory) -> dict[str, torch.Tensor]:
    """One torchrun launch (2 processes) that loads every conversion, plus two controls
    with the wrong RoPE flags."""
    root = tmp_path_factory.mktemp("logits")
    cases = []
    for (variant, name), result in converted.items():
        layout = next(layout for n, _, _, layout in LAYOUTS if n == name)
        cases.append({"load": str(result.output_dir), "flags": result.continue_training_flags(),
                      "vocab_size": VOCAB, "tokens": tokens.tolist(), "layouts": [layout],
                      "out": str(root / f"{variant}-{name}")})
    gqa = converted["gqa-untied", "tp1"].continue_training_flags()
    no_scaling = _without(_without(gqa, "--use-rope-scaling", 0), "--rope-scaling-factor", 1)
    for control, flags in (("control-interleaved", gqa + ["--rotary-interleaved"]),
                           ("control-no-scaling", no_scaling)):
        cases.append({**cases[0], "load": str(converted["gqa-untied", "tp1"].output_dir),
                      "flags": flags, "layouts": [[1, 1]], "out": str(root / control)})
    (root / "spec.json").write_text(json.dumps(cases))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(REPO / "tests" / "convert_worker.py"), str(root / "spec.json")],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return {path.stem: torch.load(path) for path in root.glob("*.pt")}


# ----------------------------------------------------------------------------- HF -> megatron


@pytest.mark.e2e
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("layout", [name for name, *_ in LAYOUTS])
def test_megatron_logits_equal_transformers(megatron_logits, tokens, variant, layout):
    tp, pp = {n: l for n, _, _, l in LAYOUTS}[layout]
    got = megatron_logits[f"{variant}-{layout}-tp{tp}-pp{pp}"]
    want = _hf_logits(_llama(variant), tokens)
    assert want.abs().max() > 3  # not a flat distribution
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.e2e
def test_rope_convention_is_checked_by_the_logits(megatron_logits, tokens):
    """HF's rotate-half RoPE is megatron's non-interleaved one, and the Llama-3 scaling
    matters: either wrong flag moves the logits far beyond the tolerance above."""
    want = _hf_logits(_llama("gqa-untied"), tokens)
    for control in ("control-interleaved", "control-no-scaling"):
        got = megatron_logits[f"{control}-tp1-pp1"]
        assert (got - want).abs().max() > 0.1, control


def test_checkpoint_layout_and_flags(converted, hf_dirs):
    result = converted["gqa-untied", "tp2"]
    assert (result.output_dir / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert result.padded_vocab_size == 512  # 400 -> multiple of 128 x TP 2
    checkpoint = MegatronCheckpoint.open(result.output_dir)
    hf = load_file(hf_dirs["gqa-untied"] / "model.safetensors")
    qkv = checkpoint.tensor("decoder.layers.self_attention.linear_qkv.weight")
    assert qkv.shape == (2, (4 + 2 * 2) * 16, 64)  # layers stacked; 4 q + 2 k + 2 v heads
    # group 1: query heads 2 and 3, then key head 1, then value head 1 (hand layout)
    group = qkv[1, 64:128]
    q, k, v = (hf[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(group, torch.cat([q[32:64], k[16:32], v[16:32]]))
    fc1 = checkpoint.tensor("decoder.layers.mlp.linear_fc1.weight")
    assert torch.equal(fc1[0], torch.cat([hf["model.layers.0.mlp.gate_proj.weight"],
                                          hf["model.layers.0.mlp.up_proj.weight"]]))
    embedding = checkpoint.tensor("embedding.word_embeddings.weight")
    assert torch.equal(embedding[:VOCAB], hf["model.embed_tokens.weight"])
    assert not embedding[VOCAB:].any()
    flags = result.continue_training_flags()
    for expected in (["--rotary-base", "500000"], ["--num-query-groups", "2"],
                     ["--use-rope-scaling", "--rope-scaling-factor", "8.0"],
                     ["--norm-epsilon", "1e-05"], ["--tensor-model-parallel-size", "2"]):
        i = flags.index(expected[0])
        assert flags[i:i + len(expected)] == expected
    assert "--untie-embeddings-and-output-weights" in flags
    assert "--untie-embeddings-and-output-weights" not in \
        converted["mha-tied", "tp1"].continue_training_flags()


# ----------------------------------------------------------------------------- round trip


def _safetensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in directory.glob("*.safetensors"):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_is_bitwise(converted, hf_dirs, tmp_path, variant):
    out = tmp_path / "hf"
    convert.megatron_to_hf(converted[variant, "tp2"].output_dir, out)
    back, original = _safetensors(out), _safetensors(hf_dirs[variant])
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    want = json.loads((hf_dirs[variant] / "config.json").read_text())
    for key in ("vocab_size", "num_key_value_heads", "tie_word_embeddings", "rms_norm_eps",
                "max_position_embeddings", "head_dim"):
        assert config[key] == want[key], key


def test_round_trip_bf16_and_cli(hf_dirs, tmp_path, capsys):
    """bf16 weights stay bf16 and bitwise; the CLI commands of the contract work."""
    _llama("gqa-tied", torch.bfloat16).save_pretrained(tmp_path / "hf")
    assert convert_checkpoint.main(["hf-to-megatron", "--hf-dir", str(tmp_path / "hf"),
                                    "--output-dir", str(tmp_path / "mg"), "--tp", "1",
                                    "--pp", "2"]) == 0
    printed = capsys.readouterr().out
    assert "--pipeline-model-parallel-size 2" in printed and "pretrain_sat.py" in printed
    assert convert_checkpoint.main(["megatron-to-hf", "--load-dir", str(tmp_path / "mg"),
                                    "--output-dir", str(tmp_path / "back")]) == 0
    back, original = _safetensors(tmp_path / "back"), _safetensors(tmp_path / "hf")
    assert back.keys() == original.keys()
    assert all(back[n].dtype == torch.bfloat16 and torch.equal(back[n], t)
               for n, t in original.items())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert model.dtype == torch.bfloat16


def test_load_hf_from_megatron_in_memory(converted, tokens):
    result = converted["mha-untied", "pp2"]
    model = convert.load_hf_from_megatron(result.output_dir, dtype=torch.float64)
    assert model.dtype == torch.float64 and model.config.vocab_size == VOCAB
    assert not model.training
    want = _hf_logits(_llama("mha-untied").double(), tokens)
    assert torch.equal(_hf_logits(model, tokens), want)


# ----------------------------------------------------------------------------- resize


def _old_split(old, piece: str) -> list[int]:
    """Independent reference: "▁word" pieces split like the word at a line start (the
    standard encoder adds the "▁"); other text by its UTF-8 bytes (byte fallback)."""
    if piece.startswith("\u2581"):
        return old.encode(piece[1:])
    return [old.piece_to_id(f"<0x{b:02X}>") for b in piece.encode("utf-8")]


def _expected_rows(table: torch.Tensor, old, new) -> torch.Tensor:
    rows = []
    for i in range(old.get_piece_size(), new.get_piece_size()):
        piece = new.id_to_piece(i)
        ids = [] if new.is_control(i) else _old_split(old, piece)
        rows.append(table[ids].mean(0) if ids else table[:VOCAB].mean(0))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def resized(converted, tokenizers, tmp_path_factory) -> dict[str, convert.Result]:
    root = tmp_path_factory.mktemp("resized")
    return {variant: convert.resize_megatron(
        converted[variant, "tp1"].output_dir, root / variant,
        old_tokenizer_model=tokenizers["old"], new_tokenizer_model=tokenizers["new"])
        for variant in ("gqa-untied", "mha-tied")}


@pytest.mark.parametrize("variant", ["gqa-untied", "mha-tied"])
def test_resize_rows(resized, hf_dirs, tokenizers, variant):
    old, new = (sentencepiece.SentencePieceProcessor(model_file=str(tokenizers[k]))
                for k in ("old", "new"))
    result = resized[variant]
    size = VOCAB + len(NEW_PIECES)
    assert result.shape.vocab_size == size and result.padded_vocab_size == 512
    assert (result.output_dir / "tokenizer.model").read_bytes() == tokenizers["new"].read_bytes()
    hf = load_file(hf_dirs[variant] / "model.safetensors")
    checkpoint = MegatronCheckpoint.open(result.output_dir)
    names = {"embedding.word_embeddings.weight": "model.embed_tokens.weight"}
    if variant == "gqa-untied":
        names["output_layer.weight"] = "lm_head.weight"
    assert _old_split(old, "中国") and len(_old_split(old, "中国")) == 6
    for key, name in names.items():
        table = checkpoint.tensor(key)
        assert table.shape == (512, 64)
        assert torch.equal(table[:VOCAB], hf[name])
        torch.testing.assert_close(table[VOCAB:size], _expected_rows(hf[name], old, new),
                                   rtol=1e-6, atol=1e-7)
        assert not table[size:].any()


def test_resize_keeps_old_token_logits(resized, tokenizers, tokens):
    model = convert.load_hf_from_megatron(resized["gqa-untied"].output_dir)
    assert model.config.vocab_size == VOCAB + len(NEW_PIECES)  # the saved tokenizer.model
    got = _hf_logits(model, tokens)
    torch.testing.assert_close(got[..., :VOCAB], _hf_logits(_llama("gqa-untied"), tokens),
                               rtol=0, atol=1e-6)


def test_resize_on_the_way_equals_resize_after(hf_dirs, resized, tokenizers, tmp_path):
    direct = convert.hf_to_megatron(hf_dirs["mha-tied"], tmp_path / "direct",
                                    old_tokenizer_model=tokenizers["old"],
                                    new_tokenizer_model=tokenizers["new"])
    a, b = (MegatronCheckpoint.open(r.output_dir) for r in (direct, resized["mha-tied"]))
    for key in ("embedding.word_embeddings.weight", "decoder.layers.mlp.linear_fc1.weight"):
        assert torch.equal(a.tensor(key), b.tensor(key))


def test_megatron_to_hf_writes_tokenizer(converted, resized, tokenizers, tmp_path, capsys):
    """Without HF tokenizer files beside the SentencePiece model, a Llama tokenizer config
    is written and transformers' conversion encodes like SentencePiece (checked); with them
    (as tools/extend_vocab.py writes), they are shipped."""
    old = sentencepiece.SentencePieceProcessor(model_file=str(tokenizers["old"]))
    text = CORPUS[0].read_text()[:2000] + "  two  spaces, 中国的 bytes"
    out = convert.megatron_to_hf(converted["mha-tied", "tp1"].output_dir, tmp_path / "old",
                                 tokenizer_model=tokenizers["old"])
    assert AutoTokenizer.from_pretrained(out).encode(text, add_special_tokens=False) == \
        old.encode(text)
    assert (out / "tokenizer.model").read_bytes() == tokenizers["old"].read_bytes()
    assert "warning" not in capsys.readouterr().err

    # the new tokenizer alone: transformers' conversion drops appended pieces; reported
    convert.megatron_to_hf(resized["mha-tied"].output_dir, tmp_path / "plain",
                           tokenizer_model=tokenizers["new"])
    assert "does not encode like SentencePiece" in capsys.readouterr().err

    from tokenizers import AddedToken

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(tokenizers["new"], shipped / "tokenizer.model")
    backend = AutoTokenizer.from_pretrained(out).backend_tokenizer  # old vocabulary ...
    backend.add_tokens([AddedToken(piece.replace("\u2581", " "), normalized=False)
                        for piece, _ in NEW_PIECES])  # ... and the new pieces
    backend.save(str(shipped / "tokenizer.json"))
    shutil.copy(out / "tokenizer_config.json", shipped)
    hf = convert.megatron_to_hf(resized["mha-tied"].output_dir, tmp_path / "hf",
                                tokenizer_model=shipped / "tokenizer.model")
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        assert (hf / name).read_bytes() == (shipped / name).read_bytes()
    assert AutoTokenizer.from_pretrained(hf).convert_tokens_to_ids("中国") == VOCAB + 2
    model = AutoModelForCausalLM.from_pretrained(hf)
    assert model.config.vocab_size == VOCAB + len(NEW_PIECES)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (1, 2)


@pytest.mark.e2e
def test_pretrain_sat_trains_from_resized_checkpoint(converted, tokenizers, hf_dirs, tmp_path,
                                                    capsys):
    """``pretrain_sat.py`` at TP=2 loads ``resize --tp 2`` output with the new tokenizer:
    its first loss equals transformers' loss of the hand-resized model on the same tokens."""
    assert convert_checkpoint.main([
        "resize", "--load-dir", str(converted["gqa-untied", "tp1"].output_dir),
        "--output-dir", str(tmp_path / "resized"), "--old-tokenizer-model",
        str(tokenizers["old"]), "--new-tokenizer-model", str(tokenizers["new"]),
        "--tp", "2"]) == 0
    printed = capsys.readouterr().out
    command = shlex.split(printed.split("pretrain_sat.py \\\n", 1)[1].split("\n\n")[0])
    new = sentencepiece.SentencePieceProcessor(model_file=str(tokenizers["new"]))
    old = sentencepiece.SentencePieceProcessor(model_file=str(tokenizers["old"]))
    seq = 32
    # every document is the same 32 tokens (new ones included), so every training sample
    # is that document followed by its first token
    doc = torch.tensor([5, VOCAB, 300, VOCAB + 2, 17, VOCAB + 4] * 5 + [VOCAB + 1, 9])
    _write_dataset(tmp_path / "data", doc, copies=64)
    flags = command + [
        "--seq-length", str(seq), "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "1", "--lr", "1e-4", "--seed", "1", "--log-interval", "1",
        "--eval-iters", "0", "--eval-interval", "100", "--num-workers", "0",
        "--attention-dropout", "0", "--hidden-dropout", "0", "--no-rope-fusion",
        "--no-persist-layer-norm", "--no-gradient-accumulation-fusion",
        "--data-path", str(tmp_path / "data"), "--split", "100,0,0",
        "--tensorboard-dir", str(tmp_path / "tb"), "--use-distributed-optimizer",
        "--save", str(tmp_path / "trained"), "--save-interval", "1"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", str(REPO / "pretrain_sat.py"), *flags],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "loading release distributed checkpoint" in proc.stdout + proc.stderr
    loss = read_tensorboard(tmp_path / "tb", "lm loss")[1]

    reference = _llama("gqa-untied")
    hf = load_file(hf_dirs["gqa-untied"] / "model.safetensors")
    with torch.no_grad():
        for module, name in ((reference.model.embed_tokens, "model.embed_tokens.weight"),
                             (reference.lm_head, "lm_head.weight")):
            table = torch.cat([hf[name], _expected_rows(hf[name], old, new)])
            module.weight = torch.nn.Parameter(pad_rows(table, 512))
        logits = reference(doc[None]).logits[0]
    labels = torch.cat([doc[1:], doc[:1]])
    want = torch.nn.functional.cross_entropy(logits, labels).item()
    assert loss == pytest.approx(want, rel=1e-5)

    # the run's own checkpoint (iteration 1, TP=2, with distributed-optimizer state) reads
    # back, its vocabulary cut by the tokenizer it was trained with
    trained = convert.load_hf_from_megatron(tmp_path / "trained")
    assert trained.config.vocab_size == new.get_piece_size()
    before = reference.model.embed_tokens.weight[:new.get_piece_size()]
    moved = (trained.model.embed_tokens.weight - before).abs().max()
    assert 0 < moved < 1e-3  # one Adam step of lr 1e-4


def _write_dataset(prefix: Path, doc: torch.Tensor, copies: int) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=numpy.int32)
    for _ in range(copies):
        builder.add_document(torch.tensor(doc.numpy(), dtype=torch.int32), [len(doc)])
    builder.finalize(str(prefix) + ".idx")


# ----------------------------------------------------------------------------- errors


def _error_cases(tokenizers, hf_dirs, converted, tmp_path):
    hf, mg = str(hf_dirs["gqa-untied"]), str(converted["gqa-untied", "tp1"].output_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(hf_dirs["gqa-untied"] / "config.json", config_only)
    old, new = str(tokenizers["old"]), str(tokenizers["new"])
    resize = ["resize", "--load-dir", mg]
    return {
        "new-smaller": (resize + ["--old-tokenizer-model", new, "--new-tokenizer-model", old],
                        "--old-tokenizer-model"),  # 405 != the checkpoint's 400
        "new-smaller-hf": (["hf-to-megatron", "--hf-dir", hf, "--old-tokenizer-model", old,
                            "--new-tokenizer-model", str(tokenizers["small"])],
                           "--new-tokenizer-model has 380 pieces, fewer than the 400"),
        "old-not-checkpoint": (resize + ["--old-tokenizer-model", str(tokenizers["small"]),
                                         "--new-tokenizer-model", new],
                               "has 380 pieces but the checkpoint"),
        "not-an-extension": (resize + ["--old-tokenizer-model", old,
                                       "--new-tokenizer-model", str(tokenizers["other"])],
                             "does not extend --old-tokenizer-model: id "),
        "tp": (["hf-to-megatron", "--hf-dir", hf, "--tp", "4"],
               "--tp 4: the model's 2 key/value groups cannot be split"),
        "pp": (["hf-to-megatron", "--hf-dir", hf, "--pp", "3"],
               "--pp 3: the model's 2 layers cannot be split evenly"),
        "no-config": (["hf-to-megatron", "--hf-dir", str(empty)], "no config.json"),
        "no-safetensors": (["hf-to-megatron", "--hf-dir", str(config_only)],
                           "no *.safetensors files"),
        "no-tracker": (["megatron-to-hf", "--load-dir", hf],
                       "no latest_checkpointed_iteration.txt"),
        "one-tokenizer": (["hf-to-megatron", "--hf-dir", hf, "--new-tokenizer-model", new],
                          "give both --old-tokenizer-model and --new-tokenizer-model"),
        "missing-tokenizer": (resize + ["--old-tokenizer-model", str(tmp_path / "nope.model"),
                                        "--new-tokenizer-model", new], "file not found"),
        "wrong-tokenizer": (["megatron-to-hf", "--load-dir", mg, "--tokenizer-model",
                             str(tokenizers["other"])], "has 420 pieces but"),
    }


ERRORS = ["new-smaller", "new-smaller-hf", "old-not-checkpoint", "not-an-extension", "tp",
          "pp", "no-config", "no-safetensors", "no-tracker", "one-tokenizer",
          "missing-tokenizer", "wrong-tokenizer"]


@pytest.mark.parametrize("case", ERRORS)
def test_bad_input_fails_clearly_without_output(tokenizers, hf_dirs, converted, tmp_path,
                                                capsys, case):
    argv, message = _error_cases(tokenizers, hf_dirs, converted, tmp_path)[case]
    out = tmp_path / "out" / "target"
    assert convert_checkpoint.main(argv + ["--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convert_checkpoint.py: error: ") and message in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_existing_output_and_inputs_are_never_replaced(converted, hf_dirs, tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("mine")
    hf = str(hf_dirs["mha-tied"])
    assert convert_checkpoint.main(["hf-to-megatron", "--hf-dir", hf,
                                    "--output-dir", str(target)]) == 2
    assert "already exists; choose a new directory or pass --force" in capsys.readouterr().err
    assert (target / "keep").read_text() == "mine"
    mg = str(converted["mha-tied", "tp1"].output_dir)
    assert convert_checkpoint.main(["megatron-to-hf", "--load-dir", mg, "--output-dir", mg,
                                    "--force"]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert MegatronCheckpoint.open(mg)  # untouched
    assert convert_checkpoint.main(["hf-to-megatron", "--hf-dir", hf, "--output-dir",
                                    str(target), "--force"]) == 0
    assert not (target / "keep").exists() and (target / "release").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_a_crash_while_writing_leaves_nothing(hf_dirs, tmp_path, monkeypatch):
    def crash(root, args, tensors):
        (root / "release").mkdir()
        (root / "release" / "half-written").write_bytes(b"x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert, "write_release", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        convert.hf_to_megatron(hf_dirs["mha-tied"], tmp_path / "target")
    assert list(tmp_path.iterdir()) == []


def test_rope_theta_must_be_an_integer(hf_dirs, tmp_path):
    config = json.loads((hf_dirs["mha-tied"] / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_theta"] = 10000.5
    with pytest.raises(convert.ConversionError, match="rope_theta 10000.5 is not an integer"):
        convert.LlamaShape.from_hf_config(config, "config.json")
    assert math.isclose(convert.LlamaShape.from_hf_config(
        {**config, "rope_theta": 1e6}, "config.json").rope_theta, 1e6)
