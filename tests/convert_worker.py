"""torchrun worker: logits of converted checkpoints loaded by megatron at several layouts.

Run as ``torchrun --nproc-per-node 2 tests/convert_worker.py SPEC.json``. SPEC lists cases
``{"load": ROOT, "flags": [...], "vocab_size": V, "tokens": [[...]], "layouts": [[tp, pp],
...], "out": PREFIX}``. For each case and layout the worker does what ``pretrain_sat.py``
does, with megatron's own code and none of ``megatron_sat.convert``:

* megatron's parser and ``validate_args`` read the printed continue-training ``flags``;
* ``GPTModelBuilder`` builds this rank's stage of the SAT model (r = 0) on CPU;
* megatron's ``load_checkpoint`` (``pretrain()``'s) reads ``ROOT``;
* the forward runs through the pipeline stages (activations sent rank to rank) and the
  vocabulary shards are gathered over the tensor-parallel group.

Rank 0 saves the logits cut to the first V columns as ``PREFIX-tp{tp}-pp{pp}.pt``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from functools import partial

import torch
import torch.distributed as dist

from megatron_sat.cpu import enable_cpu_mode

enable_cpu_mode()

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.num_microbatches_calculator import (  # noqa: E402
    destroy_num_microbatches_calculator, init_num_microbatches_calculator)
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding  # noqa
from megatron.training import global_vars  # noqa: E402
from megatron.training.argument_utils import gpt_config_from_args  # noqa: E402
from megatron.training.arguments import add_megatron_arguments, validate_args  # noqa: E402
from megatron.training.checkpointing import load_checkpoint  # noqa: E402
from megatron.training.models.gpt import GPTModelBuilder  # noqa: E402

from megatron_sat import megatron_fixes  # noqa: E402
from megatron_sat.arguments import add_sat_arguments  # noqa: E402
from megatron_sat.config import SATConfig  # noqa: E402
from megatron_sat.spec import get_sat_block_spec  # noqa: E402


def parse(flags: list[str], case: dict, tp: int, pp: int) -> argparse.Namespace:
    parser = add_sat_arguments(add_megatron_arguments(argparse.ArgumentParser()))
    seq = len(case["tokens"][0])
    args = parser.parse_args(flags + [
        "--load", case["load"], "--tensor-model-parallel-size", str(tp),
        "--pipeline-model-parallel-size", str(pp), "--seq-length", str(seq),
        "--micro-batch-size", str(len(case["tokens"])), "--use-cpu-initialization",
        "--no-rope-fusion", "--no-persist-layer-norm", "--no-gradient-accumulation-fusion",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", str(case["vocab_size"]),
        "--attention-dropout", "0", "--hidden-dropout", "0"])
    args.rank, args.world_size = dist.get_rank(), dist.get_world_size()
    with contextlib.redirect_stdout(io.StringIO()):
        validate_args(args, {})
    args.padded_vocab_size = vocab_size_with_padding(case["vocab_size"], args,
                                                     logging_enabled=False)
    return args


def logits(case: dict, tp: int, pp: int) -> torch.Tensor | None:
    ps.initialize_model_parallel(tp, pp)
    args = parse(case["flags"], case, tp, pp)
    global_vars.set_args(args)
    init_num_microbatches_calculator(args.rank, None, args.global_batch_size,
                                     args.micro_batch_size, args.data_parallel_size)
    config = gpt_config_from_args(args)
    config.transformer_layer_spec = partial(get_sat_block_spec, SATConfig())
    model = GPTModelBuilder(config).build_model(ProcessGroupCollection.use_mpu_process_groups())
    model.eval()
    with contextlib.redirect_stdout(io.StringIO()):
        load_checkpoint([model], None, None)
    tokens = torch.tensor(case["tokens"])
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    stage, stages = ps.get_pipeline_model_parallel_rank(), pp
    group = ps.get_pipeline_model_parallel_group()
    ranks = dist.get_process_group_ranks(group)
    with torch.no_grad():
        if stage > 0:  # hidden states [s, b, h] from the previous stage
            hidden = torch.empty(tokens.shape[1], tokens.shape[0], args.hidden_size)
            dist.recv(hidden, src=ranks[stage - 1], group=group)
            model.set_input_tensor(hidden)
        out = model(tokens, positions, None)
        if stage < stages - 1:
            dist.send(out.contiguous(), dst=ranks[stage + 1], group=group)
            out = None
    if out is not None:
        shards = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(shards, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        out = torch.cat(shards, dim=-1)[..., :case["vocab_size"]]
    destroy_num_microbatches_calculator()
    ps.destroy_model_parallel()
    return out


def main() -> None:
    megatron_fixes.apply()
    dist.init_process_group(backend="gloo")
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    for case in cases:
        for tp, pp in case["layouts"]:
            out = logits(case, tp, pp)
            last_stage_first_rank = dist.get_rank() == dist.get_world_size() - tp if pp > 1 \
                else dist.get_rank() == 0
            if out is not None and last_stage_first_rank:
                torch.save(out, f"{case['out']}-tp{tp}-pp{pp}.pt")
            dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
