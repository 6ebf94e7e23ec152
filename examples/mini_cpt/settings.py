"""What the mini continual-pre-training study trains: model, batches, schedules and runs.

Two profiles share every line of code: ``full`` (one H100, the real study, sized to fit in
one call of under 9 minutes) and ``toy`` (CPU, seconds, for the CI test), chosen by the
environment variable ``MINI_CPT_TOY=1``. :data:`RUNS` lists the continual-pre-training
runs in priority order: when the time budget runs short the driver skips from the end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ZH_DOMAINS = ("news", "reviews", "novel", "poetry")
EVAL_SETS = ZH_DOMAINS + ("en",)
SEEDS = (1234, 1235)


@dataclass(frozen=True)
class Model:
    """A Llama-shaped megatron-core GPT (RMSNorm, SwiGLU, RoPE, GQA, untied embeddings)."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int  # kv groups
    seq: int

    def flags(self) -> list[str]:
        return [
            "--num-layers", str(self.layers), "--hidden-size", str(self.hidden),
            "--ffn-hidden-size", str(self.ffn), "--num-attention-heads", str(self.heads),
            "--group-query-attention", "--num-query-groups", str(self.groups),
            "--seq-length", str(self.seq), "--max-position-embeddings", str(self.seq),
            "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
            "--untie-embeddings-and-output-weights", "--disable-bias-linear",
            "--attention-dropout", "0", "--hidden-dropout", "0",
            # megatron's defaults that need Transformer Engine or apex
            "--no-rope-fusion", "--no-persist-layer-norm", "--no-gradient-accumulation-fusion",
        ]

    def non_embedding_params(self) -> int:
        head_dim = self.hidden // self.heads
        attention = self.hidden * (self.heads + 2 * self.groups) * head_dim \
            + self.heads * head_dim * self.hidden
        return self.layers * (attention + 3 * self.hidden * self.ffn + 2 * self.hidden) \
            + self.hidden


@dataclass(frozen=True)
class Schedule:
    """Iterations and a cosine learning rate with linear warm-up."""

    iters: int
    lr: float
    min_lr: float
    warmup: int

    def flags(self) -> list[str]:
        return ["--train-iters", str(self.iters), "--lr", str(self.lr),
                "--min-lr", str(self.min_lr), "--lr-decay-style", "cosine",
                "--lr-warmup-iters", str(self.warmup)]


@dataclass(frozen=True)
class Profile:
    name: str
    model: Model
    micro_batch: int
    global_batch: int
    base: Schedule
    cpt: Schedule  # cpt.iters is T, the most the driver plans (it may plan fewer)
    bf16: bool
    zh_pieces: int  # --vocab-size of tools/extend_vocab.py (pieces of the Chinese model)
    max_en_tokens: int  # training tokens kept by stage 0 (the carry limit)
    max_zh_tokens: int
    max_heldout_chars: int  # per held-out file, whole documents
    eval_max_tokens: int  # scored tokens per held-out file
    parallel: int  # concurrent CPT runs on the one GPU
    budget_s: float  # default total time budget of the driver
    base_cap_minutes: int  # --exit-duration-in-mins of the base run (a safety net)
    min_cpt_iters: int  # below this the driver does not shrink T further
    eval_s: float  # time a run's evaluation is planned to take
    log_interval: int  # iterations per megatron log line and throughput record

    @property
    def tokens_per_iter(self) -> int:
        return self.global_batch * self.model.seq

    def common_flags(self) -> list[str]:
        """Flags of every training run: precision, batch, optimizer, logging."""
        return [
            *self.model.flags(),
            "--micro-batch-size", str(self.micro_batch),
            "--global-batch-size", str(self.global_batch),
            "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
            "--clip-grad", "1.0",
            # megatron's distributed optimizer, as in the H100 benchmarks (one rank: the same
            # math as the plain one)
            *(["--bf16"] if self.bf16 else []), "--use-distributed-optimizer",
            "--log-interval", str(self.log_interval),
            "--eval-iters", "0", "--eval-interval", "1000000", "--split", "100,0,0",
            "--num-workers", "0", "--ckpt-format", "torch_dist",
            "--distributed-timeout-minutes", "5",
        ]


FULL = Profile(
    name="full",
    # 22.5M non-embedding parameters (+ 2 x 512 x ~43k embedding/output), 4 query heads per
    # kv group (TinyLlama has 8), head dim 64.
    model=Model(layers=8, hidden=512, ffn=1408, heads=8, groups=2, seq=1024),
    micro_batch=8, global_batch=32,  # 32,768 tokens per iteration
    base=Schedule(iters=320, lr=1e-3, min_lr=1e-4, warmup=32),  # 10.5M English tokens
    cpt=Schedule(iters=200, lr=5e-4, min_lr=5e-5, warmup=20),  # <= 6.6M tokens: 1 epoch
    bf16=True, zh_pieces=12000,
    max_en_tokens=8_000_000, max_zh_tokens=9_000_000, max_heldout_chars=200_000,
    eval_max_tokens=100_000, parallel=7, budget_s=480.0, base_cap_minutes=3,
    min_cpt_iters=60, eval_s=25.0, log_interval=10,
)

TOY = Profile(
    name="toy",
    model=Model(layers=2, hidden=64, ffn=128, heads=4, groups=2, seq=64),
    micro_batch=4, global_batch=8,
    base=Schedule(iters=30, lr=1e-2, min_lr=1e-3, warmup=3),
    cpt=Schedule(iters=12, lr=1e-2, min_lr=1e-3, warmup=2),
    bf16=False, zh_pieces=600,
    max_en_tokens=200_000, max_zh_tokens=200_000, max_heldout_chars=4_000,
    eval_max_tokens=2_000, parallel=3, budget_s=600.0, base_cap_minutes=5,
    min_cpt_iters=12, eval_s=15.0, log_interval=2,
)


def profile() -> Profile:
    """``TOY`` when ``MINI_CPT_TOY=1``, else ``FULL``."""
    return TOY if os.environ.get("MINI_CPT_TOY", "0") not in ("", "0") else FULL


# ----------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Run:
    """One continual-pre-training run; ``rate == 0`` is dense (full CPT)."""

    name: str
    group: str  # "dense", "sparse", "lors", "spdf" or "extra": the table section
    metric: str = "maxip"
    selection: str = "sampling"
    rate: float = 0.0
    lors: bool = False  # eta = 2/3 T, L = 5 (the paper's setting, scaled)
    spdf: bool = False  # sparse until a FLOPs-matched eta, then dense (L = 1)
    seed: int = SEEDS[0]
    temperature: float = 0.05
    score_scale: str = "standard"
    gqa_mode: str = "heads"


def _headline(seed: int) -> list[Run]:
    suffix = "" if seed == SEEDS[0] else f"-s{SEEDS.index(seed) + 1}"
    return [
        Run(f"full{suffix}", "dense", seed=seed),
        Run(f"maxip-sampling-lors{suffix}", "lors", "maxip", "sampling", 0.5, lors=True,
            seed=seed),
        Run(f"uniform-lors{suffix}", "lors", "uniform", "sampling", 0.5, lors=True, seed=seed),
    ]


RUNS: tuple[Run, ...] = (
    *_headline(SEEDS[0]),
    # SPDF-style: a sub-network that hardly moves (magnitude top-k: omitted neurons get no
    # gradient, so their norms can only shrink), then dense; see docs/quality.md.
    Run("spdf", "spdf", "magnitude", "topk", 0.5, spdf=True),
    Run("uniform", "sparse", "uniform", "sampling", 0.5),
    *(Run(f"{metric}-{selection}", "sparse", metric, selection, 0.5)
      for selection in ("topk", "sampling") for metric in ("magnitude", "wanda", "maxip")),
    *_headline(SEEDS[1]),
    # Only when time is left: the defaults the README has to justify.
    Run("maxip-sampling-lors-minmax", "extra", "maxip", "sampling", 0.5, lors=True,
        score_scale="minmax"),
    Run("maxip-sampling-lors-groups", "extra", "maxip", "sampling", 0.5, lors=True,
        gqa_mode="groups"),
    Run("maxip-sampling-lors-tau0.1", "extra", "maxip", "sampling", 0.5, lors=True,
        temperature=0.1),
)
TOY_RUNS = ("full", "maxip-sampling-lors", "spdf")


def runs_for(prof: Profile) -> list[Run]:
    """The runs of ``prof``, or those named in ``MINI_CPT_RUNS`` (comma-separated)."""
    by_name = {r.name: r for r in RUNS}
    wanted = os.environ.get("MINI_CPT_RUNS", "")
    names = [n for n in wanted.split(",") if n] or (TOY_RUNS if prof.name == "toy"
                                                    else list(by_name))
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"MINI_CPT_RUNS: unknown run(s) {', '.join(unknown)}; "
                         f"known: {', '.join(by_name)}")
    return [by_name[n] for n in names]
