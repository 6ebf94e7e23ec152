"""Multi-GPU correctness and scaling of ``pretrain_sat.py``: launches, comparisons, report.

Used by ``test_multi_gpu.py`` (pytest, marker ``gpu``) and run on a GPU host by
``run_all.sh``. ``docs/multi-gpu.md`` explains the design; in short:

* **Correctness, judged in fp32.** A small Llama-shaped model trains 30 iterations in
  fp32 (no TF32) with SAT (r = 0.5, maxip, LORS from iteration 15 in 3 ladders) at the
  same global batch in every layout. Each layout's exact TensorBoard losses and gradient
  norms must match the 1-GPU run of the same configuration within :data:`TOLERANCE` over
  the run and, where both start from the same weights, within :data:`FIRST_TOLERANCE` at
  the first iteration; on GPUs and on CPU, SAT and dense alike. Data-parallel runs with
  a sparse MLP are judged over their first :data:`FLIP_WINDOW` iterations only (a top-k
  near-tie flips once DP's summation order has moved the weights by fp32 rounding). Configurations are chosen
  so that the layout cannot change which neurons are kept:

  ========================  =====================================  ====================
  configuration             why the 1-GPU run is a valid reference  layouts
  ========================  =====================================  ====================
  ``sampling`` (paper's)    the selection noise is keyed by global  PP=2, resume at TP=1
                            layer, TP rank and DP rank: PP leaves
                            all three as at 1 GPU
  ``topk``                  deterministic; DP ranks see the same    DP=2 (distributed
                            micro-batches as the 1-GPU run          optimizer)
  ``attention-topk``        heads are chosen inside each kv group,  TP=2, TP=2+SP,
                            and groups never straddle TP ranks      TP2xDP2, TP2xPP2,
                            (the MLP keeps a per-rank top-k, which  resume at TP=1
                            TP changes, so it stays dense)
  ``dense`` (r = 0)         the same model in every layout          TP=2, TP=2+SP, PP=2,
                                                                    DP=2, resumes
  ``topk`` + overlap        as ``topk``; the SAT block's pre-hook   DP=2 (distributed
  (``--overlap-grad-reduce  waits for the weights it scores; also   optimizer), a bucket
  --overlap-param-gather``) judged against DP=2 without overlap     per weight
  ``iteration-sampling``,   one selection per iteration: TP and PP  PP=2 (sampling),
  ``iteration-attention-    ranks see the 1-GPU run's micro-        TP=2+SP (attention
  topk``                    batches, so the first draws for all     top-k)
  ========================  =====================================  ====================

  Every other configuration draws per micro-batch (``--sat-selection-scope microbatch``):
  with one selection per iteration a DP rank scores its own first micro-batch, the single
  GPU the iteration's first, so DP layouts choose otherwise by design.

  PP runs start from the 1-GPU run's checkpoint (megatron seeds each pipeline stage's
  initialisation differently). Checkpoints written at TP=2, PP=2 (and TP2xPP2) resume at
  TP=1. A control, randomly chosen neurons (``--sat-metric uniform``) against maxip top-k
  at 1 GPU, must *fail* both tolerances: the comparison can see a wrong selection.
* **bf16 twins, reported.** On GPUs the main launches (every one that does not resume a
  layout's checkpoint) also run in bf16. bf16 GEMM splits and reduction orders differ
  between layouts and training amplifies that (SAT more, through near-ties that flip), so
  their drift from the 1-GPU bf16 run is reported, not judged, next to two noise floors
  measured at 1 GPU: micro-batch 1 against 2 (same global batch; for SAT configurations
  this also changes the selection, which is per micro-batch) and bf16 against fp32. A
  bf16 twin fails only if it crashes or logs wrong iterations or rates.
* **Scaling (bf16).** A larger model runs at 1 GPU, DP=2, TP=2 (+SP), DP=4 and TP2xDP2.
  One launch measures SAT and dense: LORS with one ladder keeps r = 0.5 up to half of the
  iterations and trains densely after. Tokens/s per GPU at N GPUs over tokens/s at 1 GPU
  is the efficiency.

Launches whose layouts need more GPUs than are visible are skipped. Correctness launches
share the GPUs (at most ``GPU_TEST_PROCESSES`` processes at once); timing launches run
alone. Each launch is killed after ``Sizes.timeout`` seconds and the whole suite stops at
``GPU_TEST_DEADLINE`` seconds; ``results.json`` is rewritten after every launch, so it
exists even if the suite is killed. ``GPU_TEST_CPU=1`` runs the same suite on CPU (gloo,
megatron_sat.cpu) at toy size as if ``GPU_TEST_CPU_DEVICES`` (default 2) GPUs were
visible: a check of this machinery, not of GPUs. ``python3 multi_gpu.py`` prints the
summary of ``$OUT/results.json`` again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: _launch

from _launch import MOCK_DATA, REPO, SCRIPT, TINY_GPT, TRAINING, read_tensorboard  # noqa: E402

sys.path.insert(0, str(REPO))  # megatron_sat, also where it is not installed (GPU hosts)

from megatron_sat.config import SATConfig  # noqa: E402
from megatron_sat.schedule import omission_rate_at  # noqa: E402

# fp32 runs, per-iteration relative difference |x - x_ref| / |x_ref|. Why these values:
# docs/multi-gpu.md ("The criterion"). Measured at the GPU test's size in fp32 (on CPU):
# correct layouts differ by 1e-7 at iteration 1; training amplifies that about 1.3x per
# iteration (dense TP=2: 2.2e-4 by iteration 30, mean 2.9e-5), and a top-k near-tie flipped
# by rounding adds a step (DP=2 top-k: 4.1e-4, mean 7e-5); the control (random neurons)
# differs by 5.9e-4 at iteration 1 and 1.2e-1 (mean 4.4e-2) over the run.
# Over the compared iterations: (largest allowed, largest allowed mean).
TOLERANCE = {"lm loss": (5e-3, 5e-4), "grad-norm": (2e-2, 5e-3)}
# At the first compared iteration, when run and reference start from the same weights:
# nothing has been amplified yet (measured: loss 1e-7, gradient norm 3e-5; control: loss
# 5.9e-4, gradient norm 4.5e-2), so a wrong shard, reduction or selection shows here.
FIRST_TOLERANCE = {"lm loss": 1e-5, "grad-norm": 1e-3}
# Data-parallel layouts with an MLP top-k or sampling (``Check.flip_prone``) sum the
# gradients in another order than 1 GPU's micro-batch accumulation. That fp32 rounding
# moves the weights by ~1e-7 and sooner or later flips a near-tie among the ~1,400 MLP
# channels, after which the two runs train different sub-networks: on 4 H200s DP=2 top-k
# was bitwise equal for 3 iterations, within 1.2e-7 at iterations 4-5, then jumped to
# 4.4e-3 at iteration 12 (dense DP=2: 1.4e-6 over all 30). Such checks are judged over
# their first FLIP_WINDOW iterations against FIRST_TOLERANCE; the rest is reported.
FLIP_WINDOW = 5
LEARNS = 0.9  # the control's runs learn: their last loss is below this fraction of the first
# NVLink multicast stays off unless set otherwise (shared hosts; see docs/multi-gpu.md).
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}
# fp32 launches: cuBLAS and cuDNN ignore any request for TF32 (megatron-core and
# megatron_sat never make one; torch's default is off). TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1,
# which would turn torch's default on, is removed from their environment.
NO_TF32 = {"NVIDIA_TF32_OVERRIDE": "0"}
PRECISIONS = ("fp32", "bf16")  # fp32: judged; bf16: reported next to its noise floor


def cpu_mode() -> bool:
    return os.environ.get("GPU_TEST_CPU") == "1"


class SuiteError(ValueError):
    """A bad GPU_TEST_* setting; the message names the variable and the fix."""


def _int_env(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name) or str(default)
    if not raw.isdigit() or int(raw) < minimum:
        raise SuiteError(f"{name}={raw!r}: expected a whole number >= {minimum}")
    return int(raw)


def _set_env(name: str, default: str, allowed) -> set[str]:
    raw = os.environ.get(name) or default
    values = {v.strip() for v in raw.split(",") if v.strip()}
    unknown = sorted(values - set(allowed))
    if unknown or not values:
        raise SuiteError(f"{name}={raw!r}: unknown {unknown or 'empty list'}; use a "
                         f"comma-separated list of {', '.join(allowed)}")
    return values


def visible_devices() -> int:
    """GPUs this suite may use; ``GPU_TEST_CPU_DEVICES`` (default 2) pretend ones in CPU mode."""
    if cpu_mode():
        return _int_env("GPU_TEST_CPU_DEVICES", 2)
    import torch

    return torch.cuda.device_count()


def device_name() -> str:
    if cpu_mode():
        return "cpu (gloo), GPU_TEST_CPU=1"
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


# ----------------------------------------------------------------------------- what runs


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between a GPU host and the CPU rehearsal."""

    model: tuple[str, ...]  # correctness model (appended to TINY_GPT: the last value wins)
    iters: int  # T of the correctness runs
    lr: str
    first_checkpoint: int  # written by the 1-GPU and TP=2 runs, read by PP runs and resumes
    second_checkpoint: int  # written by the PP runs, read by resumes
    scale_model: tuple[str, ...]
    scale_micro_batch: int
    scale_iters: int  # half SAT, half dense
    warmup: int  # iterations of each half left out of the timing
    timeout: int  # seconds per launch
    deadline: int  # seconds for the whole suite (GPU_TEST_DEADLINE overrides)


GPU = Sizes(
    # 4 layers, d 512, 8 heads in 4 kv groups, SwiGLU ffn 1408, 512 tokens, vocab 8192 (a
    # multiple of 128 x 4, so the padded vocabulary, and with it the initial weights, is
    # the same at TP 1, 2 and 4).
    model=("--num-layers", "4", "--hidden-size", "512", "--ffn-hidden-size", "1408",
           "--num-attention-heads", "8", "--num-query-groups", "4", "--seq-length", "512",
           "--max-position-embeddings", "512", "--vocab-size", "8192"),
    iters=30, lr="1e-3", first_checkpoint=10, second_checkpoint=15,
    # TinyLlama's layer (d 2048, 32 heads in 4 kv groups, ffn 5632) x 8, 4 x 2048 tokens.
    scale_model=("--num-layers", "8", "--hidden-size", "2048", "--ffn-hidden-size", "5632",
                 "--num-attention-heads", "32", "--num-query-groups", "4",
                 "--seq-length", "2048", "--max-position-embeddings", "2048",
                 "--vocab-size", "32000"),
    # A healthy launch takes 30-70 s; the default suite an estimated 290-380 s on 4 H200s
    # (docs/multi-gpu.md). The deadline leaves a 600 s command 120 s for installing
    # megatron-core, pytest's start and the report.
    scale_micro_batch=4, scale_iters=24, warmup=3, timeout=180, deadline=480)
CPU = Sizes(model=(), iters=12, lr="1e-3", first_checkpoint=4, second_checkpoint=6,
            scale_model=(), scale_micro_batch=2, scale_iters=8, warmup=1, timeout=900,
            deadline=7200)


def sizes() -> Sizes:
    return CPU if cpu_mode() else GPU


def _checkpoint_iteration(s: Sizes, which: str) -> int:
    return {"first": s.first_checkpoint, "second": s.second_checkpoint}[which]


def _lors(s: Sizes) -> SATConfig:
    return SATConfig(omission_rate=0.5, lors_start=s.iters // 2, lors_ladders=3,
                     train_iters=s.iters).validate()


# Every launch draws per micro-batch unless its config says otherwise: the scope in which
# each layout has an exact 1-GPU equivalent. With one selection per iteration (the
# default of pretrain_sat.py) a data-parallel rank scores its own first micro-batch and a
# single GPU the iteration's first, so DP layouts choose otherwise by design; TP and PP
# ranks see the same micro-batches, so the "iteration-*" configs check them in that scope.
CONFIGS = {
    "sampling": ["--sat-selection", "sampling"],
    "topk": ["--sat-selection", "topk"],
    "attention-topk": ["--sat-selection", "topk", "--sat-modules", "attention"],
    "uniform": ["--sat-metric", "uniform"],  # random neurons: the control
    "iteration-sampling": ["--sat-selection", "sampling", "--sat-selection-scope", "iteration"],
    "iteration-attention-topk": ["--sat-selection", "topk", "--sat-modules", "attention",
                                 "--sat-selection-scope", "iteration"],
    "dense": ["--sat-omission-rate", "0"],  # every layout computes the same model
}


@dataclass(frozen=True)
class Launch:
    """One ``torchrun pretrain_sat.py`` of the correctness suite."""

    name: str
    config: str  # key of CONFIGS
    tp: int = 1
    pp: int = 1
    dp: int = 1
    sp: bool = False
    distopt: bool = False
    overlap: bool = False  # --overlap-grad-reduce --overlap-param-gather (with distopt)
    load: tuple[str, str] | None = None  # (launch, "first"|"second" checkpoint) to start from
    save: str | None = None  # "first" | "second": write checkpoints at that interval
    precision: str = "fp32"  # "fp32" (judged) | "bf16" (reported)
    micro_batch: int = 2  # 1 only for the bf16 noise floors

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp


# The judged fp32 runs. Reference runs first; every other run is compared with the 1-GPU
# run of its config (and a resumed run also with the run that wrote its checkpoint).
FP32_LAUNCHES = [
    Launch("1gpu-sampling", "sampling", save="first"),
    Launch("1gpu-attention-topk", "attention-topk", save="first"),
    Launch("1gpu-dense", "dense", save="first"),
    Launch("1gpu-topk", "topk"),
    Launch("1gpu-uniform", "uniform"),
    Launch("1gpu-iteration-sampling", "iteration-sampling", save="first"),
    Launch("1gpu-iteration-attention-topk", "iteration-attention-topk"),
    Launch("tp2-dp2", "attention-topk", tp=2, dp=2),
    Launch("tp2-pp2", "attention-topk", tp=2, pp=2, load=("1gpu-attention-topk", "first"),
           save="second"),
    Launch("tp2", "attention-topk", tp=2, save="first"),
    Launch("tp2-sp", "attention-topk", tp=2, sp=True),
    Launch("pp2", "sampling", pp=2, load=("1gpu-sampling", "first"), save="second"),
    Launch("dp2-distopt", "topk", dp=2, distopt=True),
    # the parameter all-gather overlapped with the forward: SAT blocks score weights that
    # megatron gathers in module pre-hooks (sparse_linear.attach_to_megatron_ddp)
    Launch("dp2-distopt-overlap", "topk", dp=2, distopt=True, overlap=True),
    Launch("dense-tp2", "dense", tp=2, save="first"),
    Launch("dense-tp2-sp", "dense", tp=2, sp=True),
    Launch("dense-pp2", "dense", pp=2, load=("1gpu-dense", "first"), save="second"),
    Launch("dense-dp2-distopt", "dense", dp=2, distopt=True),
    Launch("tp2-sp-iteration", "iteration-attention-topk", tp=2, sp=True),
    Launch("pp2-iteration", "iteration-sampling", pp=2,
           load=("1gpu-iteration-sampling", "first")),
    Launch("tp2-ckpt-at-tp1", "attention-topk", load=("tp2", "first")),
    Launch("pp2-ckpt-at-tp1", "sampling", load=("pp2", "second")),
    Launch("tp2-pp2-ckpt-at-tp1", "attention-topk", load=("tp2-pp2", "second")),
    Launch("dense-tp2-ckpt-at-tp1", "dense", load=("dense-tp2", "first")),
    Launch("dense-pp2-ckpt-at-tp1", "dense", load=("dense-pp2", "second")),
]


def _is_resume(launch: Launch) -> bool:
    """Starts from a checkpoint written by another layout (not by a 1-GPU run)."""
    return launch.load is not None and not launch.load[0].startswith("1gpu-")


def _bf16_twins(launches: list[Launch]) -> list[Launch]:
    """The bf16 twin of every launch but the resumes; a twin saves only what a twin loads."""
    twins = [replace(launch, name=f"{launch.name}-bf16", precision="bf16",
                     load=(f"{launch.load[0]}-bf16", launch.load[1]) if launch.load else None)
             for launch in launches if not _is_resume(launch)]
    loaded = {twin.load[0] for twin in twins if twin.load}
    return [twin if twin.name in loaded else replace(twin, save=None) for twin in twins]


FLOOR_CONFIGS = ("sampling", "topk", "attention-topk", "dense")  # the configs with layouts
LAUNCHES = [
    *FP32_LAUNCHES, *_bf16_twins(FP32_LAUNCHES),
    *(Launch(f"1gpu-{config}-mb1-bf16", config, precision="bf16", micro_batch=1)
      for config in FLOOR_CONFIGS),
]
BY_NAME = {launch.name: launch for launch in LAUNCHES}


def reference_of(launch: Launch) -> str:
    return f"1gpu-{launch.config}" + ("-bf16" if launch.precision == "bf16" else "")


@dataclass(frozen=True)
class Check:
    name: str
    run: str
    reference: str
    # "match": within TOLERANCE; "control": beyond it; "floor" (micro-batch 1 vs 2) and
    # "gap" (bf16 vs fp32 at 1 GPU): the yardsticks of the bf16 drift, measured only
    role: str = "match"

    @property
    def precision(self) -> str:
        return BY_NAME[self.run].precision

    @property
    def config(self) -> str:
        return BY_NAME[self.run].config

    @property
    def judged(self) -> bool:
        """fp32 checks are judged against TOLERANCE; bf16 ones are reported."""
        return self.precision == "fp32"

    @property
    def flip_prone(self) -> bool:
        """A data-parallel run with an MLP top-k or sampling: judged over FLIP_WINDOW."""
        return BY_NAME[self.run].dp > 1 and self.config in ("sampling", "topk", "uniform")

    @property
    def same_start(self) -> bool:
        """Run and reference hold the same weights before the first compared iteration:
        both start from the (CPU) initialisation, or the run from the reference's
        checkpoint. Then FIRST_TOLERANCE applies."""
        load = BY_NAME[self.run].load
        return load is None or load[0] == self.reference

    @property
    def launches(self) -> tuple[str, str]:
        return self.run, self.reference

    def needs(self) -> list[Launch]:
        """The two runs and every run they load from, transitively."""
        needed, todo = [], list(self.launches)
        while todo:
            launch = BY_NAME[todo.pop()]
            needed.append(launch)
            if launch.load:
                todo.append(launch.load[0])
        return needed

    def gpus(self) -> int:
        """GPUs needed by the two runs and every run they load from."""
        return max(launch.gpus for launch in self.needs())


def _checks() -> list[Check]:
    checks = []
    for precision in PRECISIONS:
        suffix = "-bf16" if precision == "bf16" else ""
        checks.append(Check(f"control: random neurons are detected{suffix and ' (bf16)'}",
                            f"1gpu-uniform{suffix}", f"1gpu-topk{suffix}", role="control"))
    for config in FLOOR_CONFIGS:
        checks.append(Check(f"noise floor {config}: micro-batch 1 vs 2 (bf16)",
                            f"1gpu-{config}-mb1-bf16", f"1gpu-{config}-bf16", role="floor"))
        checks.append(Check(f"noise floor {config}: bf16 vs fp32 (1 GPU)",
                            f"1gpu-{config}-bf16", f"1gpu-{config}", role="gap"))
    for launch in LAUNCHES:
        if launch.name.startswith("1gpu-"):  # references and noise floors
            continue
        checks.append(Check(f"{launch.name} vs 1 GPU", launch.name, reference_of(launch)))
        if _is_resume(launch):
            # A resumed run also matches its writer, the uninterrupted run of that layout.
            checks.append(Check(f"{launch.name} vs {launch.load[0]} uninterrupted",
                                launch.name, launch.load[0]))
        if launch.overlap:
            # the same layout without the overlap: a block that scored weights still being
            # gathered (the previous step's, on other ranks' shards) would choose otherwise
            twin = launch.name.replace("-overlap", "", 1)
            checks.append(Check(f"{launch.name} vs {twin}", launch.name, twin))
    return checks


CHECKS = _checks()


@dataclass(frozen=True)
class ScaleLaunch:
    """One throughput launch (bf16): ``tp`` x ``dp`` GPUs, 2 micro-batches per replica."""

    name: str
    tp: int = 1
    dp: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.dp


SCALE_LAUNCHES = [ScaleLaunch("1gpu"), ScaleLaunch("dp2", dp=2), ScaleLaunch("tp2-sp", tp=2),
                  ScaleLaunch("dp4", dp=4), ScaleLaunch("tp2-dp2", tp=2, dp=2)]


# ----------------------------------------------------------------------------- settings


def precisions() -> set[str]:
    """``GPU_TEST_PRECISIONS``: fp32 (judged) and/or bf16 (twins, reported); default
    ``fp32,bf16`` on GPUs and ``fp32`` in the CPU rehearsal."""
    return _set_env("GPU_TEST_PRECISIONS", "fp32" if cpu_mode() else "fp32,bf16", PRECISIONS)


def configs() -> set[str]:
    """``GPU_TEST_CONFIGS=dense,...``: only the checks whose launches (and the launches they
    load from) use these SAT configurations; default: all."""
    return _set_env("GPU_TEST_CONFIGS", ",".join(CONFIGS), CONFIGS)


def scaling_enabled() -> bool:
    """``GPU_TEST_SCALING=0`` runs the correctness checks only (no timing launches)."""
    return os.environ.get("GPU_TEST_SCALING", "1") != "0"


def max_processes() -> int:
    """``GPU_TEST_PROCESSES``: launch processes at once (default half the CPU cores)."""
    return _int_env("GPU_TEST_PROCESSES",
                    2 if cpu_mode() else max(4, (os.cpu_count() or 8) // 2))


def deadline_s() -> int:
    """``GPU_TEST_DEADLINE``: seconds after which the suite kills what runs and reports."""
    return _int_env("GPU_TEST_DEADLINE", sizes().deadline)


def check_settings() -> None:
    """Raise :class:`SuiteError` on a bad GPU_TEST_* variable, before anything runs."""
    precisions(), configs(), max_processes(), deadline_s(), visible_devices()


def selected(check: Check) -> bool:
    needs = check.needs()
    return ({launch.config for launch in needs} <= configs()
            and {launch.precision for launch in needs} <= precisions())


# ----------------------------------------------------------------------------- command lines


def _last(args: list[str], flag: str) -> str:
    """The value argparse keeps for ``flag``: its last occurrence."""
    return args[len(args) - 1 - args[::-1].index(flag) + 1]


def _model(s: Sizes, precision: str) -> list[str]:
    return [*TINY_GPT, *s.model, *(["--bf16"] if precision == "bf16" else []),
            "--attention-dropout", "0", "--hidden-dropout", "0"]


def _sat(lors_start: int, ladders: int) -> list[str]:
    return ["--sat-omission-rate", "0.5", "--sat-metric", "maxip", "--sat-temperature", "0.05",
            "--sat-lors-start", str(lors_start), "--sat-lors-ladders", str(ladders)]


def correctness_args(launch: Launch, s: Sizes, work: Path) -> list[str]:
    lors = _lors(s)
    args = [*_model(s, launch.precision), *TRAINING, *MOCK_DATA,
            # every layout: 8 sequences per iteration, in micro-batches of 2 (1: noise floor)
            "--micro-batch-size", str(launch.micro_batch), "--global-batch-size", "8",
            "--train-iters", str(s.iters), "--lr", s.lr, "--distributed-timeout-minutes", "5",
            *_sat(lors.lors_start, lors.lors_ladders), "--sat-selection-scope", "microbatch",
            *CONFIGS[launch.config],
            "--tensor-model-parallel-size", str(launch.tp),
            "--pipeline-model-parallel-size", str(launch.pp),
            "--tensorboard-dir", str(work / "tensorboard" / launch.name)]
    if launch.sp:
        args.append("--sequence-parallel")
    if launch.distopt:
        args.append("--use-distributed-optimizer")
    if launch.overlap:
        # buckets of one parameter each: with the whole model in one bucket the first
        # module's pre-hook would wait for every weight, and the check could not fail
        args += ["--overlap-grad-reduce", "--overlap-param-gather", "--ddp-bucket-size", "1000"]
    if launch.save:
        args += ["--save", str(work / "checkpoints" / launch.name),
                 "--save-interval", str(_checkpoint_iteration(s, launch.save))]
    if launch.load:
        source, which = launch.load
        args += ["--load", str(work / "checkpoints" / source),
                 "--ckpt-step", str(_checkpoint_iteration(s, which))]
    return args


def scale_args(launch: ScaleLaunch, s: Sizes, work: Path) -> list[str]:
    micro_batches = 2 * launch.dp
    args = [*_model(s, "bf16"), *s.scale_model, *MOCK_DATA,
            "--micro-batch-size", str(s.scale_micro_batch),
            "--global-batch-size", str(s.scale_micro_batch * micro_batches),
            "--train-iters", str(s.scale_iters), "--lr", "1e-4", "--seed", "1234",
            "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "100000",
            "--num-workers", "0", "--distributed-timeout-minutes", "5",
            "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
            # SAT (the paper's maxip + sampling) up to half, then dense: one ladder
            *_sat(s.scale_iters // 2, 1),
            "--tensor-model-parallel-size", str(launch.tp),
            "--tensorboard-dir", str(work / "tensorboard" / f"scale-{launch.name}")]
    if launch.tp > 1:
        args.append("--sequence-parallel")
    return args


def _environment(gpus: list[int], tp: int, precision: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if tp > 1:  # megatron requires it for TP > 1 before Blackwell; it serialises streams
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    for name, value in NO_MULTICAST.items():
        env.setdefault(name, value)
    if precision == "fp32":
        env.update(NO_TF32)
        env.pop("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", None)
    env["CUDA_VISIBLE_DEVICES"] = "" if cpu_mode() else ",".join(map(str, gpus))
    return env


# ----------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Job:
    name: str
    nproc: int
    tp: int
    precision: str
    args: list[str]
    needs: tuple[str, ...] = ()  # jobs whose checkpoints it loads
    exclusive: bool = False  # a timing run: alone on the machine


@dataclass
class Outcome:
    """What one launch produced."""

    name: str
    gpus: int
    command: list[str]
    returncode: int | None = None  # None: not run
    skipped: str = ""  # why it did not run
    started_s: float = 0.0  # seconds after the suite started
    wall_s: float = 0.0
    log: str = ""
    loss: dict[int, float] = field(default_factory=dict)
    grad_norm: dict[int, float] = field(default_factory=dict)
    rate: dict[int, float] = field(default_factory=dict)
    iteration_ms: dict[int, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0


_ITERATION_MS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration "
                           r"\(ms\): ([\d.]+)")


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own,
    so killing torchrun's process group would leave them running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


class Runner:
    """Runs launches as subprocesses, several at a time where they may share the GPUs.

    Correctness runs are tiny, so several share a GPU (each gets its own processes and
    NCCL communicators; results do not depend on what else runs). Timing runs are
    ``exclusive``: they wait for everything else and run alone. A launch is killed after
    ``timeout`` seconds; at ``deadline`` (a ``time.time()``) every running launch is
    killed and every pending one skipped. ``on_finish(outcomes)`` is called after each
    launch ends; ``outcomes`` holds what has ended so far, also after an exception (on
    which every running launch is killed).
    """

    def __init__(self, out: Path, work: Path, devices: int, max_processes: int,
                 timeout: float, deadline: float, progress=print,
                 on_finish: Callable[[dict[str, Outcome]], None] = lambda outcomes: None):
        self.out, self.work, self.devices = out, work, devices
        self.max_processes, self.timeout, self.deadline = max_processes, timeout, deadline
        self.progress, self.on_finish = progress, on_finish
        self.started = time.time()
        self.outcomes: dict[str, Outcome] = {}
        self.load = [0] * devices  # processes per GPU
        self.exclusive_running = False
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def _pick(self, n: int) -> list[int]:
        return sorted(sorted(range(self.devices), key=lambda g: (self.load[g], g))[:n])

    def _skip(self, job: Job, why: str) -> None:
        self.outcomes[job.name] = Outcome(job.name, job.nproc, [], skipped=why)
        self.progress(f"[skip] {job.name}: {why}")

    def run_all(self, jobs: list[Job]) -> dict[str, Outcome]:
        """Run ``jobs`` (in their order where they must wait); their outcomes by name."""
        running: dict[str, tuple[subprocess.Popen, list[int], float, object]] = {}
        try:
            self._schedule(jobs, running)
        finally:
            for name, (proc, gpus, start, log) in running.items():  # only after an exception
                _kill_tree(proc)
                log.close()
                self.outcomes[name] = self._finish(name, proc, len(gpus), start)
        return {job.name: self.outcomes[job.name] for job in jobs}

    def _schedule(self, jobs: list[Job], running: dict) -> None:
        outcomes = self.outcomes
        pending = list(jobs)
        while pending or running:
            late = time.time() >= self.deadline
            for job in list(pending):
                failed = [n for n in job.needs if n in outcomes and not outcomes[n].ok]
                if late:
                    self._skip(job, "suite deadline (GPU_TEST_DEADLINE) reached")
                elif job.nproc > self.devices:
                    self._skip(job, f"needs {job.nproc} GPUs, {self.devices} visible")
                elif failed:
                    self._skip(job, "; ".join(
                        f"{n}: {outcomes[n].skipped or 'failed'}" for n in failed))
                elif any(n not in outcomes for n in job.needs):
                    continue
                elif running and (job.exclusive or self.exclusive_running):
                    break  # a timing run waits for an empty machine, and has it to itself
                elif running and (sum(len(g) for _, g, _, _ in running.values()) + job.nproc
                                  > self.max_processes):
                    continue
                else:
                    running[job.name] = self._start(job)
                    self.exclusive_running = job.exclusive
                pending.remove(job)
            for name, (proc, gpus, start, log) in list(running.items()):
                if proc.poll() is None:
                    if time.time() - start < self.timeout and not late:
                        continue
                    _kill_tree(proc)
                    why = ("at the suite deadline (GPU_TEST_DEADLINE)" if late
                           else f"after {self.timeout:.0f} s")
                    log.write(f"\n[multi_gpu] killed {why}\n")
                    self.progress(f"[kill] {name} {why}")
                log.close()
                for g in gpus:
                    self.load[g] -= 1
                del running[name]
                outcomes[name] = self._finish(name, proc, len(gpus), start)
                self.on_finish(outcomes)
            time.sleep(0.5)

    def _start(self, job: Job):
        gpus = self._pick(job.nproc)
        for g in gpus:
            self.load[g] += 1
        for stale in (self.work / "tensorboard" / job.name, self.work / "checkpoints" / job.name):
            shutil.rmtree(stale, ignore_errors=True)  # a reused GPU_TEST_WORK
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={job.nproc}", SCRIPT, *job.args]
        log = open(self.out / "logs" / f"{job.name}.log", "w")
        log.write(" ".join(command) + "\n\n")
        log.flush()
        proc = subprocess.Popen(command, cwd=REPO, env=_environment(gpus, job.tp, job.precision),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.progress(f"[start] {job.name} on {'cpu' if cpu_mode() else f'GPU {gpus}'}")
        return proc, gpus, time.time(), log

    def _finish(self, name: str, proc: subprocess.Popen, gpus: int, start: float) -> Outcome:
        log = self.out / "logs" / f"{name}.log"
        tensorboard = self.work / "tensorboard" / name
        text = log.read_text(errors="replace")
        outcome = Outcome(
            name, gpus, list(proc.args), proc.returncode,
            started_s=round(start - self.started, 1), wall_s=round(time.time() - start, 1),
            log=str(log), loss=read_tensorboard(tensorboard, "lm loss"),
            grad_norm=read_tensorboard(tensorboard, "grad-norm"),
            rate=read_tensorboard(tensorboard, "sat omission rate"),
            iteration_ms={int(i): float(ms) for i, ms in _ITERATION_MS.findall(text)})
        status = "ok" if outcome.ok else f"FAILED (exit {proc.returncode}, see {log})"
        self.progress(f"[done] {name}: {status} in {outcome.wall_s} s")
        return outcome


# ----------------------------------------------------------------------------- comparing


def relative_differences(run: dict[int, float], ref: dict[int, float]) -> dict[int, float]:
    return {i: abs(run[i] - ref[i]) / abs(ref[i]) for i in sorted(run) if i in ref}


def compare(check: Check, outcomes: dict[str, Outcome], s: Sizes) -> dict:
    """The result of one check: its statistics, passed or not, and why.

    fp32 checks are judged against TOLERANCE and, from the same start, FIRST_TOLERANCE
    (a control must exceed both). bf16 checks only fail on a crashed launch, wrong
    iterations or wrong rates; their drift is data.
    """
    run, ref = outcomes[check.run], outcomes[check.reference]
    result = {"name": check.name, "run": check.run, "reference": check.reference,
              "role": check.role, "config": check.config, "precision": check.precision,
              "judged": check.judged, "gpus": check.gpus()}
    for outcome in (run, ref):
        if not outcome.ok:
            result.update(passed=False, skipped=outcome.skipped,
                          message=f"{outcome.name}: " + (outcome.skipped or "failed"))
            return result
    launch = BY_NAME[check.run]
    first = _checkpoint_iteration(s, launch.load[1]) + 1 if launch.load else 1
    expected = list(range(first, s.iters + 1))
    problems = []
    if sorted(run.loss) != expected:
        problems.append(f"{check.run} logged iterations {sorted(run.loss)}, expected {expected}")
    lors = _lors(s)
    dense = check.config == "dense"
    wrong_rates = {i: r for i, r in run.rate.items()
                   if abs(r - (0.0 if dense else omission_rate_at(lors, i - 1))) > 1e-6}
    if wrong_rates:
        problems.append(f"omission rates {wrong_rates} differ from LORS")
    exceeded, exceeded_first = [], []
    for tag, curve, ref_curve in [("lm loss", run.loss, ref.loss),
                                  ("grad-norm", run.grad_norm, ref.grad_norm)]:
        diffs = relative_differences({i: curve[i] for i in expected if i in curve}, ref_curve)
        if len(diffs) != len(expected):
            problems.append(f"{tag}: {check.run} or {check.reference} lacks iterations of "
                            f"{expected}")
            continue
        worst, mean = max(diffs.values()), statistics.fmean(diffs.values())
        result[tag] = {"first_rel": diffs[first], "max_rel": worst, "mean_rel": mean,
                       "worst_iteration": max(diffs, key=diffs.get),
                       "per_iteration": [diffs[i] for i in expected]}
        max_tol, mean_tol = TOLERANCE[tag]
        if worst > max_tol or mean > mean_tol:
            exceeded.append(f"{tag} max {worst:.2e} (tol {max_tol:.0e}), "
                            f"mean {mean:.2e} (tol {mean_tol:.0e})")
        window = expected[:FLIP_WINDOW] if check.flip_prone else [first]
        early = max(diffs[i] for i in window)
        if check.same_start and early > FIRST_TOLERANCE[tag]:
            where = (f"iteration {first}" if len(window) == 1
                     else f"iterations {window[0]}-{window[-1]}")
            exceeded_first.append(f"{tag} at {where} {early:.2e} "
                                  f"(tol {FIRST_TOLERANCE[tag]:.0e})")
    if check.role == "match" and (exceeded or exceeded_first):
        if check.judged and check.flip_prone:
            problems += exceeded_first
            if exceeded:
                result["drift"] = "after a selection flip: " + "; ".join(exceeded)
        elif check.judged:
            problems += exceeded_first + exceeded
        else:
            result["drift"] = "; ".join(exceeded_first + exceeded)
    if check.role == "control":
        if check.judged and not problems and not (exceeded and exceeded_first):
            problems.append("random neurons stay within the tolerance "
                            f"{'at the first iteration' if exceeded else 'over the run'}, so "
                            "the layout checks could not detect a wrong selection")
        for outcome in (run, ref):
            losses = [outcome.loss[i] for i in sorted(outcome.loss)] or [float("nan")]
            if not losses[-1] < LEARNS * losses[0]:
                problems.append(f"{outcome.name} does not learn: loss {losses[0]:.4f} -> "
                                f"{losses[-1]:.4f}")
    result["iterations"] = [first, s.iters]
    result["passed"] = not problems
    result["message"] = "; ".join(problems)
    return result


def scaling(outcomes: dict[str, Outcome], s: Sizes) -> list[dict]:
    """Tokens/s (median iteration) of the SAT and the dense half of each scale launch."""
    half = s.scale_iters // 2
    phases = {"sat": range(1 + s.warmup, half + 1),
              "dense": range(half + 1 + s.warmup, s.scale_iters + 1)}
    seq = int(_last(scale_args(SCALE_LAUNCHES[0], s, Path()), "--seq-length"))
    rows = []
    if not scaling_enabled():
        return rows
    for launch in SCALE_LAUNCHES:
        outcome = outcomes[f"scale-{launch.name}"]
        row = {"layout": launch.name, "gpus": launch.gpus, "tp": launch.tp, "dp": launch.dp,
               "ok": outcome.ok, "skipped": outcome.skipped, "wall_s": outcome.wall_s}
        if outcome.ok:
            tokens = s.scale_micro_batch * 2 * launch.dp * seq
            row["tokens_per_iteration"] = tokens
            for phase, iterations in phases.items():
                times = [outcome.iteration_ms[i] for i in iterations if i in outcome.iteration_ms]
                rates = {outcome.rate.get(i) for i in iterations}
                ms = statistics.median(times) if times else float("nan")
                row[phase] = {"median_ms": ms, "iterations": len(times),
                              "omission_rate": sorted(r for r in rates if r is not None),
                              "tokens_per_s": tokens / ms * 1000,
                              "tokens_per_s_per_gpu": tokens / ms * 1000 / launch.gpus}
            row["sat_speedup"] = row["sat"]["tokens_per_s"] / row["dense"]["tokens_per_s"]
        rows.append(row)
    base = rows[0]
    for row in rows:
        if row["ok"] and base["ok"]:
            for phase in phases:
                row[f"{phase}_efficiency"] = (row[phase]["tokens_per_s_per_gpu"]
                                              / base[phase]["tokens_per_s_per_gpu"])
    return rows


# ----------------------------------------------------------------------------- the suite


def _jobs(s: Sizes, work: Path) -> list[Job]:
    jobs = [Job(launch.name, launch.gpus, launch.tp, launch.precision,
                correctness_args(launch, s, work), (launch.load[0],) if launch.load else ())
            for launch in LAUNCHES if any(selected(c) and launch in c.needs() for c in CHECKS)]
    if scaling_enabled():
        jobs += [Job(f"scale-{launch.name}", launch.gpus, launch.tp, "bf16",
                     scale_args(launch, s, work), exclusive=True) for launch in SCALE_LAUNCHES]
    return jobs


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _write_json(path: Path, results: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)


def run_suite(out: Path, progress=print) -> dict:
    """Run every launch that fits the visible GPUs; write ``out/results.json`` after each
    launch (``"complete": false``) and at the end."""
    check_settings()
    s, devices, started = sizes(), visible_devices(), time.time()
    work = Path(os.environ.get("GPU_TEST_WORK") or tempfile.mkdtemp(prefix="sat-gpu-"))
    out.mkdir(parents=True, exist_ok=True)
    jobs = _jobs(s, work)
    checks = [check for check in CHECKS if selected(check)]

    def results(outcomes: dict[str, Outcome], complete: bool) -> dict:
        not_yet = "not finished when results.json was written"
        outcomes = {job.name: outcomes.get(job.name) or Outcome(job.name, job.nproc, [],
                                                                skipped=not_yet)
                    for job in jobs}
        return {
            "device": device_name(), "visible_devices": devices, "cpu_mode": cpu_mode(),
            "complete": complete, "precisions": sorted(precisions()),
            "fp32_environment": NO_TF32, "sizes": asdict(s), "tolerance": TOLERANCE,
            "first_tolerance": FIRST_TOLERANCE, "flip_window": FLIP_WINDOW,
            "checks": [compare(check, outcomes, s) for check in checks],
            "scaling": scaling(outcomes, s),
            "launches": {name: asdict(outcome) for name, outcome in outcomes.items()},
            "wall_s": round(time.time() - started, 1),
        }

    runner = Runner(out, work, devices, max_processes(), s.timeout, started + deadline_s(),
                    progress, lambda done: _write_json(out / "results.json",
                                                       results(done, complete=False)))
    progress(f"[suite] {device_name()}, {devices} visible, precisions "
             f"{','.join(sorted(precisions()))}, {len(jobs)} launches, at most "
             f"{runner.max_processes} processes; logs in {out / 'logs'}, checkpoints in {work}")
    complete = False
    # SIGTERM (a command's time limit) ends the suite like Ctrl-C: launches killed, results kept
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        runner.run_all(jobs)
        complete = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        final = results(runner.outcomes, complete)
        _write_json(out / "results.json", final)
        if os.environ.get("GPU_TEST_KEEP_WORK") != "1":
            shutil.rmtree(work, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- the report


def _values(stats: dict | None, *keys: str) -> str:
    """``stats[key]`` for each key, as "1.2e-04 / 3.4e-05"; "-" without statistics."""
    return " / ".join(f"{stats[key]:.1e}" for key in keys) if stats else "-"


def _verdict(c: dict) -> str:
    if c.get("skipped"):
        return "skipped: " + c["skipped"]
    if not c["passed"]:
        return "FAIL: " + c["message"]
    if c["role"] == "control":
        return "ok (exceeds)" if c["judged"] else "reported"
    if c["judged"] and c.get("drift"):
        first = c["iterations"][0]
        return (f"ok over iterations {first}-{first + FLIP_WINDOW - 1}, then drift "
                f"{c['drift']}")
    return "ok" if c["judged"] else "reported"


def _floor_ratio(c: dict, floor: dict | None, tag: str = "lm loss") -> str:
    """Largest drift of a bf16 run over the largest value of a noise floor of its config,
    both over the run's iterations."""
    stats = c.get(tag)
    if not floor or not floor.get(tag) or not stats:
        return "-"
    first, last = c["iterations"]
    floor_first = floor["iterations"][0]
    window = floor[tag]["per_iteration"][first - floor_first:last - floor_first + 1]
    return f"{stats['max_rel'] / max(window):.1f}x" if window and max(window) > 0 else "-"


def summary(results: dict) -> str:
    """The judged fp32 checks, the bf16 drift against its noise floor, and the scaling."""
    lo, gn = results["tolerance"]["lm loss"], results["tolerance"]["grad-norm"]
    first = results["first_tolerance"]
    lines = [f"multi-GPU suite on {results['device']} ({results['visible_devices']} visible), "
             f"{results['wall_s']} s" + ("" if results.get("complete", True)
                                          else " (INCOMPLETE: the suite did not finish)"),
             "", "fp32, judged: |x - x_ref| / |x_ref| per iteration; tolerance: lm loss "
             f"max {lo[0]:.0e} / mean {lo[1]:.0e}, grad-norm max {gn[0]:.0e} / mean "
             f"{gn[1]:.0e}; at the first iteration (it1, same start only) lm loss "
             f"{first['lm loss']:.0e}, grad-norm {first['grad-norm']:.0e}",
             f"{'check':48} {'iters':>6} {'loss it1 / max / mean':>27} "
             f"{'grad-norm it1 / max / mean':>27}  result"]
    checks = results["checks"]
    for c in (c for c in checks if c["judged"]):
        iters = "-".join(map(str, c.get("iterations", []))) or "-"
        stats = [_values(c.get(tag), "first_rel", "max_rel", "mean_rel")
                 for tag in ("lm loss", "grad-norm")]
        lines.append(f"{c['name']:48} {iters:>6} {stats[0]:>27} {stats[1]:>27}  {_verdict(c)}")
    reported = [c for c in checks if not c["judged"]]
    if reported:
        floors = {(c["role"], c["config"]): c for c in reported if c["role"] in ("floor", "gap")}
        lines += ["", "bf16, reported: loss drift from the 1-GPU bf16 run, over two noise floors "
                  "of the same config at 1 GPU:",
                  "x mb1 = max drift / max drift of micro-batch 1 vs 2 (for SAT configs "
                  "micro-batch 1 also changes the selection);",
                  "x fp32 = max drift / max distance of bf16 from fp32; each over the same "
                  "iterations. About 1x or less: bf16 noise.",
                  f"{'run (config)':40} {'iters':>6} {'loss it1 / max':>17} {'x mb1':>7} "
                  f"{'x fp32':>7} {'grad-norm max':>14}  result"]
        order = {config: i for i, config in enumerate(CONFIGS)}
        roles = {"floor": 0, "gap": 1, "match": 2, "control": 3}
        for c in sorted(reported, key=lambda c: (c["role"] == "control", order[c["config"]],
                                                 roles[c["role"]])):
            label = {"floor": f"floor: micro-batch 1 ({c['config']})",
                     "gap": f"floor: bf16 vs fp32 ({c['config']})",
                     "control": "control: uniform vs topk"}.get(
                         c["role"], f"{c['run']} ({c['config']})")
            iters = "-".join(map(str, c.get("iterations", []))) or "-"
            ratios = (["", ""] if c["role"] in ("floor", "gap") else
                      [_floor_ratio(c, floors.get((role, c["config"])))
                       for role in ("floor", "gap")])
            lines.append(f"{label:40} {iters:>6} "
                         f"{_values(c.get('lm loss'), 'first_rel', 'max_rel'):>17} "
                         f"{ratios[0]:>7} {ratios[1]:>7} "
                         f"{_values(c.get('grad-norm'), 'max_rel'):>14}  {_verdict(c)}")
    if results["scaling"]:
        lines += ["", f"{'scaling (bf16)':14} {'GPUs':>4} {'dense tok/s/GPU':>16} "
                  f"{'SAT tok/s/GPU':>14} {'dense eff':>9} {'SAT eff':>8} {'SAT/dense':>9}"]
    for r in results["scaling"]:
        if not r["ok"]:
            lines.append(f"{r['layout']:14} {r['gpus']:>4}  " + (r["skipped"] or "FAILED"))
            continue
        lines.append(f"{r['layout']:14} {r['gpus']:>4} "
                     f"{r['dense']['tokens_per_s_per_gpu']:>16,.0f} "
                     f"{r['sat']['tokens_per_s_per_gpu']:>14,.0f} "
                     f"{r.get('dense_efficiency', float('nan')):>9.3f} "
                     f"{r.get('sat_efficiency', float('nan')):>8.3f} {r['sat_speedup']:>9.3f}")
    return "\n".join(lines)


def default_out() -> Path:
    return Path(os.environ.get("OUT") or REPO / "runs" / "gpu")


if __name__ == "__main__":
    print(summary(json.loads((default_out() / "results.json").read_text())))
