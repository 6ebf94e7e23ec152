"""Multi-GPU correctness and scaling of ``pretrain_sat.py``: launches, comparisons, report.

Used by ``test_multi_gpu.py`` (pytest, marker ``gpu``) and run on a GPU host by
``run_all.sh``. ``docs/multi-gpu.md`` explains the design; in short:

* **Correctness.** A small Llama-shaped model trains 30 iterations in bf16 with SAT
  (r = 0.5, maxip, LORS from iteration 15 in 3 ladders) at the same global batch in every
  layout. Each layout's exact TensorBoard losses and gradient norms must match the
  1-GPU run of the same SAT configuration within bf16 noise (:data:`TOLERANCE`).
  Configurations are chosen so that the layout cannot change which neurons are kept:

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
  ========================  =====================================  ====================

  PP runs start from the 1-GPU run's checkpoint (megatron seeds each pipeline stage's
  initialisation differently). Checkpoints written at TP=2, PP=2 (and TP2xPP2) resume at
  TP=1. A control, randomly chosen neurons (``--sat-metric uniform``) against maxip top-k
  at 1 GPU, must *fail* the tolerance: the comparison can see a wrong selection.

  On GPUs the layouts' bf16 arithmetic differs (GEMM splits, reduction orders), and SAT
  amplifies that: a near-tie that flips changes the kept neurons and the trajectory. So
  on GPUs the SAT layout checks are *reported* (their drift, next to the control's), and
  layout equivalence is judged on dense twins (``dense``: r = 0, the same layouts and
  checkpoint resumes) within :data:`DENSE_TOLERANCE`. On CPU every check is judged.
* **Scaling.** A larger model runs at 1 GPU, DP=2 and TP=2 (+SP). One launch measures SAT
  and dense: LORS with one ladder keeps r = 0.5 up to half of the iterations and trains
  densely after. Tokens/s per GPU at N GPUs over tokens/s at 1 GPU is the efficiency.

``GPU_TEST_CPU=1`` runs the same suite on CPU (gloo, megatron_sat.cpu) at toy size as if
2 GPUs were visible: a check of this machinery, not of GPUs. ``python3 multi_gpu.py``
prints the summary of ``$OUT/results.json`` again.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: _launch

from _launch import MOCK_DATA, REPO, SCRIPT, TINY_GPT, TRAINING, read_tensorboard  # noqa: E402

sys.path.insert(0, str(REPO))  # megatron_sat, also where it is not installed (GPU hosts)

from megatron_sat.config import SATConfig  # noqa: E402
from megatron_sat.schedule import omission_rate_at  # noqa: E402

# Per-iteration relative difference |x - x_ref| / |x_ref| over the compared iterations:
# (largest allowed, largest allowed mean). See docs/multi-gpu.md for the reasoning.
TOLERANCE = {"lm loss": (2e-3, 5e-4), "grad-norm": (5e-2, 1e-2)}
# Dense (r = 0) layouts on GPUs: bf16 GEMM splits and reduction orders differ between
# layouts, and nothing amplifies that noise; a layout bug (a missing or doubled reduction,
# a wrong shard) moves the loss by tens of per cent.
DENSE_TOLERANCE = {"lm loss": (1e-2, 2e-3), "grad-norm": (5e-2, 1e-2)}
LEARNS = 0.9  # the 1-GPU runs' last loss is below this fraction of their first
# NVLink multicast stays off unless set otherwise (shared hosts; see docs/multi-gpu.md).
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}


def cpu_mode() -> bool:
    return os.environ.get("GPU_TEST_CPU") == "1"


def visible_devices() -> int:
    """GPUs this suite may use; 2 pretend GPUs in CPU mode."""
    if cpu_mode():
        return 2
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
    scale_micro_batch=4, scale_iters=24, warmup=3, timeout=300)
CPU = Sizes(model=(), iters=12, lr="1e-3", first_checkpoint=4, second_checkpoint=6,
            scale_model=(), scale_micro_batch=2, scale_iters=8, warmup=1, timeout=600)


def sizes() -> Sizes:
    return CPU if cpu_mode() else GPU


def _checkpoint_iteration(s: Sizes, which: str) -> int:
    return {"first": s.first_checkpoint, "second": s.second_checkpoint}[which]


def _lors(s: Sizes) -> SATConfig:
    return SATConfig(omission_rate=0.5, lors_start=s.iters // 2, lors_ladders=3,
                     train_iters=s.iters).validate()


CONFIGS = {
    "sampling": ["--sat-selection", "sampling"],
    "topk": ["--sat-selection", "topk"],
    "attention-topk": ["--sat-selection", "topk", "--sat-modules", "attention"],
    "uniform": ["--sat-metric", "uniform"],  # random neurons: the control
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
    load: tuple[str, str] | None = None  # (launch, "first"|"second" checkpoint) to start from
    save: str | None = None  # "first" | "second": write checkpoints at that interval

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp


# Reference runs first; every other run is compared with the 1-GPU run of its config.
LAUNCHES = [
    Launch("1gpu-sampling", "sampling", save="first"),
    Launch("1gpu-topk", "topk"),
    Launch("1gpu-uniform", "uniform"),
    Launch("1gpu-attention-topk", "attention-topk", save="first"),
    Launch("tp2", "attention-topk", tp=2, save="first"),
    Launch("tp2-sp", "attention-topk", tp=2, sp=True),
    Launch("pp2", "sampling", pp=2, load=("1gpu-sampling", "first"), save="second"),
    Launch("dp2-distopt", "topk", dp=2, distopt=True),
    Launch("tp2-dp2", "attention-topk", tp=2, dp=2),
    Launch("tp2-pp2", "attention-topk", tp=2, pp=2, load=("1gpu-attention-topk", "first"),
           save="second"),
    Launch("tp2-ckpt-at-tp1", "attention-topk", load=("tp2", "first")),
    Launch("pp2-ckpt-at-tp1", "sampling", load=("pp2", "second")),
    Launch("tp2-pp2-ckpt-at-tp1", "attention-topk", load=("tp2-pp2", "second")),
    # Dense twins: on GPUs SAT amplifies the layouts' bf16 noise (a flipped near-tie
    # changes the kept neurons), so these are what shows layout equivalence there.
    Launch("1gpu-dense", "dense", save="first"),
    Launch("dense-tp2", "dense", tp=2, save="first"),
    Launch("dense-tp2-sp", "dense", tp=2, sp=True),
    Launch("dense-pp2", "dense", pp=2, load=("1gpu-dense", "first"), save="second"),
    Launch("dense-dp2-distopt", "dense", dp=2, distopt=True),
    Launch("dense-tp2-ckpt-at-tp1", "dense", load=("dense-tp2", "first")),
    Launch("dense-pp2-ckpt-at-tp1", "dense", load=("dense-pp2", "second")),
]
BY_NAME = {launch.name: launch for launch in LAUNCHES}


def reference_of(launch: Launch) -> str:
    return f"1gpu-{launch.config}"


@dataclass(frozen=True)
class Check:
    name: str
    run: str
    reference: str
    expect_match: bool = True  # False: the control, which must exceed the tolerance

    @property
    def dense(self) -> bool:
        return BY_NAME[self.run].config == "dense"

    def informational(self) -> bool:
        """SAT layouts on GPUs: the drift is reported, not judged (docs/multi-gpu.md)."""
        return not cpu_mode() and not self.dense and self.expect_match

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
    checks = [Check("control: random neurons are detected", "1gpu-uniform", "1gpu-topk",
                    expect_match=False)]
    for launch in LAUNCHES:
        if launch.name.startswith("1gpu-"):
            continue
        checks.append(Check(f"{launch.name} vs 1 GPU", launch.name, reference_of(launch)))
        if launch.load and not launch.load[0].startswith("1gpu-"):
            # A resumed run also matches its writer, the uninterrupted run of that layout.
            checks.append(Check(f"{launch.name} vs {launch.load[0]} uninterrupted",
                                launch.name, launch.load[0]))
    return checks


CHECKS = _checks()


@dataclass(frozen=True)
class ScaleLaunch:
    """One throughput launch: ``tp`` x ``dp`` GPUs, 2 micro-batches per model replica."""

    name: str
    tp: int = 1
    dp: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.dp


SCALE_LAUNCHES = [ScaleLaunch("1gpu"), ScaleLaunch("dp2", dp=2), ScaleLaunch("tp2-sp", tp=2)]


# ----------------------------------------------------------------------------- command lines


def _last(args: list[str], flag: str) -> str:
    """The value argparse keeps for ``flag``: its last occurrence."""
    return args[len(args) - 1 - args[::-1].index(flag) + 1]


def _model(s: Sizes) -> list[str]:
    return [*TINY_GPT, *s.model, "--bf16", "--attention-dropout", "0", "--hidden-dropout", "0"]


def _sat(lors_start: int, ladders: int) -> list[str]:
    return ["--sat-omission-rate", "0.5", "--sat-metric", "maxip", "--sat-temperature", "0.05",
            "--sat-lors-start", str(lors_start), "--sat-lors-ladders", str(ladders)]


def correctness_args(launch: Launch, s: Sizes, work: Path) -> list[str]:
    lors = _lors(s)
    args = [*_model(s), *TRAINING, *MOCK_DATA,
            # every layout: 8 sequences per iteration in micro-batches of 2
            "--global-batch-size", "8", "--train-iters", str(s.iters), "--lr", s.lr,
            "--distributed-timeout-minutes", "5",
            *_sat(lors.lors_start, lors.lors_ladders), *CONFIGS[launch.config],
            "--tensor-model-parallel-size", str(launch.tp),
            "--pipeline-model-parallel-size", str(launch.pp),
            "--tensorboard-dir", str(work / "tensorboard" / launch.name)]
    if launch.sp:
        args.append("--sequence-parallel")
    if launch.distopt:
        args.append("--use-distributed-optimizer")
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
    args = [*_model(s), *s.scale_model, *MOCK_DATA,
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


def _environment(gpus: list[int], tp: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if tp > 1:  # megatron requires it for TP > 1 before Blackwell; it serialises streams
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    for name, value in NO_MULTICAST.items():
        env.setdefault(name, value)
    env["CUDA_VISIBLE_DEVICES"] = "" if cpu_mode() else ",".join(map(str, gpus))
    return env


# ----------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Job:
    name: str
    nproc: int
    tp: int
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


class Runner:
    """Runs launches as subprocesses, several at a time where they may share the GPUs.

    Correctness runs are tiny, so several share a GPU (each gets its own processes and
    NCCL communicators; results do not depend on what else runs). Timing runs are
    ``exclusive``: they wait for everything else and run alone.
    """

    def __init__(self, out: Path, work: Path, devices: int, max_processes: int,
                 progress=print):
        self.out, self.work, self.devices = out, work, devices
        self.max_processes = max_processes
        self.progress = progress
        self.load = [0] * devices  # processes per GPU
        self.exclusive_running = False
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def _pick(self, n: int) -> list[int]:
        return sorted(sorted(range(self.devices), key=lambda g: (self.load[g], g))[:n])

    def run_all(self, jobs: list[Job]) -> dict[str, Outcome]:
        """Run ``jobs`` (in their order where they must wait); their outcomes by name."""
        outcomes: dict[str, Outcome] = {}
        pending = list(jobs)
        running: dict[str, tuple[subprocess.Popen, list[int], float, object]] = {}
        while pending or running:
            for job in list(pending):
                failed = [n for n in job.needs if n in outcomes and not outcomes[n].ok]
                if job.nproc > self.devices or failed:
                    why = (f"needs {job.nproc} GPUs, {self.devices} visible"
                           if job.nproc > self.devices else
                           "; ".join(f"{n}: {outcomes[n].skipped or 'failed'}" for n in failed))
                    outcomes[job.name] = Outcome(job.name, job.nproc, [], skipped=why)
                    self.progress(f"[skip] {job.name}: {why}")
                    pending.remove(job)
                    continue
                if any(n not in outcomes for n in job.needs):
                    continue
                if running and (job.exclusive or self.exclusive_running):
                    break  # a timing run waits for an empty machine, and has it to itself
                busy = sum(len(gpus) for _, gpus, _, _ in running.values())
                if running and busy + job.nproc > self.max_processes:
                    continue
                running[job.name] = self._start(job)
                self.exclusive_running = job.exclusive
                pending.remove(job)
            for name, (proc, gpus, start, log) in list(running.items()):
                if proc.poll() is None and time.time() - start < sizes().timeout:
                    continue
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)  # the launch's own session
                    proc.wait()
                    log.write(f"\n[multi_gpu] killed after {sizes().timeout} s\n")
                log.close()
                for g in gpus:
                    self.load[g] -= 1
                del running[name]
                outcomes[name] = self._finish(name, proc, len(gpus), start)
            time.sleep(0.5)
        return {job.name: outcomes[job.name] for job in jobs}

    def _start(self, job: Job):
        gpus = self._pick(job.nproc)
        for g in gpus:
            self.load[g] += 1
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={job.nproc}", SCRIPT, *job.args]
        log = open(self.out / "logs" / f"{job.name}.log", "w")
        log.write(" ".join(command) + "\n\n")
        log.flush()
        proc = subprocess.Popen(command, cwd=REPO, env=_environment(gpus, job.tp), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.progress(f"[start] {job.name} on {'cpu' if cpu_mode() else f'GPU {gpus}'}")
        return proc, gpus, time.time(), log

    def _finish(self, name: str, proc: subprocess.Popen, gpus: int, start: float) -> Outcome:
        log = self.out / "logs" / f"{name}.log"
        tensorboard = self.work / "tensorboard" / name
        text = log.read_text(errors="replace")
        outcome = Outcome(
            name, gpus, list(proc.args), proc.returncode, wall_s=round(time.time() - start, 1),
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
    """The result of one check: its statistics, passed or not, and why."""
    run, ref = outcomes[check.run], outcomes[check.reference]
    result = {"name": check.name, "run": check.run, "reference": check.reference,
              "expect_match": check.expect_match, "gpus": check.gpus()}
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
    wrong_rates = {i: r for i, r in run.rate.items()
                   if abs(r - (0.0 if check.dense else omission_rate_at(lors, i - 1))) > 1e-6}
    if wrong_rates:
        problems.append(f"omission rates {wrong_rates} differ from LORS")
    exceeded = []
    for tag, curve, ref_curve in [("lm loss", run.loss, ref.loss),
                                  ("grad-norm", run.grad_norm, ref.grad_norm)]:
        diffs = relative_differences({i: curve[i] for i in expected if i in curve}, ref_curve)
        if len(diffs) != len(expected):
            problems.append(f"{tag}: {check.reference} lacks iterations of {expected}")
            continue
        worst, mean = max(diffs.values()), statistics.fmean(diffs.values())
        result[tag] = {"max_rel": worst, "mean_rel": mean,
                       "worst_iteration": max(diffs, key=diffs.get)}
        max_tol, mean_tol = (DENSE_TOLERANCE if check.dense else TOLERANCE)[tag]
        if worst > max_tol or mean > mean_tol:
            exceeded.append(f"{tag} max {worst:.2e} (tol {max_tol:.0e}), "
                            f"mean {mean:.2e} (tol {mean_tol:.0e})")
    if not problems and check.expect_match and exceeded:
        if check.informational():
            result["drift"] = "; ".join(exceeded)
        else:
            problems += exceeded
    if not check.expect_match:
        if not exceeded:
            problems.append("random neurons stay within the tolerance, so the layout checks "
                            "could not detect a wrong selection")
        for outcome in (run, ref):
            losses = [outcome.loss[i] for i in sorted(outcome.loss)] or [float("nan")]
            if not losses[-1] < LEARNS * losses[0]:
                problems.append(f"{outcome.name} does not learn: loss {losses[0]:.4f} -> "
                                f"{losses[-1]:.4f}")
    result["iterations"] = [first, s.iters]
    result["passed"] = not problems
    result["message"] = "; ".join(problems)
    return result


def selected(check: Check) -> bool:
    """``GPU_TEST_CONFIGS=dense,...`` runs only the checks whose launches (and the launches
    they load from) use those SAT configurations; default: all."""
    wanted = os.environ.get("GPU_TEST_CONFIGS")
    return not wanted or {launch.config for launch in check.needs()} <= set(wanted.split(","))


def scaling_enabled() -> bool:
    """``GPU_TEST_SCALING=0`` runs the correctness checks only (no timing launches)."""
    return os.environ.get("GPU_TEST_SCALING", "1") != "0"


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


def run_suite(out: Path, progress=print) -> dict:
    """Run every launch that fits the visible GPUs; write ``out/results.json``."""
    s, devices, started = sizes(), visible_devices(), time.time()
    work = Path(os.environ.get("GPU_TEST_WORK") or tempfile.mkdtemp(prefix="sat-gpu-"))
    default_processes = 2 if cpu_mode() else max(4, (os.cpu_count() or 8) // 2)
    runner = Runner(out, work, devices,
                    int(os.environ.get("GPU_TEST_PROCESSES", default_processes)), progress)
    progress(f"[suite] {device_name()}, {devices} visible; logs in {out / 'logs'}, "
             f"checkpoints in {work}")
    jobs = [Job(launch.name, launch.gpus, launch.tp, correctness_args(launch, s, work),
                (launch.load[0],) if launch.load else ()) for launch in LAUNCHES
            if any(selected(c) and launch in c.needs() for c in CHECKS)]
    if scaling_enabled():
        jobs += [Job(f"scale-{launch.name}", launch.gpus, launch.tp,
                     scale_args(launch, s, work), exclusive=True) for launch in SCALE_LAUNCHES]
    try:
        outcomes = runner.run_all(jobs)
    finally:
        if os.environ.get("GPU_TEST_KEEP_WORK") != "1":
            shutil.rmtree(work, ignore_errors=True)
    results = {
        "device": device_name(), "visible_devices": devices, "cpu_mode": cpu_mode(),
        "sizes": asdict(s), "tolerance": TOLERANCE, "dense_tolerance": DENSE_TOLERANCE,
        "checks": [compare(check, outcomes, s) for check in CHECKS if selected(check)],
        "scaling": scaling(outcomes, s),
        "launches": {name: asdict(outcome) for name, outcome in outcomes.items()},
        "wall_s": round(time.time() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "results.json")
    return results


def summary(results: dict) -> str:
    """The checks and the scaling table, as text."""
    lines = [f"multi-GPU suite on {results['device']} ({results['visible_devices']} visible), "
             f"{results['wall_s']} s", "",
             f"{'check':44} {'iters':>7} {'loss max/mean rel':>20} {'grad-norm max/mean':>20}"
             "  result"]
    for c in results["checks"]:
        cells = []
        for tag in ("lm loss", "grad-norm"):
            stats = c.get(tag)
            cells.append(f"{stats['max_rel']:.1e} / {stats['mean_rel']:.1e}" if stats else "-")
        iters = "-".join(map(str, c.get("iterations", []))) or "-"
        verdict = ("skipped: " + c["skipped"] if c.get("skipped")
                   else "FAIL: " + c["message"] if not c["passed"]
                   else "reported (SAT drift on GPUs): " + c["drift"] if c.get("drift")
                   else "ok")
        lines.append(f"{c['name']:44} {iters:>7} {cells[0]:>20} {cells[1]:>20}  {verdict}")
    lines += ["", f"{'scaling':8} {'GPUs':>4} {'dense tok/s/GPU':>16} {'SAT tok/s/GPU':>14} "
              f"{'dense eff':>9} {'SAT eff':>8} {'SAT/dense':>9}"]
    for r in results["scaling"]:
        if not r["ok"]:
            lines.append(f"{r['layout']:8} {r['gpus']:>4}  " + (r["skipped"] or "FAILED"))
            continue
        lines.append(f"{r['layout']:8} {r['gpus']:>4} "
                     f"{r['dense']['tokens_per_s_per_gpu']:>16,.0f} "
                     f"{r['sat']['tokens_per_s_per_gpu']:>14,.0f} "
                     f"{r.get('dense_efficiency', float('nan')):>9.3f} "
                     f"{r.get('sat_efficiency', float('nan')):>8.3f} {r['sat_speedup']:>9.3f}")
    return "\n".join(lines)


def default_out() -> Path:
    return Path(os.environ.get("OUT") or REPO / "runs" / "gpu")


if __name__ == "__main__":
    print(summary(json.loads((default_out() / "results.json").read_text())))
