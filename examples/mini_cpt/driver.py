"""The driver of the mini CPT study: every GPU stage in one call, within a time budget.

``study.py all`` builds a :class:`Driver`. It runs each stage as its own process
(``study.py base``, ``resize``, ``evaluate base``, ``run NAME --iters T``), so that one
failing run is recorded and the study goes on, and writes ``OUT/results.json`` after every
finished job, so that a call cut short still returns what finished.

Planning: T, the iterations of every CPT run (all runs get the same T, so the same
tokens), is the profile's T unless the base run's measured tokens/s says that the core
runs (all but the ``extra`` group) would not fit in the time left, ``parallel`` at a time
on the shared GPU; then it is lowered (not below the profile's minimum). Runs start in
priority order; one that would not end before the budget is skipped, one still running
at the budget is killed; both are recorded with the reason.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from settings import EVAL_SETS, SEEDS, Profile, runs_for
from study import (LORS_LADDERS, START, Paths, log, log_tail, model_shape, step_flops,
                   vocab_size, write_json)

LOG_COPY_LINES = 300  # in OUT/logs
MARGIN_S = 15.0  # planned slack at the end of the budget
POLL_S = 0.25  # how often the driver looks at its jobs


@dataclass
class Job:
    name: str
    argv: list[str]
    started: float = 0.0
    process: subprocess.Popen | None = None


class Driver:
    """Runs the stages as subprocesses within the time budget; see the module docstring."""

    def __init__(self, prof: Profile, paths: Paths, out: Path, argv_prefix: list[str]):
        self.prof, self.paths, self.out, self.prefix = prof, paths, out, argv_prefix
        self.budget = float(os.environ.get("MINI_CPT_BUDGET_S", prof.budget_s))
        self.deadline = time.time() + self.budget
        self.parallel = int(os.environ.get("MINI_CPT_PARALLEL", prof.parallel))
        self.runs = runs_for(prof)
        self.results: dict = {
            "profile": prof.name, "budget_s": self.budget, "parallel": self.parallel,
            "settings": settings_summary(prof), "gpu": gpu_name(), "plan": {},
            "base": None, "runs": {}, "notes": [], "events": []}

    def event(self, message: str) -> None:
        log(message)
        self.results["events"].append([round(time.time() - START, 1), message])

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.time() - START, 1)
        write_json(self.out / "results.json", self.results)

    def stage(self, name: str, argv: list[str]) -> bool:
        """One blocking stage (base, resize); killed at the deadline."""
        self.event(f"{name}: start")
        job = self.launch(Job(name, argv))
        while job.process.poll() is None and time.time() < self.deadline:
            time.sleep(POLL_S)
        if job.process.poll() is None:
            self.kill(job, "time budget exhausted")
        self.save_logs(name)
        ok = job.process.returncode == 0
        self.event(f"{name}: {'done' if ok else 'FAILED'} in {time.time() - job.started:.0f} s")
        return ok

    def launch(self, job: Job) -> Job:
        log_path = self.paths.work / "jobs" / f"{job.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        job.started = time.time()
        with open(log_path, "w") as out:  # the child keeps its own handle
            job.process = subprocess.Popen([*self.prefix, *job.argv], stdout=out,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        return job

    def kill(self, job: Job, why: str) -> None:
        """Stop the job's process group (torchrun and its worker included)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(job.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                job.process.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        self.event(f"{job.name}: killed ({why})")

    def plan(self) -> int:
        """T for every CPT run (see the module docstring)."""
        prof = self.prof
        fixed = os.environ.get("MINI_CPT_CPT_ITERS")
        base = self.results["base"] or {}
        plan = {"profile_iters": prof.cpt.iters, "base_tokens_per_s": base.get("tokens_per_s")}
        core = [r for r in self.runs if r.group != "extra"]
        waves = math.ceil(len(core) / self.parallel)
        startup = max(10.0, base.get("train_wall_s", 0) - base.get("train_logged_s", 0))
        if fixed:
            iters, why = int(fixed), "MINI_CPT_CPT_ITERS"
        elif not base.get("tokens_per_s"):
            iters, why = prof.cpt.iters, "no throughput measured; the profile's T"
        else:
            # CPT steps are dearer than the base's: the vocabulary grew.
            ratio = (step_flops(model_shape(prof, vocab_size(self.paths.base_tokenizer)), 1)
                     / step_flops(model_shape(prof, vocab_size(self.paths.extended_tokenizer)),
                                  1))
            tokens_per_s = base["tokens_per_s"] * ratio
            # every wave pays a start-up and an evaluation; keep a margin for the stragglers
            left = self.deadline - time.time() - waves * (startup + prof.eval_s) - MARGIN_S
            fit = int(left * tokens_per_s / (len(core) * prof.tokens_per_iter))
            iters = max(prof.min_cpt_iters, min(prof.cpt.iters, fit))
            why = (f"{len(core)} core runs in {waves} wave(s) of {self.parallel}, "
                   f"{left:.0f} s of GPU time left, {tokens_per_s:.0f} tokens/s expected "
                   f"(one dense run alone): {fit} iterations fit")
            plan.update(expected_tokens_per_s=round(tokens_per_s), startup_s=round(startup, 1))
        plan.update(cpt_iters=iters, reason=why, tokens_per_run=iters * prof.tokens_per_iter)
        self.results["plan"] = plan
        self.event(f"plan: T = {iters} ({why})")
        return iters

    def estimate(self, iters: int, done: list[float]) -> float:
        """Seconds a CPT job started now is expected to take: the longest finished one, or
        the plan's figure (the GPU shared by ``parallel`` runs)."""
        if done:
            return max(done)
        plan = self.results["plan"]
        tokens_per_s = plan.get("expected_tokens_per_s")
        if not tokens_per_s:
            return 0.0
        return (plan["startup_s"] + self.prof.eval_s
                + iters * self.prof.tokens_per_iter * self.parallel / tokens_per_s)

    def record(self, job: Job, killed: str | None = None) -> None:
        path = (self.paths.base if job.name == "base-eval" else self.paths.run(job.name)) \
            / "result.json"
        result = json.loads(path.read_text()) if path.is_file() else {"name": job.name}
        result["job_wall_s"] = round(time.time() - job.started, 1)
        if killed or job.process.returncode != 0:
            result["status"] = "killed" if killed else "failed"
            result["error"] = killed or f"exit status {job.process.returncode}"
            result.setdefault("log_tail", log_tail(self.paths.work / "jobs" / f"{job.name}.log"))
        if job.name == "base-eval":
            self.results["base"] = result
        else:
            self.results["runs"][job.name] = result
        self.save_logs(job.name)
        self.save()

    def save_logs(self, name: str) -> None:
        """The tails of the job's and its training's logs, into OUT/logs (small files)."""
        run_dir = self.paths.base if name == "base-eval" else self.paths.run(name)
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for source, target in ((self.paths.work / "jobs" / f"{name}.log", f"{name}.job.log"),
                               (run_dir / "train.log", f"{name}.train.log")):
            if source.is_file() and not (name == "base-eval" and "train" in target):
                (logs / target).write_text(log_tail(source, LOG_COPY_LINES) + "\n")

    def run_pool(self, iters: int) -> None:
        """The base evaluation (short, on the side) and the CPT runs, ``parallel`` at a time."""
        self.event("base-eval: start")
        active = [self.launch(Job("base-eval", ["evaluate", "base"]))]
        queue = [Job(r.name, ["run", r.name, "--iters", str(iters)]) for r in self.runs]
        durations: list[float] = []
        while queue or active:
            while queue and sum(j.name != "base-eval" for j in active) < self.parallel:
                job = queue.pop(0)
                expected = self.estimate(iters, durations)
                if time.time() + expected > self.deadline:
                    self.event(f"{job.name}: skipped: expected {expected:.0f} s, "
                               f"{self.deadline - time.time():.0f} s left")
                    self.results["runs"][job.name] = {"name": job.name, "status": "skipped",
                                                      "error": "time budget"}
                    self.save()
                    continue
                self.event(f"{job.name}: start")
                active.append(self.launch(job))
            for job in list(active):
                if job.process.poll() is not None:
                    active.remove(job)
                    if job.name != "base-eval":
                        durations.append(time.time() - job.started)
                    self.event(f"{job.name}: {'done' if job.process.returncode == 0 else 'FAILED'}"
                               f" in {time.time() - job.started:.0f} s")
                    self.record(job)
                elif time.time() > self.deadline:
                    active.remove(job)
                    self.kill(job, "time budget exhausted")
                    self.record(job, killed="time budget exhausted")
            time.sleep(POLL_S)

    def main(self) -> int:
        self.event(f"profile {self.prof.name}, budget {self.budget:.0f} s, "
                   f"{len(self.runs)} runs, {self.parallel} at a time, GPU {self.results['gpu']}")
        ok = self.stage("base", ["base"])
        base_path = self.paths.base / "result.json"
        self.results["base"] = json.loads(base_path.read_text()) if base_path.is_file() else None
        if ok:
            ok = self.stage("resize", ["resize"])
        if not ok:
            self.results["notes"].append("the base or the resize failed: no CPT run started")
            self.save()
            return 1
        iters = self.plan()
        self.save()
        self.run_pool(iters)
        statuses = [r.get("status") for r in self.results["runs"].values()]
        self.event(f"finished: {statuses.count('ok')} of {len(self.runs)} runs ok")
        self.save()
        print_summary(self.results)
        return 0


def settings_summary(prof: Profile) -> dict:
    data = asdict(prof)
    data["non_embedding_params"] = prof.model.non_embedding_params()
    data["tokens_per_iter"] = prof.tokens_per_iter
    data["lors"] = {"eta": "round(2 T / 3)", "ladders": LORS_LADDERS}
    data["seeds"] = list(SEEDS)
    return data


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() \
            or "none"
    except (OSError, subprocess.TimeoutExpired):
        return "none"


def print_summary(results: dict) -> None:
    rows = [("run", "status", "wall s", "tokens/s", *EVAL_SETS)]
    for r in ([results["base"]] if results["base"] else []) + list(results["runs"].values()):
        ppl = r.get("ppl", {})
        rows.append((r["name"], r.get("status", "?"), str(r.get("job_wall_s", "")),
                     f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "",
                     *(f"{ppl[s]:.2f}" if s in ppl else "" for s in EVAL_SETS)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)), flush=True)
