"""Llama checkpoints between Hugging Face and ``pretrain_sat.py``, and vocabulary resize.

The megatron side is the model ``pretrain_sat.py`` builds (megatron-core ``GPTModel`` with
the SAT layer spec, which keeps megatron's local-spec parameter names) in megatron's
default ``torch_dist`` format (see :mod:`megatron_sat.megatron_checkpoint`). Stored tensors
have their global shapes, so one conversion serves every TP/PP split whose padded
vocabulary (a multiple of ``--make-vocab-size-divisible-by`` x TP) is the same.

Entry points (the CLI is ``tools/convert_checkpoint.py``; docs/checkpoints.md has the
mapping table and the resize rule):

* :func:`hf_to_megatron`: HF Llama -> release checkpoint, optionally with an extended
  vocabulary;
* :func:`megatron_to_hf`: checkpoint root -> HF directory (config, safetensors, tokenizer);
* :func:`resize_megatron`: checkpoint root -> release checkpoint with an extended vocabulary;
* :func:`load_hf_from_megatron`: checkpoint root -> ``LlamaForCausalLM`` in memory.

No GPU and no launcher are needed. The whole model is held in memory once; measured peak
memory is about 2-2.5x the weights (docs/checkpoints.md, "Memory and time").
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from megatron_sat.megatron_checkpoint import (LAYERS, ConversionError, MegatronCheckpoint,
                                              Tensors, pretrain_args, write_release)
from megatron_sat.vocab import (check_extension, extend_rows, load_sentencepiece,
                                new_row_sources, padded_vocab_size)

__all__ = ["ConversionError", "LlamaShape", "Result", "hf_to_megatron", "megatron_to_hf",
           "resize_megatron", "load_hf_from_megatron"]

TOKENIZER_FILE = "tokenizer.model"
DEFAULT_DIVISIBLE_BY = 128
SENTENCEPIECE_TYPES = ("GPTSentencePieceTokenizer", "SentencePieceTokenizer", "Llama2Tokenizer")

# Megatron keys. Per layer (``model.layers.{i}.`` in HF), stored under ``decoder.layers.``.
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
QKV = LAYERS + "self_attention.linear_qkv.weight"
FC1 = LAYERS + "mlp.linear_fc1.weight"
LAYER_COPIES = {  # HF layer tensor -> megatron tensor, identical
    "input_layernorm.weight": LAYERS + "self_attention.linear_qkv.layer_norm_weight",
    "self_attn.o_proj.weight": LAYERS + "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": LAYERS + "mlp.linear_fc1.layer_norm_weight",
    "mlp.down_proj.weight": LAYERS + "mlp.linear_fc2.weight",
}


# ----------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class LlamaShape:
    """What fixes a Llama's tensors and forward pass, in HF and in megatron terms.

    ``vocab_size`` is the tokenizer's (unpadded). ``rope_scaling_factor`` is Llama-3 RoPE
    scaling (megatron ``--use-rope-scaling``), or None.
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_groups: int
    head_dim: int
    vocab_size: int
    norm_epsilon: float
    rope_theta: int
    rope_scaling_factor: float | None
    tied: bool
    max_position_embeddings: int

    @classmethod
    def from_hf_config(cls, config: Mapping, where: str) -> "LlamaShape":
        """From a ``config.json`` (transformers 4.x or 5.x spelling); ``where`` names it."""
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConversionError(f"{where}: {what}; only Llama (LlamaForCausalLM: RMSNorm, "
                                      "SwiGLU, RoPE, no biases) converts")

        need(config.get("model_type") == "llama", f"model_type is {config.get('model_type')!r}")
        need(config.get("hidden_act", "silu") == "silu",
             f"hidden_act is {config.get('hidden_act')!r}")
        need(not config.get("attention_bias") and not config.get("mlp_bias"),
             "the config has attention or MLP biases")
        rope = config.get("rope_parameters") or {}  # transformers 5
        theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = config.get("rope_scaling") or (
            rope if rope.get("rope_type", "default") != "default" else None)
        if float(theta) != int(theta):
            raise ConversionError(f"{where}: rope_theta {theta} is not an integer, which "
                                  "megatron's --rotary-base requires")
        heads, hidden = config["num_attention_heads"], config["hidden_size"]
        return cls(
            num_layers=config["num_hidden_layers"], hidden_size=hidden,
            ffn_hidden_size=config["intermediate_size"], num_heads=heads,
            num_groups=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            vocab_size=config["vocab_size"], norm_epsilon=config.get("rms_norm_eps", 1e-6),
            rope_theta=int(theta), rope_scaling_factor=_llama3_factor(scaling, where),
            tied=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=config.get("max_position_embeddings", 2048))

    @classmethod
    def from_megatron_args(cls, args, vocab_size: int, where: str) -> "LlamaShape":
        """From the megatron arguments stored in a checkpoint."""
        not_llama = [what for what, bad in (
            ("no --swiglu", not args.swiglu),
            (f"--normalization {args.normalization}", args.normalization != "RMSNorm"),
            (f"--position-embedding-type {args.position_embedding_type}",
             args.position_embedding_type != "rope"),
            ("biases (no --disable-bias-linear)", args.add_bias_linear),
            ("--add-qkv-bias", args.add_qkv_bias), ("--qk-layernorm", args.qk_layernorm),
            ("--apply-layernorm-1p", args.layernorm_zero_centered_gamma),
            ("--rotary-interleaved", args.rotary_interleaved),
            (f"--rotary-percent {args.rotary_percent}", args.rotary_percent != 1.0),
            (f"--num-experts {args.num_experts}", bool(args.num_experts))) if bad]
        if not_llama:
            raise ConversionError(f"{where}: the checkpoint's model is not a Llama "
                                  f"({', '.join(not_llama)})")
        heads = args.num_attention_heads
        return cls(
            num_layers=args.num_layers, hidden_size=args.hidden_size,
            ffn_hidden_size=args.ffn_hidden_size, num_heads=heads,
            num_groups=args.num_query_groups if args.group_query_attention else heads,
            head_dim=args.kv_channels or args.hidden_size // heads, vocab_size=vocab_size,
            norm_epsilon=args.layernorm_epsilon, rope_theta=int(args.rotary_base),
            rope_scaling_factor=args.rope_scaling_factor if args.use_rope_scaling else None,
            tied=not args.untie_embeddings_and_output_weights,
            max_position_embeddings=args.max_position_embeddings)

    def hf_config(self, dtype: torch.dtype, tokenizer=None):
        """transformers' ``LlamaConfig`` (keywords accepted by 4.x and 5.x); special token
        ids from ``tokenizer`` (a SentencePiece model) when given."""
        from transformers import LlamaConfig

        special = {} if tokenizer is None else {
            name: (i if i >= 0 else None) for name, i in (
                ("bos_token_id", tokenizer.bos_id()), ("eos_token_id", tokenizer.eos_id()),
                ("pad_token_id", tokenizer.pad_id()))}
        scaling = None if self.rope_scaling_factor is None else {
            "rope_type": "llama3", "factor": self.rope_scaling_factor, **_MEGATRON_LLAMA3}
        return LlamaConfig(
            architectures=["LlamaForCausalLM"], vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.ffn_hidden_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_groups, head_dim=self.head_dim, hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.norm_epsilon, rope_theta=float(self.rope_theta),
            rope_scaling=scaling, tie_word_embeddings=self.tied, attention_bias=False,
            mlp_bias=False, torch_dtype=dtype, **special)

    def model_flags(self) -> list[str]:
        """The ``pretrain_sat.py`` flags that build exactly this model (vocabulary aside)."""
        flags = ["--num-layers", self.num_layers, "--hidden-size", self.hidden_size,
                 "--ffn-hidden-size", self.ffn_hidden_size,
                 "--num-attention-heads", self.num_heads]
        if self.num_groups != self.num_heads:
            flags += ["--group-query-attention", "--num-query-groups", self.num_groups]
        if self.head_dim != self.hidden_size // self.num_heads:
            flags += ["--kv-channels", self.head_dim]
        flags += ["--max-position-embeddings", self.max_position_embeddings,
                  "--position-embedding-type", "rope", "--rotary-base", self.rope_theta]
        if self.rope_scaling_factor is not None:
            flags += ["--use-rope-scaling", "--rope-scaling-factor", self.rope_scaling_factor]
        flags += ["--normalization", "RMSNorm", "--norm-epsilon", repr(self.norm_epsilon),
                  "--swiglu", "--disable-bias-linear"]
        if not self.tied:
            flags.append("--untie-embeddings-and-output-weights")
        return [str(f) for f in flags]

    def check_split(self, tp: int, pp: int) -> None:
        """Fail unless megatron can split this model over ``--tp`` x ``--pp``."""
        if tp < 1 or pp < 1:
            raise ConversionError(f"--tp {tp} --pp {pp}: both must be >= 1")
        for count, what in ((self.num_heads, "attention heads"),
                            (self.num_groups, "key/value groups"),
                            (self.ffn_hidden_size, "MLP channels (intermediate_size)")):
            if count % tp:
                raise ConversionError(f"--tp {tp}: the model's {count} {what} cannot be split "
                                      f"over {tp} tensor-parallel ranks; use a --tp that "
                                      f"divides {count}")
        if self.num_layers % pp:
            raise ConversionError(f"--pp {pp}: the model's {self.num_layers} layers cannot be "
                                  f"split evenly over {pp} pipeline stages; use a --pp that "
                                  f"divides {self.num_layers}")


# Megatron's Llama-3 RoPE scaling takes only a factor; the rest is fixed in its code.
_MEGATRON_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}


def _llama3_factor(scaling: Mapping | None, where: str) -> float | None:
    if not scaling:
        return None
    fixed = {key: scaling.get(key) for key in _MEGATRON_LLAMA3}
    if scaling.get("rope_type", scaling.get("type")) != "llama3" or fixed != _MEGATRON_LLAMA3:
        raise ConversionError(
            f"{where}: RoPE scaling {dict(scaling)} has no megatron equivalent; megatron "
            f"supports rope_type 'llama3' with {_MEGATRON_LLAMA3} only")
    return float(scaling["factor"])


# ----------------------------------------------------------------------------- tensor layout


def qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    shape: LlamaShape) -> torch.Tensor:
    """Megatron's fused QKV rows: per key/value group its query heads, then its key head,
    then its value head (so a TP rank's rows are whole groups)."""
    groups, head_dim = shape.num_groups, shape.head_dim
    per_group = shape.num_heads // groups
    return torch.cat([q.reshape(groups, per_group * head_dim, -1),
                      k.reshape(groups, head_dim, -1),
                      v.reshape(groups, head_dim, -1)], dim=1).reshape(-1, q.shape[-1])


def qkv_from_megatron(qkv: torch.Tensor, shape: LlamaShape) -> list[torch.Tensor]:
    """Inverse of :func:`qkv_to_megatron`: HF's q_proj, k_proj and v_proj weights."""
    groups, head_dim = shape.num_groups, shape.head_dim
    per_group = shape.num_heads // groups
    parts = qkv.reshape(groups, (per_group + 2) * head_dim, -1).split(
        [per_group * head_dim, head_dim, head_dim], dim=1)
    return [part.reshape(-1, qkv.shape[-1]) for part in parts]


def hf_to_megatron_tensors(hf: Callable[[str], torch.Tensor], shape: LlamaShape) -> dict:
    """Megatron tensors (unpadded vocabulary) from a function returning HF tensors."""
    layers = range(shape.num_layers)
    get = lambda i, name: hf(f"model.layers.{i}.{name}")  # noqa: E731
    tensors = {EMBEDDING: hf("model.embed_tokens.weight"), FINAL_NORM: hf("model.norm.weight")}
    if not shape.tied:
        tensors[OUTPUT] = hf("lm_head.weight")
    tensors.update({key: [get(i, name) for i in layers] for name, key in LAYER_COPIES.items()})
    tensors[QKV] = [qkv_to_megatron(get(i, "self_attn.q_proj.weight"),
                                    get(i, "self_attn.k_proj.weight"),
                                    get(i, "self_attn.v_proj.weight"), shape) for i in layers]
    # SwiGLU fc1 rows are [gate; up]. Megatron splits the two halves over TP separately
    # (each rank holds [gate_r; up_r]), so this global order is the same at every TP size.
    tensors[FC1] = [torch.cat([get(i, "mlp.gate_proj.weight"), get(i, "mlp.up_proj.weight")])
                    for i in layers]
    return tensors


def megatron_to_hf_tensors(tensors: Tensors, shape: LlamaShape) -> dict[str, torch.Tensor]:
    """HF state dict from megatron tensors, vocabulary rows cut to ``shape.vocab_size``."""
    hf = {"model.embed_tokens.weight": tensors[EMBEDDING][:shape.vocab_size],
          "model.norm.weight": tensors[FINAL_NORM]}
    if not shape.tied:
        hf["lm_head.weight"] = tensors[OUTPUT][:shape.vocab_size]
    for i in range(shape.num_layers):
        prefix = f"model.layers.{i}."
        hf.update({prefix + name: tensors[key][i] for name, key in LAYER_COPIES.items()})
        q, k, v = qkv_from_megatron(tensors[QKV][i], shape)
        gate, up = tensors[FC1][i].chunk(2)
        hf.update({prefix + "self_attn.q_proj.weight": q, prefix + "self_attn.k_proj.weight": k,
                   prefix + "self_attn.v_proj.weight": v, prefix + "mlp.gate_proj.weight": gate,
                   prefix + "mlp.up_proj.weight": up})
    return hf


def megatron_keys(shape: LlamaShape) -> list[str]:
    return ([EMBEDDING, FINAL_NORM, QKV, FC1, *LAYER_COPIES.values()]
            + ([] if shape.tied else [OUTPUT]))


def vocabulary_tables(shape: LlamaShape) -> tuple[str, ...]:
    """The keys whose rows are the vocabulary."""
    return (EMBEDDING,) if shape.tied else (EMBEDDING, OUTPUT)


# ----------------------------------------------------------------------------- Hugging Face


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_hf_tokenizer(model_path: Path, out: Path) -> None:
    """``tokenizer.model`` plus transformers' tokenizer files for it.

    The HF files beside ``model_path`` (``tools/extend_vocab.py`` writes them; a Hugging
    Face model directory has them) are copied when their vocabulary is the model's. Else
    a ``LlamaTokenizer`` config is written and transformers converts ``tokenizer.model``
    when it loads; that conversion is exact for a trained SentencePiece BPE model but not
    for pieces appended to one, so the result is checked and a mismatch reported.
    """
    tokenizer = load_sentencepiece(model_path, "--tokenizer-model")
    shutil.copyfile(model_path, out / TOKENIZER_FILE)
    beside = model_path.parent
    if _hf_vocab_size(beside / "tokenizer.json") == tokenizer.get_piece_size():
        for name in HF_TOKENIZER_FILES:
            if (beside / name).is_file():
                shutil.copyfile(beside / name, out / name)
        return
    special = {"bos_token": tokenizer.id_to_piece(tokenizer.bos_id()),
               "eos_token": tokenizer.id_to_piece(tokenizer.eos_id()),
               "unk_token": tokenizer.id_to_piece(tokenizer.unk_id())}
    config = {"tokenizer_class": "LlamaTokenizer", **special, "pad_token": None,
              "add_bos_token": True, "add_eos_token": False, "legacy": True,
              "clean_up_tokenization_spaces": False}
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    _check_hf_tokenizer(tokenizer, out, model_path)


def _hf_vocab_size(path: Path) -> int | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return len(data.get("model", {}).get("vocab", {})) + sum(
        1 for token in data.get("added_tokens", [])
        if token["content"] not in data.get("model", {}).get("vocab", {}))


def _check_hf_tokenizer(tokenizer, out: Path, model_path: Path) -> None:
    """Warn unless transformers' tokenizer from ``out`` encodes the text of every piece,
    space-separated, as SentencePiece does. (The text starts with a non-space: transformers'
    legacy Llama tokenizer treats leading spaces differently by design.)"""
    from transformers import AutoTokenizer

    text = " ".join(tokenizer.id_to_piece(i).replace("\u2581", " ")
                    for i in range(tokenizer.get_piece_size())
                    if not (tokenizer.is_control(i) or tokenizer.is_byte(i)
                            or tokenizer.is_unknown(i))).strip()
    with _quiet_transformers():
        hf = AutoTokenizer.from_pretrained(str(out))
    if hf.encode(text, add_special_tokens=False) != tokenizer.encode(text):
        print(f"warning: transformers' conversion of {model_path} does not encode like "
              "SentencePiece (pieces appended to a BPE model?); put the tokenizer.json that "
              "tools/extend_vocab.py writes beside it and convert again", file=sys.stderr)





class HFCheckpoint:
    """A Hugging Face Llama directory: ``config.json`` and safetensors, read lazily."""

    def __init__(self, directory: str | os.PathLike):
        from safetensors import safe_open

        self.directory = Path(directory)
        config = self.directory / "config.json"
        if not config.is_file():
            raise ConversionError(f"--hf-dir {directory}: no config.json; give a Hugging Face "
                                  "model directory (save_pretrained output)")
        self.shape = LlamaShape.from_hf_config(json.loads(config.read_text()), str(config))
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"--hf-dir {directory}: no *.safetensors files; re-save .bin "
                                  "weights with save_pretrained(safe_serialization=True)")
        handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {name: handle for handle in handles for name in handle.keys()}

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ConversionError(f"--hf-dir {self.directory}: tensor {name} is missing from "
                                  "its safetensors files")
        return self._where[name].get_tensor(name)

    def tensors(self) -> dict:
        """Megatron tensors, unpadded; checks the vocabulary rows against config.json."""
        tensors = hf_to_megatron_tensors(self, self.shape)
        for key in vocabulary_tables(self.shape):
            if tensors[key].shape[0] != self.shape.vocab_size:
                raise ConversionError(
                    f"--hf-dir {self.directory}: {tensors[key].shape[0]} vocabulary rows but "
                    f"config.json says vocab_size {self.shape.vocab_size}")
        return tensors


def build_hf_model(state: dict, shape: LlamaShape, dtype: torch.dtype,
                   device: str | torch.device = "cpu", tokenizer=None):
    """A ``LlamaForCausalLM`` in eval mode holding ``state`` (in ``dtype`` on ``device``)."""
    from transformers import LlamaForCausalLM

    state = {name: t.to(device=device, dtype=dtype) for name, t in state.items()}
    with _quiet_transformers():
        model = LlamaForCausalLM.from_pretrained(
            None, config=shape.hf_config(dtype, tokenizer), state_dict=state, torch_dtype=dtype)
    return model.to(device).eval()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(level)


# ----------------------------------------------------------------------------- megatron side


def checkpoint_vocab_size(checkpoint: MegatronCheckpoint, tokenizer_model=None) -> int:
    """A checkpoint's unpadded vocabulary: ``tokenizer_model``'s size when given (checked);
    else that of the SentencePiece ``--tokenizer-model`` it was trained with, if that file
    still exists; else its ``--vocab-size`` (set by this tool and by NullTokenizer runs);
    else the padded size (with a warning)."""
    args = checkpoint.args
    padded, saved = args.padded_vocab_size, getattr(args, "vocab_size", None)
    if tokenizer_model is not None:
        size = load_sentencepiece(tokenizer_model, "--tokenizer-model").get_piece_size()
        if size > padded or (saved is not None and size != saved):
            trained = saved if saved is not None else f"at most {padded}"
            raise ConversionError(
                f"--tokenizer-model {tokenizer_model} has {size} pieces but {checkpoint.root} "
                f"has a vocabulary of {trained}; give the tokenizer it was trained with")
        return size
    trained_with = getattr(args, "tokenizer_model", None)
    if args.tokenizer_type in SENTENCEPIECE_TYPES and trained_with and \
            Path(trained_with).is_file():
        return load_sentencepiece(trained_with, "--tokenizer-model").get_piece_size()
    if saved is not None:
        return saved
    print(f"warning: {checkpoint.root}: unpadded vocabulary unknown; keeping all {padded} "
          "rows (pass --tokenizer-model to cut megatron's padding)", file=sys.stderr)
    return padded


def _open(load_dir, tokenizer_model=None) -> tuple[MegatronCheckpoint, LlamaShape]:
    checkpoint = MegatronCheckpoint.open(load_dir)
    vocab = checkpoint_vocab_size(checkpoint, tokenizer_model)
    return checkpoint, LlamaShape.from_megatron_args(checkpoint.args, vocab, str(load_dir))


def check_output(target: str | os.PathLike, *, force: bool, inputs: tuple = ()) -> Path:
    """Refuse an existing ``target`` unless ``force``, and an input in any case. Called
    before the (long) reading too, so that a bad ``--output-dir`` fails at once."""
    target = Path(target).absolute()
    if any(target == Path(path).absolute() for path in inputs):
        raise ConversionError(f"--output-dir {target} is also an input; write elsewhere")
    if target.exists() and not force:
        raise ConversionError(f"--output-dir {target} already exists; choose a new directory "
                              "or pass --force to replace it")
    return target


@contextlib.contextmanager
def output_directory(target: str | os.PathLike, *, force: bool,
                     inputs: tuple = ()) -> Iterator[Path]:
    """A fresh temporary directory beside ``target``, moved onto it only on success
    (:func:`check_output` first)."""
    target = check_output(target, force=force, inputs=inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
        if target.exists():
            replaced = target.parent / f".{target.name}.replaced-{os.getpid()}"
            os.replace(target, replaced)
            os.replace(temporary, target)
            shutil.rmtree(replaced)
        else:
            os.replace(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


# ----------------------------------------------------------------------------- operations


@dataclass
class Result:
    """A written megatron checkpoint and how to train from it."""

    output_dir: Path
    shape: LlamaShape
    padded_vocab_size: int
    tp: int
    pp: int
    divisible_by: int
    tokenizer_model: Path | None  # the copy in output_dir, when a tokenizer is known

    def continue_training_flags(self) -> list[str]:
        """``pretrain_sat.py`` flags that load this checkpoint (add data, batch, sequence
        length, learning rate and the SAT flags)."""
        tokenizer = str(self.tokenizer_model or "<tokenizer.model of this vocabulary>")
        return [*self.shape.model_flags(),
                "--make-vocab-size-divisible-by", str(self.divisible_by),
                "--tensor-model-parallel-size", str(self.tp),
                "--pipeline-model-parallel-size", str(self.pp),
                "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", tokenizer,
                "--load", str(self.output_dir)]


def _tokenizer_pair(old_path, new_path, vocab_size: int, where: str):
    """The old and new SentencePiece models, checked against each other and ``vocab_size``."""
    old = load_sentencepiece(old_path, "--old-tokenizer-model")
    new = load_sentencepiece(new_path, "--new-tokenizer-model")
    if old.get_piece_size() != vocab_size:
        raise ConversionError(
            f"--old-tokenizer-model {old_path} has {old.get_piece_size()} pieces but {where} "
            f"has a vocabulary of {vocab_size}; pass the tokenizer it was trained with")
    check_extension(old, new)
    return old, new


def _check_settings(shape: LlamaShape, tp: int, pp: int, divisible_by: int, output_dir,
                    force: bool, inputs: tuple) -> None:
    shape.check_split(tp, pp)
    if divisible_by < 1:
        raise ConversionError(f"--make-vocab-size-divisible-by {divisible_by}: must be >= 1")
    check_output(output_dir, force=force, inputs=inputs)


def _write(output_dir, tensors: dict, shape: LlamaShape, *, tp: int, pp: int,
           divisible_by: int, tokenizers, tokenizer: Path | None, force: bool,
           inputs: tuple) -> Result:
    """Extend the vocabulary to ``tokenizers[1]``'s (when given), pad, write a release
    checkpoint and copy ``tokenizer`` beside it."""
    old_size, sources = shape.vocab_size, []
    if tokenizers is not None:
        sources = new_row_sources(*tokenizers)
        shape = replace(shape, vocab_size=tokenizers[1].get_piece_size())
    rows = padded_vocab_size(shape.vocab_size, divisible_by, tp)
    tensors = dict(tensors)
    for key in vocabulary_tables(shape):
        tensors[key] = extend_rows(tensors[key], old_size, sources, rows)
    target = Path(output_dir).absolute()
    kept_tokenizer = target / TOKENIZER_FILE if tokenizer else None
    args = pretrain_args(shape.model_flags() + [
        "--make-vocab-size-divisible-by", str(divisible_by), "--ckpt-format", "torch_dist",
        "--seq-length", str(shape.max_position_embeddings), "--micro-batch-size", "1",
        "--no-rope-fusion", "--no-persist-layer-norm", "--no-gradient-accumulation-fusion",
        *(["--tokenizer-type", "GPTSentencePieceTokenizer",
           "--tokenizer-model", str(kept_tokenizer)] if tokenizer else [])])
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp
    args.world_size = tp * pp
    args.vocab_size, args.padded_vocab_size = shape.vocab_size, rows
    with output_directory(target, force=force, inputs=inputs) as temporary:
        write_release(temporary, args, tensors)
        if tokenizer:
            shutil.copyfile(tokenizer, temporary / TOKENIZER_FILE)
    return Result(target, shape, rows, tp, pp, divisible_by, kept_tokenizer)


def hf_to_megatron(hf_dir, output_dir, *, tp: int = 1, pp: int = 1,
                   divisible_by: int = DEFAULT_DIVISIBLE_BY, old_tokenizer_model=None,
                   new_tokenizer_model=None, dtype: torch.dtype | None = None,
                   force: bool = False) -> Result:
    """Convert a Hugging Face Llama into a release checkpoint for ``pretrain_sat.py``,
    padded for ``tp``; with both tokenizer models, extend the vocabulary on the way.

    ``dtype`` defaults to the stored one. The output root gets a ``tokenizer.model``: the
    new tokenizer, or the HF directory's own when it has one.
    """
    hf = HFCheckpoint(hf_dir)
    if (old_tokenizer_model is None) != (new_tokenizer_model is None):
        raise ConversionError("give both --old-tokenizer-model and --new-tokenizer-model to "
                              "extend the vocabulary, or neither")
    tokenizers, tokenizer = None, Path(hf_dir) / TOKENIZER_FILE
    if new_tokenizer_model is not None:
        tokenizers = _tokenizer_pair(old_tokenizer_model, new_tokenizer_model,
                                     hf.shape.vocab_size, f"--hf-dir {hf_dir} (config.json)")
        tokenizer = Path(new_tokenizer_model)
    _check_settings(hf.shape, tp, pp, divisible_by, output_dir, force, (hf_dir,))
    tensors = hf.tensors()
    if dtype is not None:
        tensors = {key: [t.to(dtype) for t in value] if isinstance(value, list)
                   else value.to(dtype) for key, value in tensors.items()}
    return _write(output_dir, tensors, hf.shape, tp=tp, pp=pp, divisible_by=divisible_by,
                  tokenizers=tokenizers, tokenizer=tokenizer if tokenizer.is_file() else None,
                  force=force, inputs=(hf_dir,))


def resize_megatron(load_dir, output_dir, *, old_tokenizer_model, new_tokenizer_model,
                    divisible_by: int = DEFAULT_DIVISIBLE_BY, tp: int | None = None,
                    force: bool = False) -> Result:
    """A release checkpoint of ``load_dir``'s model with the vocabulary of
    ``new_tokenizer_model``, which must extend ``old_tokenizer_model`` (the checkpoint's).
    Padded for ``tp`` (default: the checkpoint's TP size)."""
    checkpoint, shape = _open(load_dir)
    tp = tp or checkpoint.args.tensor_model_parallel_size
    pp = checkpoint.args.pipeline_model_parallel_size
    tokenizers = _tokenizer_pair(old_tokenizer_model, new_tokenizer_model, shape.vocab_size,
                                 f"the checkpoint {load_dir}")
    _check_settings(shape, tp, pp, divisible_by, output_dir, force, (load_dir,))
    return _write(output_dir, checkpoint.read(megatron_keys(shape)), shape, tp=tp, pp=pp,
                  divisible_by=divisible_by, tokenizers=tokenizers,
                  tokenizer=Path(new_tokenizer_model), force=force, inputs=(load_dir,))


def _special_tokens(tokenizer_model):
    """The SentencePiece model whose special ids the HF config gets, if one is given."""
    if tokenizer_model is None:
        return None
    return load_sentencepiece(tokenizer_model, "--tokenizer-model")


def load_hf_from_megatron(load_dir, *, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32, tokenizer_model=None):
    """The ``pretrain_sat.py`` checkpoint at ``load_dir`` (the ``--save`` root) as a
    transformers ``LlamaForCausalLM`` in eval mode, built in memory (nothing written).

    The vocabulary is the unpadded one when known (:func:`checkpoint_vocab_size`;
    ``tokenizer_model``, a SentencePiece file, decides), else megatron's padded one.
    Memory: the stored weights plus one stacked layer tensor, plus a copy when ``dtype``
    or ``device`` differ from the stored ones.
    """
    checkpoint, shape = _open(load_dir, tokenizer_model)
    state = megatron_to_hf_tensors(checkpoint.read(megatron_keys(shape)), shape)
    return build_hf_model(state, shape, dtype, device, _special_tokens(tokenizer_model))


def megatron_to_hf(load_dir, output_dir, *, tokenizer_model=None, force: bool = False) -> Path:
    """Write ``load_dir``'s checkpoint as a Hugging Face Llama directory: config.json and
    safetensors in the stored dtype, plus the tokenizer files when ``tokenizer_model`` is
    given. ``AutoModelForCausalLM.from_pretrained`` and lm-eval-harness load it."""
    checkpoint, shape = _open(load_dir, tokenizer_model)
    check_output(output_dir, force=force, inputs=(load_dir,))
    tensors = checkpoint.read(megatron_keys(shape))
    model = build_hf_model(megatron_to_hf_tensors(tensors, shape), shape,
                           tensors[FINAL_NORM].dtype, tokenizer=_special_tokens(tokenizer_model))
    with output_directory(output_dir, force=force, inputs=(load_dir,)) as temporary:
        with _quiet_transformers():
            model.save_pretrained(str(temporary), safe_serialization=True)
        if tokenizer_model is not None:
            write_hf_tokenizer(Path(tokenizer_model), temporary)
    return Path(output_dir).absolute()
