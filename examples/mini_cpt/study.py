#!/usr/bin/env python3
"""Stages 1-4 of the mini continual-pre-training study, and the driver that runs them all
in one GPU call. Stage 0 (``prepare.py``) runs before, on CPU; ``report.py`` after.

Commands (``--data-dir`` is stage 0's output, ``--work-dir`` holds checkpoints and logs)::

    study.py base               stage 1: dense English base -> WORK/base/checkpoint
    study.py resize             stage 2: base -> WORK/base_resized (extended vocabulary)
    study.py run NAME [--iters T]   stages 3+4 of one CPT run: train on Chinese, evaluate,
                                write WORK/NAME/result.json, delete the checkpoint
    study.py evaluate base      stage 4 of the base without CPT (resized; also the original
                                base on English with its own tokenizer)
    study.py all                the driver: base, resize, then the base evaluation and the
                                CPT runs as concurrent processes on the one GPU; writes
                                OUT/results.json after every finished job
    study.py list [--iters T]   the runs with their SAT flags and training FLOPs

Environment: ``MINI_CPT_TOY=1`` (toy profile, CPU), ``MINI_CPT_BUDGET_S`` (the driver's
total time budget in seconds, from its start), ``MINI_CPT_PARALLEL`` (concurrent runs),
``MINI_CPT_RUNS`` (comma-separated subset), ``MINI_CPT_CPT_ITERS`` (T, instead of
planning it from the base run's measured throughput), ``OUT`` (results directory).

The driver (``driver.py``) plans T, the iterations of every CPT run, from the base
run's measured speed, and keeps to the time budget. Each run's evaluation happens in its
own process right after its training, so no checkpoint leaves the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from settings import EVAL_SETS, REPO, RUNS, SEEDS, Profile, Run, profile, runs_for

sys.path.insert(0, str(REPO))
from megatron_sat.config import SATConfig  # noqa: E402
from megatron_sat.flops import ModelShape, padded_vocab_size, step_flops  # noqa: E402
from megatron_sat.schedule import omission_rate_at  # noqa: E402

START = time.time()
LORS_LADDERS = 5
THROUGHPUT_FIELDS = ("iteration", "seconds", "tokens_per_s", "model_tflops_per_gpu", "mfu",
                     "omission_rate", "peak_memory_gib")
LOG_TAIL_LINES = 60  # in results.json, for failed runs
EVAL_BATCH = 4  # windows per forward: small, the GPU is shared with training runs


def log(message: str) -> None:
    print(f"[mini_cpt {time.strftime('%H:%M:%S')} +{time.time() - START:6.1f}s] {message}",
          flush=True)


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class Paths:
    data: Path
    work: Path

    @property
    def base_tokenizer(self) -> Path:
        return self.data / "tokenizer" / "base" / "tokenizer.model"

    @property
    def extended_tokenizer(self) -> Path:
        return self.data / "tokenizer" / "extended" / "tokenizer.model"

    @property
    def base(self) -> Path:
        return self.work / "base"

    @property
    def resized(self) -> Path:
        return self.work / "base_resized"

    def heldout(self, name: str) -> Path:
        return self.data / "heldout" / f"{name}.txt"

    def run(self, name: str) -> Path:
        return self.work / name


# ----------------------------------------------------------------------------- runs


def vocab_size(tokenizer: Path) -> int:
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()


def model_shape(prof: Profile, vocab: int) -> ModelShape:
    m = prof.model
    return ModelShape(num_layers=m.layers, hidden_size=m.hidden, ffn_hidden_size=m.ffn,
                      num_attention_heads=m.heads, num_query_groups=m.groups,
                      kv_channels=m.hidden // m.heads, seq_length=m.seq,
                      padded_vocab_size=padded_vocab_size(vocab))


def total_flops(shape: ModelShape, cfg: SATConfig, tokens_per_iter: int) -> int:
    """Model FLOPs of all ``cfg.train_iters`` iterations, each at its own LORS rate."""
    return sum(step_flops(shape, tokens_per_iter, omission_rate_at(cfg, i),
                          gqa_mode=cfg.gqa_mode, modules=cfg.modules)
               for i in range(cfg.train_iters))


def _config(run: Run, iters: int, lors_start: int | None, ladders: int) -> SATConfig:
    return SATConfig(omission_rate=run.rate, metric=run.metric, selection=run.selection,
                     temperature=run.temperature, score_scale=run.score_scale,
                     lors_start=lors_start, lors_ladders=ladders, train_iters=iters,
                     gqa_mode=run.gqa_mode, seed=run.seed).validate()


def lors_start(iters: int) -> int:
    """eta = 2/3 T (the paper: T = 3000, eta = 2000)."""
    return round(2 * iters / 3)


def sat_config(run: Run, iters: int, shape: ModelShape, tokens_per_iter: int) -> SATConfig:
    """The SAT settings of ``run`` at T = ``iters``.

    SPDF-style: rate r up to eta, then dense (one ladder, L = 1), with eta chosen so that
    the run's training FLOPs are closest to those of maxip + sampling + LORS at the same T.
    """
    if run.lors:
        return _config(run, iters, lors_start(iters), LORS_LADDERS)
    if not run.spdf:
        return _config(run, iters, None, LORS_LADDERS)
    reference = total_flops(shape, _config(Run("ref", "lors", rate=run.rate, lors=True), iters,
                                           lors_start(iters), LORS_LADDERS), tokens_per_iter)
    sparse, dense = (step_flops(shape, tokens_per_iter, r, gqa_mode=run.gqa_mode)
                     for r in (run.rate, 0.0))
    eta = min(range(iters), key=lambda e: abs(e * sparse + (iters - e) * dense - reference))
    return _config(run, iters, eta, 1)


def sat_flags(cfg: SATConfig) -> list[str]:
    flags = ["--sat-omission-rate", str(cfg.omission_rate), "--sat-metric", cfg.metric,
             "--sat-selection", cfg.selection, "--sat-temperature", str(cfg.temperature),
             "--sat-score-scale", cfg.score_scale, "--sat-gqa-mode", cfg.gqa_mode]
    if cfg.lors_start is not None:
        flags += ["--sat-lors-start", str(cfg.lors_start),
                  "--sat-lors-ladders", str(cfg.lors_ladders)]
    return flags


def base_flags(prof: Profile, paths: Paths) -> list[str]:
    return [*prof.common_flags(), *prof.base.flags(), "--seed", str(SEEDS[0]),
            "--tokenizer-type", "GPTSentencePieceTokenizer",
            "--tokenizer-model", str(paths.base_tokenizer),
            "--data-path", str(paths.data / "en_train_text_document"),
            "--data-cache-path", str(paths.base / "data_cache"),
            "--save", str(paths.base / "checkpoint"), "--save-interval", str(prof.base.iters),
            "--no-save-optim", "--no-save-rng",
            "--exit-duration-in-mins", str(prof.base_cap_minutes),
            "--tensorboard-dir", str(paths.base / "tensorboard")]


def cpt_flags(prof: Profile, paths: Paths, run: Run, cfg: SATConfig) -> list[str]:
    iters = cfg.train_iters
    warmup = max(1, round(prof.cpt.warmup * iters / prof.cpt.iters))
    schedule = ["--train-iters", str(iters), "--lr", str(prof.cpt.lr),
                "--min-lr", str(prof.cpt.min_lr), "--lr-decay-style", "cosine",
                "--lr-warmup-iters", str(warmup)]
    out = paths.run(run.name)
    return [*prof.common_flags(), *schedule, "--seed", str(run.seed),
            "--tokenizer-type", "GPTSentencePieceTokenizer",
            "--tokenizer-model", str(paths.extended_tokenizer),
            "--data-path", str(paths.data / "zh_train_text_document"),
            # megatron writes its sample index non-atomically: one cache per concurrent run
            "--data-cache-path", str(out / "data_cache"),
            # a release checkpoint: weights only, iteration 0, fresh optimizer and schedule
            "--load", str(paths.resized),
            "--save", str(out / "checkpoint"), "--save-interval", str(iters),
            "--no-save-optim", "--no-save-rng",
            "--tensorboard-dir", str(out / "tensorboard"), *sat_flags(cfg)]


# ----------------------------------------------------------------------------- training


def read_losses(tensorboard_dir: Path) -> list[list[float]]:
    """[[iteration, lm loss], ...] exactly as megatron wrote them to TensorBoard."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util.tensor_util import make_ndarray

    losses = {}
    for path in sorted(tensorboard_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "lm loss":
                    losses[event.step] = make_ndarray(value.tensor).item()
    return [[step, losses[step]] for step in sorted(losses)]


def read_throughput(tensorboard_dir: Path) -> list[dict]:
    """The throughput logger's JSONL records (see megatron_sat/throughput.py)."""
    path = tensorboard_dir / "throughput.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: r.get(k) for k in THROUGHPUT_FIELDS} for r in records]


def median_tokens_per_s(throughput: list[dict]) -> float | None:
    """Median over the logged intervals after the first (which holds the warm-up)."""
    steady = [r["tokens_per_s"] for r in throughput[1:]] or \
        [r["tokens_per_s"] for r in throughput]
    return statistics.median(steady) if steady else None


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    """A TCP port that is free now (the OS picks it), for one run's process group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(flags: list[str], run_dir: Path) -> dict:
    """``pretrain_sat.py`` with ``flags`` as one process (what ``torchrun --nproc-per-node
    1`` would start, without its agent), its own master port; output to RUN_DIR/train.log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "pretrain_sat.py"), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    start = time.time()
    with open(run_dir / "train.log", "w") as out:
        out.write(" ".join(cmd) + "\n\n")
        out.flush()
        returncode = subprocess.run(cmd, cwd=REPO, env=env, stdout=out,
                                    stderr=subprocess.STDOUT).returncode
    throughput = read_throughput(run_dir / "tensorboard")
    return {"returncode": returncode, "train_wall_s": round(time.time() - start, 1),
            "train_logged_s": round(sum(r["seconds"] for r in throughput), 1),
            "tokens_per_s": median_tokens_per_s(throughput),
            "losses": read_losses(run_dir / "tensorboard"), "throughput": throughput}


def evaluate(prof: Profile, model_dir: Path, tokenizer: Path, paths: Paths,
             sets: tuple[str, ...] = EVAL_SETS) -> dict:
    """Perplexity per held-out set with tools/evaluate_ppl.py (fp32, GPU if present)."""
    sys.path.insert(0, str(REPO / "tools"))
    import evaluate_ppl

    report = evaluate_ppl.evaluate(model_dir, tokenizer, [str(paths.heldout(s)) for s in sets],
                                   seq_length=prof.model.seq, batch_size=EVAL_BATCH,
                                   dtype="fp32", max_tokens=prof.eval_max_tokens)
    return {"ppl": {s: r["ppl"] for s, r in zip(sets, report["results"])},
            "eval_tokens": {s: r["tokens"] for s, r in zip(sets, report["results"])},
            "eval_s": report["seconds"], "eval_device": report["device"]}


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# ----------------------------------------------------------------------------- stages


def stage_base(prof: Profile, paths: Paths) -> int:
    """Stage 1: the dense English base."""
    fresh_dir(paths.base)
    result = {"name": "base", "iters": prof.base.iters, "seed": SEEDS[0],
              "flags": base_flags(prof, paths)}
    result.update(train(result["flags"], paths.base))
    done = result["losses"][-1][0] if result["losses"] else 0
    result["status"] = "ok" if result["returncode"] == 0 and done > 0 else "failed"
    if result["status"] == "ok" and done < prof.base.iters:
        result["note"] = (f"stopped by --exit-duration-in-mins {prof.base_cap_minutes} at "
                          f"iteration {done} of {prof.base.iters}")
    if result["status"] != "ok":
        result["log_tail"] = log_tail(paths.base / "train.log")
    write_json(paths.base / "result.json", result)
    log(f"base: {result['status']} in {result['train_wall_s']} s, {done} iterations, "
        f"{result['tokens_per_s'] or 0:.0f} tokens/s" + (f" ({result['note']})"
                                                        if "note" in result else ""))
    return 0 if result["status"] == "ok" else 1


def stage_resize(paths: Paths) -> int:
    """Stage 2: grow the base's embedding and output layer to the extended vocabulary."""
    from megatron_sat.convert import ConversionError, resize_megatron

    try:
        result = resize_megatron(paths.base / "checkpoint", paths.resized,
                                 old_tokenizer_model=paths.base_tokenizer,
                                 new_tokenizer_model=paths.extended_tokenizer, force=True)
    except ConversionError as e:
        log(f"resize: error: {e}")
        return 1
    log(f"resize: wrote {result.output_dir} (vocabulary {result.shape.vocab_size}, padded to "
        f"{result.padded_vocab_size})")
    return 0


def stage_evaluate_base(prof: Profile, paths: Paths) -> int:
    """Stage 4 of the base without CPT, in the extended vocabulary (comparable with the
    CPT runs) and, on English, in its own vocabulary (a check of the resize)."""
    path = paths.base / "result.json"
    result = json.loads(path.read_text()) if path.is_file() else {"name": "base"}
    result.update(evaluate(prof, paths.resized, paths.extended_tokenizer, paths))
    own = evaluate(prof, paths.base / "checkpoint", paths.base_tokenizer, paths, ("en",))
    result["ppl_own_tokenizer"] = own["ppl"]
    result["status"] = "ok"
    write_json(path, result)
    log(f"base evaluated: {fmt_ppl(result['ppl'])}")
    return 0


def stage_run(prof: Profile, paths: Paths, run: Run, iters: int, keep: bool) -> int:
    """Stages 3 and 4 of one CPT run."""
    run_dir = fresh_dir(paths.run(run.name))
    shape = model_shape(prof, vocab_size(paths.extended_tokenizer))
    cfg = sat_config(run, iters, shape, prof.tokens_per_iter)
    result = {"name": run.name, "group": run.group, "seed": run.seed, "iters": iters,
              "sat": sat_summary(cfg), "flops": total_flops(shape, cfg, prof.tokens_per_iter),
              "flags": cpt_flags(prof, paths, run, cfg), "status": "training"}
    write_json(run_dir / "result.json", result)
    result.update(train(result["flags"], run_dir))
    checkpoint = run_dir / "checkpoint"
    if result["returncode"] != 0 or not (checkpoint / "latest_checkpointed_iteration.txt"
                                         ).is_file():
        result.update(status="failed", log_tail=log_tail(run_dir / "train.log"))
        write_json(run_dir / "result.json", result)
        log(f"{run.name}: training failed (exit {result['returncode']})")
        return 1
    result.update(evaluate(prof, checkpoint, paths.extended_tokenizer, paths), status="ok")
    write_json(run_dir / "result.json", result)
    if not keep:
        shutil.rmtree(checkpoint)
    log(f"{run.name}: {result['train_wall_s']} s, {result['tokens_per_s'] or 0:.0f} tokens/s; "
        f"{fmt_ppl(result['ppl'])}")
    return 0


def sat_summary(cfg: SATConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in ("modules", "dp_selection")}


def fmt_ppl(ppl: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in ppl.items())


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO / "data" / "mini_cpt")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "mini_cpt")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="Where `all` writes results.json (default: $OUT, else "
                             "WORK/results).")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("base")
    commands.add_parser("resize")
    run = commands.add_parser("run")
    run.add_argument("name", choices=[r.name for r in RUNS])
    run.add_argument("--iters", type=int, default=None, help="T (default: the profile's)")
    run.add_argument("--keep-checkpoint", action="store_true")
    evaluate_cmd = commands.add_parser("evaluate")
    evaluate_cmd.add_argument("name", choices=["base"])
    commands.add_parser("all")
    listing = commands.add_parser("list")
    listing.add_argument("--iters", type=int, default=None)
    args = parser.parse_args(argv)
    args.data_dir, args.work_dir = args.data_dir.absolute(), args.work_dir.absolute()
    if args.out_dir is None:
        args.out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else \
            args.work_dir / "results"
    return args


def check_data(paths: Paths) -> None:
    needed = [paths.base_tokenizer, paths.extended_tokenizer,
              *(paths.data / f"{lang}_train_text_document.{ext}" for lang in ("en", "zh")
                for ext in ("bin", "idx")), *(paths.heldout(s) for s in EVAL_SETS)]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise SystemExit(f"study.py: error: --data-dir {paths.data} lacks {', '.join(missing)}; "
                         "run examples/mini_cpt/prepare.py first")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prof = profile()
    paths = Paths(args.data_dir, args.work_dir)
    check_data(paths)
    if args.command == "base":
        return stage_base(prof, paths)
    if args.command == "resize":
        return stage_resize(paths)
    if args.command == "evaluate":
        return stage_evaluate_base(prof, paths)
    by_name = {r.name: r for r in RUNS}
    if args.command == "run":
        return stage_run(prof, paths, by_name[args.name], args.iters or prof.cpt.iters,
                         args.keep_checkpoint)
    if args.command == "list":
        iters = args.iters or prof.cpt.iters
        shape = model_shape(prof, vocab_size(paths.extended_tokenizer))
        dense = total_flops(shape, SATConfig(train_iters=iters), prof.tokens_per_iter)
        for run in runs_for(prof):
            cfg = sat_config(run, iters, shape, prof.tokens_per_iter)
            flops = total_flops(shape, cfg, prof.tokens_per_iter)
            print(f"{run.name:28s} seed {run.seed}  FLOPs {flops / dense:.3f} x full  "
                  f"{' '.join(sat_flags(cfg))}")
        return 0
    prefix = [sys.executable, str(Path(__file__).resolve()), "--data-dir", str(args.data_dir),
              "--work-dir", str(args.work_dir)]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    from driver import Driver  # imports this module

    return Driver(prof, paths, args.out_dir, prefix).main()


if __name__ == "__main__":
    sys.exit(main())
