"""Read and write megatron-core ``torch_dist`` checkpoints in one CPU process, outside a job.

The format is what ``pretrain_sat.py --save`` writes with megatron's default
``--ckpt-format torch_dist``:

* a root directory with ``latest_checkpointed_iteration.txt`` (an iteration number or
  ``release``) and one directory per checkpoint (``iter_0000100`` or ``release``) holding a
  ``torch.distributed.checkpoint`` store plus megatron's ``metadata.json``;
* every tensor is stored at its *global* shape, whatever TP/PP split wrote it (megatron
  reshards on load); the per-layer tensors share one key under ``decoder.layers.``, stacked
  on a leading layer axis; the arguments of the run are in the stored common state.

Reading needs no process group (``torch.distributed.checkpoint`` in no-dist mode, one key at
a time). Writing builds ``pretrain_sat.py``'s model on the ``meta`` device, so that its
``sharded_state_dict`` gives the exact keys, sharding and extra state, points it at the
given tensors and saves with megatron's ``dist_checkpointing`` in a one-rank gloo group.

Tensors are passed as ``{key: tensor}``, with a list of per-layer tensors for the stacked
``decoder.layers.`` keys.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Union

import torch

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
LAYERS = "decoder.layers."  # keys of per-layer tensors, stacked on a leading layer axis

Tensors = Mapping[str, Union[torch.Tensor, list]]


class ConversionError(Exception):
    """Bad input: the message names the flag and the fix. Nothing has been written."""


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Megatron prints its argument dump and progress to stdout, and logs deprecation
    notices (GPTModel, its own async save) that concern training code: keep a tool's output
    readable."""
    megatron_log = logging.getLogger("megatron.core")
    level = megatron_log.level
    megatron_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        megatron_log.setLevel(level)


@contextlib.contextmanager
def _single_process_reads() -> Iterator[None]:
    """``torch.distributed.checkpoint`` warns on every no-dist read that it assumes a single
    process, which is the point here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message="The argument order of load")
        yield


@dataclass
class MegatronCheckpoint:
    """The current checkpoint (the tracker's iteration) of a checkpoint root."""

    root: Path
    directory: Path
    args: argparse.Namespace

    @classmethod
    def open(cls, root: str | os.PathLike, flag: str = "--load-dir") -> "MegatronCheckpoint":
        from megatron.core import dist_checkpointing

        directory = cls.locate(root, flag)
        with quiet_stdout(), _single_process_reads():
            args = dist_checkpointing.load_common_state_dict(str(directory))["args"]
        return cls(Path(root), directory, args)

    @staticmethod
    def locate(root: str | os.PathLike, flag: str = "--load-dir") -> Path:
        """The directory of the tracker's torch_dist checkpoint under ``root``."""
        root = Path(root)
        tracker = root / TRACKER
        if not tracker.is_file():
            raise ConversionError(f"{flag} {root}: no {TRACKER}; give the checkpoint root that "
                                  "pretrain_sat.py --save (or tools/convert_checkpoint.py) wrote")
        name = tracker.read_text().strip()
        directory = root / (RELEASE if name == RELEASE else f"iter_{int(name):07d}")
        if not (directory / "metadata.json").is_file():
            raise ConversionError(f"{flag} {root}: {directory.name}/metadata.json not found "
                                  "(the tracker names a missing or incomplete checkpoint)")
        backend = json.loads((directory / "metadata.json").read_text()).get("sharded_backend")
        if backend != "torch_dist":
            raise ConversionError(f"{flag} {root}: checkpoint format {backend!r}; only "
                                  "--ckpt-format torch_dist (megatron's default) is supported")
        return directory

    def tensor(self, key: str) -> torch.Tensor:
        """One stored tensor, at its global shape and stored dtype."""
        import torch.distributed.checkpoint as dcp

        reader = dcp.FileSystemReader(str(self.directory))
        meta = reader.read_metadata().state_dict_metadata.get(key)
        if meta is None:
            raise ConversionError(f"--load-dir {self.root}: tensor {key} is not in "
                                  f"{self.directory.name}")
        state = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)}
        with _single_process_reads():
            dcp.load(state, storage_reader=reader, no_dist=True)
        return state[key]

    def read(self, keys: list[str]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """``keys`` as :data:`Tensors`: stacked layer keys split into per-layer views."""
        return {key: list(self.tensor(key).unbind(0)) if key.startswith(LAYERS)
                else self.tensor(key) for key in keys}


def pretrain_args(flags: list[str]) -> argparse.Namespace:
    """The arguments ``pretrain_sat.py`` would parse and validate from ``flags``, as its
    checkpoints store them (validated as one process: the caller records TP/PP)."""
    from megatron.training.arguments import add_megatron_arguments, validate_args

    from megatron_sat.arguments import add_sat_arguments

    parser = add_sat_arguments(add_megatron_arguments(
        argparse.ArgumentParser(allow_abbrev=False)))
    args = parser.parse_args(flags)
    args.rank, args.world_size = 0, 1
    with quiet_stdout():
        validate_args(args, {})
    return args


def write_release(root: Path, args: argparse.Namespace, tensors: Tensors) -> None:
    """A release checkpoint of ``tensors`` (at the shapes ``args`` gives, vocabulary padded)
    under the existing, empty ``root``: ``pretrain_sat.py --load root`` reads the weights and
    starts at iteration 0 with a fresh optimizer, RNG and LR schedule."""
    from megatron.core import dist_checkpointing

    with _single_rank_megatron(), _in_process_save(), quiet_stdout():
        sharded = _model_skeleton(args).sharded_state_dict()
        _point_at(sharded, tensors)
        (root / RELEASE).mkdir()
        dist_checkpointing.save(
            {"model": sharded, "args": args, "checkpoint_version": 3.0, "iteration": 0},
            str(root / RELEASE),
            # what pretrain_sat.py records (megatron's _build_sharded_state_dict_metadata)
            content_metadata={"singleton_local_shards": False,
                              "chained_optim_avoid_prefix": True})
    (root / TRACKER).write_text(RELEASE)


@contextlib.contextmanager
def _single_rank_megatron() -> Iterator[None]:
    """A one-process gloo group and megatron's TP = PP = 1 state, torn down on exit."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.is_initialized():
        raise ConversionError("writing a megatron checkpoint needs its own one-process group; "
                              "run the conversion outside torch.distributed")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@contextlib.contextmanager
def _in_process_save() -> Iterator[None]:
    """Megatron's synchronous save, entirely in this process and without a GPU.

    It writes in threads of this process but collects their results through a
    ``multiprocessing`` Manager queue, whose server process is *spawned* (re-importing
    ``__main__``: slow, and fails in unguarded scripts); a thread queue does the same job.
    It also calls ``torch.cuda.synchronize()`` after staging the tensors to the host and
    all-reduces a status flag on ``torch.cuda.current_device()``: here every tensor is on
    the CPU and the group is gloo, so there is nothing to wait for and the flag belongs on
    the CPU (which also makes this work without a GPU).
    """
    import queue
    from unittest import mock

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(filesystem_async, "_results_queue", queue.Queue()))
        stack.enter_context(mock.patch.object(torch.cuda, "synchronize", lambda *a: None))
        stack.enter_context(mock.patch.object(torch.cuda, "current_device", lambda: "cpu"))
        yield


def _model_skeleton(args: argparse.Namespace):
    """``pretrain_sat.py``'s model (SAT layer spec, r = 0) for ``args``, on the meta device
    and unsplit: its ``sharded_state_dict`` has the global checkpoint layout."""
    from functools import partial

    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.models.gpt import GPTModelBuilder

    from megatron_sat.config import SATConfig
    from megatron_sat.spec import get_sat_block_spec

    build = argparse.Namespace(**vars(args))
    build.tensor_model_parallel_size = build.pipeline_model_parallel_size = 1
    build.use_cpu_initialization, build.perform_initialization = True, False
    config = gpt_config_from_args(build)
    config.transformer_layer_spec = partial(get_sat_block_spec, SATConfig())
    with torch.device("meta"):
        return GPTModelBuilder(config).build_model(ProcessGroupCollection.use_mpu_process_groups())


def _point_at(sharded: dict, tensors: Tensors) -> None:
    """Point every ShardedTensor of a skeleton's state dict at its slice of ``tensors``
    (for a stacked key, the layer given by its first offset)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded)  # SwiGLU fc1: its gate and up halves become two shards
    for sh in nested_values(sharded):
        if not isinstance(sh, ShardedTensor):
            continue  # ShardedObjects (empty ``_extra_state``) are saved as they are
        source, offsets = tensors[sh.key], sh.global_offset
        if sh.key.startswith(LAYERS):
            source, offsets = source[offsets[0]], offsets[1:]
        data = source[tuple(slice(o, o + n) for o, n in zip(offsets, sh.local_shape))]
        if source.dim() != len(sh.local_shape) or tuple(data.shape) != tuple(sh.local_shape):
            raise AssertionError(f"{sh.key}: tensor {tuple(source.shape)} does not fit the "
                                 f"model's {sh.global_shape}")
        sh.data = data
