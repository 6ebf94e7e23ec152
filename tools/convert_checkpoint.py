#!/usr/bin/env python3
"""Convert Llama checkpoints between Hugging Face and pretrain_sat.py, and resize the
vocabulary for an extended tokenizer. CPU only; no GPU or torchrun needed.

    # Hugging Face Llama -> megatron (optionally extending the vocabulary on the way)
    python tools/convert_checkpoint.py hf-to-megatron --hf-dir llama-2-7b-hf \\
        --output-dir ckpt/llama2-7b --tp 2 --pp 1 \\
        [--old-tokenizer-model llama/tokenizer.model --new-tokenizer-model zh/tokenizer.model]

    # megatron (a pretrain_sat.py --save root) -> Hugging Face (for lm-eval-harness)
    python tools/convert_checkpoint.py megatron-to-hf --load-dir runs/cpt/checkpoint \\
        --output-dir hf/cpt --tokenizer-model zh/tokenizer.model

    # megatron -> megatron with the vocabulary of an extended tokenizer
    python tools/convert_checkpoint.py resize --load-dir ckpt/llama2-7b \\
        --output-dir ckpt/llama2-7b-zh --old-tokenizer-model llama/tokenizer.model \\
        --new-tokenizer-model zh/tokenizer.model

Megatron outputs are release checkpoints in megatron's default torch_dist format; the
tool prints the pretrain_sat.py flags that continue training from them. Outputs are
written beside the target and moved into place at the end; an existing --output-dir is
refused unless --force. Formats, mapping and resize rule: docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROG = "convert_checkpoint.py"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    commands = parser.add_subparsers(dest="command", required=True)

    def output(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--output-dir", required=True, type=Path,
                         help="directory to create (must not exist, unless --force)")
        sub.add_argument("--force", action="store_true",
                         help="replace an existing --output-dir (never an input)")

    def tokenizers(sub: argparse.ArgumentParser, required: bool) -> None:
        sub.add_argument("--old-tokenizer-model", type=Path, required=required,
                         help="SentencePiece model of the checkpoint's vocabulary")
        sub.add_argument("--new-tokenizer-model", type=Path, required=required,
                         help="SentencePiece model extending it (old ids kept, pieces "
                              "appended); new rows = mean of their old pieces' rows")
        sub.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                         help="megatron's vocabulary padding unit (times TP); default 128")

    hf = commands.add_parser("hf-to-megatron", help="Hugging Face Llama -> megatron")
    hf.add_argument("--hf-dir", required=True, type=Path,
                    help="Hugging Face model directory: config.json and *.safetensors")
    hf.add_argument("--tp", type=int, default=1, help="tensor-parallel size to train at")
    hf.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to train at")
    hf.add_argument("--dtype", choices=sorted(DTYPES),
                    help="stored precision (default: as in the safetensors files)")
    tokenizers(hf, required=False)
    output(hf)

    back = commands.add_parser("megatron-to-hf", help="megatron -> Hugging Face Llama")
    back.add_argument("--load-dir", required=True, type=Path,
                      help="checkpoint root (holds latest_checkpointed_iteration.txt)")
    back.add_argument("--tokenizer-model", type=Path,
                      help="SentencePiece model to ship with the model; also fixes the "
                           "unpadded vocabulary size")
    output(back)

    resize = commands.add_parser("resize", help="megatron -> megatron, extended vocabulary")
    resize.add_argument("--load-dir", required=True, type=Path,
                        help="checkpoint root (holds latest_checkpointed_iteration.txt)")
    resize.add_argument("--tp", type=int,
                        help="tensor-parallel size to pad for (default: the checkpoint's)")
    tokenizers(resize, required=True)
    output(resize)
    return parser.parse_args(argv)


def _print_continue_training(result) -> None:
    s = result.shape
    print(f"wrote {result.output_dir}: {s.num_layers} layers, hidden {s.hidden_size}, "
          f"{s.num_heads} heads / {s.num_groups} kv groups, vocabulary {s.vocab_size} "
          f"padded to {result.padded_vocab_size} (release checkpoint, torch_dist)")
    print("\ncontinue training with (add data, batch, --seq-length <= "
          f"{s.max_position_embeddings}, learning rate and the --sat-* flags):\n")
    print("  torchrun --nproc-per-node N pretrain_sat.py \\\n    "
          + shlex.join(result.continue_training_flags()))
    print("\n  without Transformer Engine/apex also: --no-rope-fusion --no-persist-layer-norm "
          "--no-gradient-accumulation-fusion\n  a release checkpoint starts at iteration 0 "
          "with a fresh optimizer; no --finetune / --no-load-optim needed")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # megatron warns at import about optional GPU packages (apex, Transformer Engine)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    import torch

    from megatron_sat import convert

    try:
        if args.command == "hf-to-megatron":
            result = convert.hf_to_megatron(
                args.hf_dir, args.output_dir, tp=args.tp, pp=args.pp,
                divisible_by=args.make_vocab_size_divisible_by,
                old_tokenizer_model=args.old_tokenizer_model,
                new_tokenizer_model=args.new_tokenizer_model,
                dtype=getattr(torch, DTYPES[args.dtype]) if args.dtype else None,
                force=args.force)
            _print_continue_training(result)
        elif args.command == "resize":
            result = convert.resize_megatron(
                args.load_dir, args.output_dir, old_tokenizer_model=args.old_tokenizer_model,
                new_tokenizer_model=args.new_tokenizer_model,
                divisible_by=args.make_vocab_size_divisible_by, tp=args.tp, force=args.force)
            _print_continue_training(result)
        else:
            out = convert.megatron_to_hf(args.load_dir, args.output_dir,
                                         tokenizer_model=args.tokenizer_model, force=args.force)
            print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it")
    except convert.ConversionError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
