"""Pretrain a GPT model with Sparsity-Accelerated Training (SAT) on megatron-core.

Takes megatron's own training flags plus the ``--sat-*`` flags (``--help`` lists both)::

    torchrun --nproc-per-node 8 pretrain_sat.py \\
        --num-layers 22 --hidden-size 2048 ... --data-path corpus_text_document \\
        --sat-omission-rate 0.5

Runs unchanged on GPUs (NCCL). Without a GPU it runs on CPU with gloo, for tests and
development (see ``megatron_sat/cpu.py``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from functools import partial

import torch

from megatron_sat import cpu, megatron_fixes, runtime, torch_fusions
from megatron_sat.arguments import add_sat_arguments, sat_config_from_args
from megatron_sat.config import SATConfig, SATConfigError
from megatron_sat.schedule import omission_rate_at
from megatron_sat.sparse_linear import attach_to_megatron_ddp
from megatron_sat.spec import get_sat_block_spec
from megatron_sat.throughput import ThroughputMeter, meter_from_args
from megatron_sat.vocab import ConversionError, check_tokenizer_fits_checkpoint

from megatron.core import mpu
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list
from megatron.core.enums import ModelType
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.rerun_state_machine import get_rerun_state_machine
from megatron.training import (get_args, get_tensorboard_writer, get_timers, get_tokenizer,
                               pretrain)
from megatron.training.argument_utils import (gpt_config_from_args,
                                              pretrain_cfg_container_from_args)
from megatron.training.arguments import (add_megatron_arguments, parse_and_validate_args,
                                         parse_args)
from megatron.training.utils import (get_blend_and_blend_per_split,
                                     is_first_or_last_pipeline_stage)

PROG = "pretrain_sat.py"


def _fail(message: str) -> None:
    """Exit like argparse does on a bad flag: usage error, status 2."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------- start-up


def _print_help() -> None:
    """Print megatron's and the SAT flags.

    Megatron's own ``--help`` crashes: some help strings contain a bare ``%``, which
    argparse treats as a format specifier. Escape those, keep ``%(default)s`` and ``%%``.
    """
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    add_sat_arguments(add_megatron_arguments(parser))
    for action in parser._actions:
        if action.help:
            action.help = re.sub(r"%%|%\(\w+\)\w|%", _escape_lone_percent, action.help)
    parser.print_help()


def _escape_lone_percent(match: re.Match) -> str:
    return "%%" if match.group() == "%" else match.group()


def _check_input_files(args: argparse.Namespace) -> None:
    """Fail early, naming the flag, when the tokenizer file or a dataset prefix's .bin or
    .idx file is missing, or when the tokenizer does not fit the checkpoint in --load."""
    model = getattr(args, "tokenizer_model", None)
    if model and not os.path.exists(model):
        _fail(f"--tokenizer-model {model}: file not found (a SentencePiece tokenizer.model, "
              "e.g. from tools/extend_vocab.py, or a Hugging Face tokenizer directory)")
    if model and os.path.isfile(model) and args.load:
        try:
            check_tokenizer_fits_checkpoint(args.load, model, args.make_vocab_size_divisible_by,
                                            args.tensor_model_parallel_size)
        except ConversionError as error:
            _fail(str(error))
    if args.mock_data or args.data_args_path or args.per_split_data_args_path:
        return
    flags = {"--data-path": args.data_path, "--train-data-path": args.train_data_path,
             "--valid-data-path": args.valid_data_path, "--test-data-path": args.test_data_path}
    if not any(flags.values()):
        _fail("no training data: give --data-path PREFIX (PREFIX.bin and PREFIX.idx, as "
              "written by megatron's preprocess_data.py) or --mock-data")
    for flag, blend in flags.items():
        for prefix in (get_blend_from_list(blend) or ([],))[0]:
            missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
            if missing:
                _fail(f"{flag} {prefix}: file not found: {', '.join(missing)}")


def _install_torch_fusions(args: argparse.Namespace) -> None:
    """Install megatron_sat.torch_fusions unless ``--no-sat-torch-fusions``; then megatron's
    gradient-accumulation fusion needs Apex, which is checked here with a clear message."""
    if args.sat_torch_fusions:
        installed = torch_fusions.apply()
        if args.rank == 0:
            print(f"[sat] torch fusions: {', '.join(installed) or 'none needed'}", flush=True)
        return
    import megatron.core.tensor_parallel.layers as tp_layers
    if args.gradient_accumulation_fusion and not tp_layers._grad_accum_fusion_available:
        _fail("--no-sat-torch-fusions: gradient-accumulation fusion then needs Apex "
              "(fused_weight_gradient_mlp_cuda), which is not installed; add "
              "--no-gradient-accumulation-fusion or drop --no-sat-torch-fusions")


def _sat_config(args: argparse.Namespace) -> SATConfig:
    """The validated SAT config; exits with status 2 on a bad setting."""
    if getattr(args, "cuda_graph_impl", "none") != "none":
        # A replayed graph runs none of the Python that draws the neurons (every replay
        # would keep the captured ones) or that chooses between writing and adding the
        # kept gradient.
        _fail(f"--cuda-graph-impl {args.cuda_graph_impl}: SAT selects neurons in Python at "
              "every forward, which a CUDA graph replay skips; use --cuda-graph-impl none")
    if args.reset_attention_mask:
        # the attention (megatron_sat.core_attention) is causal over the whole sequence
        _fail("--reset-attention-mask: SAT's attention runs causal fused kernels over the "
              "whole sequence and applies no per-document mask; drop --reset-attention-mask "
              "(documents packed into one sequence then see the earlier ones, as in Llama "
              "pre-training)")
    try:
        config = sat_config_from_args(args).validate_model(
            num_attention_heads=args.num_attention_heads,
            num_query_groups=(args.num_query_groups if args.group_query_attention
                              else args.num_attention_heads),
            ffn_hidden_size=args.ffn_hidden_size,
            tp_size=args.tensor_model_parallel_size)
    except SATConfigError as error:
        _fail(str(error))
    if config.enabled:
        for flag, on in (("--use-megatron-fsdp", getattr(args, "use_megatron_fsdp", False)),
                         ("--use-torch-fsdp2", getattr(args, "use_torch_fsdp2", False))):
            if on:
                # the kept gradients go to megatron DDP's main_grad (sparse_linear)
                _fail(f"{flag}: SAT hands its kept weight gradients to megatron DDP's "
                      "main_grad buffers, which FSDP replaces; shard the optimizer state "
                      f"with --use-distributed-optimizer instead of {flag}")
        if (getattr(args, "hybrid_context_parallel", False)
                and config.selection_scope == "iteration"):
            _fail("--hybrid-context-parallel runs a data-dependent number of forward/backward "
                  "passes per rank, which one selection per iteration (counting "
                  "micro-batches) cannot follow; add --sat-selection-scope microbatch")
    return config


# ----------------------------------------------------------------------------- model


def _block_spec(sat_config: SATConfig, model_config, vp_stage=None):
    """This pipeline stage's transformer block: SAT layers and a final norm."""
    return get_sat_block_spec(sat_config, model_config, vp_stage)


# ----------------------------------------------------------------------------- data


def _is_dataset_built_on_rank() -> bool:
    """Only the first and last pipeline stages read data, and only tensor-parallel rank 0
    of each; the others receive the batch by broadcast."""
    return (mpu.is_pipeline_first_stage(ignore_virtual=True)
            or mpu.is_pipeline_last_stage(ignore_virtual=True)
            ) and mpu.get_tensor_model_parallel_rank() == 0


def train_valid_test_datasets_provider(train_val_test_num_samples):
    """GPT datasets over ``.bin/.idx`` files (``--data-path``) or mock data."""
    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        multiple_validation_sets=args.multiple_validation_sets,
        full_validation=args.full_validation,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=get_tokenizer(),
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        allow_ambiguous_pad_tokens=args.allow_ambiguous_pad_tokens,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=False,  # refused in _sat_config
        eod_mask_loss=args.eod_mask_loss,
        # SAT's attention is causal on fused kernels and reads no mask: building one
        # ([micro-batch, 1, s, s] booleans, 64 MiB at 16 x 2048) and copying it to the GPU
        # would cost the host and 1.2 ms of every TinyLlama micro-batch on an H100
        create_attention_mask=False,
    )
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(dataset_type, train_val_test_num_samples,
                                         _is_dataset_built_on_rank, config).build()


# Every rank calls the provider: the dataset builder synchronises all ranks internally.
train_valid_test_datasets_provider.is_distributed = True


# ----------------------------------------------------------------------------- step


BATCH_KEYS = {"tokens": torch.int64, "labels": torch.int64, "position_ids": torch.int64,
              "loss_mask": torch.float32}


def _get_batch(data_iterator, vp_stage=None, training: bool = True) -> dict:
    """This micro-batch on every tensor-parallel rank (read on rank 0, broadcast).

    Without a host synchronisation: the tensors are copied to the GPU asynchronously
    (megatron's loader pins them) and broadcast with the shapes every rank knows,
    [micro-batch, sequence], the micro-batch being ``--eval-micro-batch-size`` in evaluation.
    megatron's ``broadcast_data`` instead exchanges the shapes through the GPU and copies
    synchronously, so the host waits for the previous micro-batch's backward to finish
    and the GPU then idles while the host issues the forward (docs/performance.md).
    """
    if not is_first_or_last_pipeline_stage(vp_stage):
        return {}
    args = get_args()
    shape = (args.micro_batch_size if training else args.eval_micro_batch_size,
             args.seq_length)
    shapes = {key: (shape, dtype) for key, dtype in BATCH_KEYS.items()}
    device = torch.cuda.current_device()
    group = mpu.get_tensor_model_parallel_group()
    if mpu.get_tensor_model_parallel_rank() == 0:
        data = next(data_iterator)
        batch = {}
        for key, (size, dtype) in shapes.items():
            if tuple(data[key].shape) != size:
                # the other tensor-parallel ranks wait in the broadcast until they time out
                raise ValueError(f"batch '{key}' has shape {tuple(data[key].shape)}, expected "
                                 f"{size} from --micro-batch-size (--eval-micro-batch-size "
                                 f"in evaluation) and --seq-length")
            batch[key] = data[key].to(device=device, dtype=dtype, non_blocking=True)
    else:
        batch = {key: torch.empty(size, dtype=dtype, device=device)
                 for key, (size, dtype) in shapes.items()}
    if mpu.get_tensor_model_parallel_world_size() > 1:
        source = torch.distributed.get_process_group_ranks(group)[0]
        for key in shapes:
            torch.distributed.broadcast(batch[key], source, group=group)
    return batch


class IterationLosses:
    """megatron's NaN check of the forward loss (``--check-for-nan-in-loss-and-grad``),
    once per training iteration instead of once per micro-batch.

    The check reads the loss on the host, which waits for the GPU; megatron's own
    ``pretrain_gpt.py`` does it in every micro-batch, and after each such wait the GPU
    idles while the host issues the next kernels (docs/performance.md). Here the losses of
    an iteration are kept on the GPU and their sum -- NaN if any is -- is checked at the
    iteration's last micro-batch, still inside the forward-backward pass, so megatron's
    rerun state machine can replay the iteration as before.
    """

    def __init__(self):
        self.pending: list[torch.Tensor] = []
        self.iteration: int | None = None

    def add(self, loss: torch.Tensor, micro_batches: int,
            iteration: int | None = None) -> torch.Tensor | None:
        """Keep ``loss``; at the ``micro_batches``-th of ``iteration``, return the sum of all
        and start over (a new iteration also starts over)."""
        if iteration != self.iteration:
            self.pending, self.iteration = [], iteration
        self.pending.append(loss.detach())
        if len(self.pending) < micro_batches:
            return None
        total = torch.stack(self.pending).sum()
        self.pending = []
        return total


class _Run:
    """What the step functions need beyond megatron's args: set once in :func:`main`."""

    sat_config: SATConfig
    meter: ThroughputMeter | None = None  # built at the first training forward
    losses = IterationLosses()


def _start_micro_batch(args: argparse.Namespace) -> float:
    """Tell SAT the iteration being trained; returns its omission rate (Eq. 11)."""
    runtime.set_iteration(args.curr_iteration)
    runtime.set_micro_batches(get_num_microbatches())
    rate = omission_rate_at(_Run.sat_config, args.curr_iteration)
    if _Run.meter is None:  # needs the padded vocabulary and the TensorBoard writer
        _Run.meter = meter_from_args(args, _Run.sat_config, get_tensorboard_writer())
    _Run.meter.start_iteration(args.curr_iteration, rate)
    return rate


def loss_func(loss_mask: torch.Tensor, rate: float | None, output_tensor: torch.Tensor):
    """Masked language-model loss of one micro-batch.

    Returns ``(loss summed over tokens, token count, report)``: megatron divides by the
    token count itself. Each report entry is ``[sum, count]``; megatron sums both over
    micro-batches and data-parallel ranks and logs ``sum / count``.
    """
    args = get_args()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(output_tensor.view(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    if args.check_for_nan_in_loss_and_grad:
        # training: once per iteration (IterationLosses); evaluation: every micro-batch
        checked = loss if rate is None else _Run.losses.add(
            loss, get_num_microbatches(), args.curr_iteration)
        if checked is not None:
            get_rerun_state_machine().validate_result(
                result=checked, rejection_func=torch.isnan, tolerance=0.0, fatal=True,
                message="found NaN in local forward loss calculation"
                + ("" if rate is None else " (summed over the iteration's micro-batches)"))
    count = num_tokens.float().view(1)
    report = {"lm loss": torch.cat([loss.detach().view(1), count])}
    if rate is not None:
        # Token-weighted like the loss, so the logged value is the rate itself.
        report["sat omission rate"] = torch.cat([rate * count, count])
    return loss, num_tokens, report


def forward_step(data_iterator, model, vp_stage=None):
    """One micro-batch forward; megatron's schedule applies ``loss_func`` to the output.

    ``get_args().curr_iteration`` is the 0-based iteration being computed.
    """
    rate = _start_micro_batch(get_args()) if model.training else None
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = _get_batch(data_iterator, vp_stage, model.training)
    timers("batch-generator").stop()
    output_tensor = model(batch.get("tokens"), batch.get("position_ids"), None,
                          labels=batch.get("labels"))
    return output_tensor, partial(loss_func, batch.get("loss_mask"), rate)


# ----------------------------------------------------------------------------- main


def main() -> None:
    if {"-h", "--help"} & set(sys.argv[1:]):
        _print_help()
        return
    cpu.enable_cpu_mode()
    megatron_fixes.apply()
    # Megatron's parser has no side effects; check the data before it validates and
    # builds the tokenizer, writers and process groups.
    _check_input_files(parse_args(add_sat_arguments))
    args = parse_and_validate_args(add_sat_arguments)
    sat_config = _sat_config(args)
    _install_torch_fusions(args)
    _Run.sat_config = sat_config
    runtime.set_dummy_wgrad(args.overlap_grad_reduce)
    attach_to_megatron_ddp()
    model_config = gpt_config_from_args(args)
    model_config.transformer_layer_spec = partial(_block_spec, sat_config)
    pretrain(pretrain_cfg_container_from_args(args, model_config),
             train_valid_test_datasets_provider, ModelType.encoder_or_decoder, forward_step)


if __name__ == "__main__":
    main()
