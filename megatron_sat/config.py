"""SAT configuration: one typed dataclass, validated in one place.

Every ``--sat-*`` flag of ``pretrain_sat.py`` maps onto one field of :class:`SATConfig`
(see ``megatron_sat/arguments.py``).  :meth:`SATConfig.validate` checks the values on
their own, and :meth:`SATConfig.validate_model` checks them against the model shape and
the tensor-parallel size.  Every error names the flag to change and how.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

METRICS = ("uniform", "magnitude", "wanda", "maxip")
SELECTIONS = ("topk", "sampling")
SCORE_SCALES = ("standard", "minmax", "raw")
GQA_MODES = ("heads", "groups")
DP_SELECTIONS = ("local", "shared")
MODULES = ("mlp", "attention")
SELECTION_KERNELS = ("auto", "torch")
SELECTION_SCOPES = ("iteration", "microbatch")

# Guards floor(n * (1 - r)) against binary rounding of r (e.g. 0.7 * 10 = 6.999...).
_KEEP_EPS = 1e-9
# Default of --sat-channel-multiple: kept MLP widths that suit tensor-core GEMM tiles.
CHANNEL_MULTIPLE = 64


def kept_channels(n: int, rate: float, multiple: int = 1) -> int:
    """MLP channels kept out of ``n``: :func:`kept_count` rounded down to a multiple of
    ``multiple``, except that a count below one multiple stays exact.

    GEMMs whose width is not a multiple of 8 bf16 elements miss the tensor cores' aligned
    kernels: on an H100 a TinyLlama step at LORS rate 0.2 (4,505 channels) took 843 ms
    against 477 ms dense (docs/performance.md). Rounding to 64 keeps every kept width
    tile-friendly and changes the rate by under 64 / n.
    """
    k = kept_count(n, rate)
    return k - k % multiple if k >= multiple else k


class SATConfigError(ValueError):
    """A bad SAT setting. The message names the flag and the fix."""


def kept_count(n: int, rate: float) -> int:
    """Neurons kept out of ``n`` at omission rate ``rate``: floor(n * (1 - r)) (paper §2.2)."""
    return int(math.floor(n * (1.0 - rate) + _KEEP_EPS))


@dataclass
class SATConfig:
    """Sparsity-Accelerated Training settings (paper §2.2).

    Attributes:
        omission_rate: the maximum omission rate r in [0, 1). 0 turns SAT off (dense).
        metric: neuron importance metric of Eq. 5.
        selection: ``topk`` or ``sampling`` (Eq. 8, without replacement).
        temperature: tau of Eq. 8.
        score_scale: how scores are rescaled before division by tau (see docs/design.md).
        lors_start: eta of Eq. 11 in iterations; None keeps the rate constant (no LORS).
        lors_ladders: L of Eq. 11.
        train_iters: T of Eq. 11 (megatron's --train-iters).
        gqa_mode: ``heads`` keeps the same number of query heads per kv group with K/V
            dense; ``groups`` keeps whole kv groups and drops their K/V too.
        dp_selection: ``local``: each data-parallel rank selects from its own micro-batch;
            ``shared``: scores are averaged over the data-parallel group so that all
            ranks train the same sub-network.
        modules: which blocks are sparsified.
        seed: base seed of the selection noise.
        channel_multiple: kept MLP channels per rank are rounded down to a multiple of
            this (see :func:`kept_channels`); 1 keeps exactly floor(n (1 - r)).
        selection_kernel: ``auto``: Triton selection kernels on a GPU when Triton is
            installed (``fused_selection``); ``torch``: torch operations everywhere.
        selection_scope: ``iteration``: one selection per block and training iteration
            (Eq. 1-2: the sub-network of step t), drawn on the iteration's first
            micro-batch and reused by the others; ``microbatch``: a new draw for every
            micro-batch (see docs/design.md).
    """

    omission_rate: float = 0.0
    metric: str = "maxip"
    selection: str = "sampling"
    temperature: float = 0.05
    score_scale: str = "standard"
    lors_start: int | None = None
    lors_ladders: int = 5
    train_iters: int | None = None
    gqa_mode: str = "heads"
    dp_selection: str = "local"
    modules: tuple[str, ...] = field(default=MODULES)
    seed: int = 1234
    channel_multiple: int = CHANNEL_MULTIPLE
    selection_kernel: str = "auto"
    selection_scope: str = "iteration"

    @property
    def enabled(self) -> bool:
        return self.omission_rate > 0.0

    def validate(self) -> "SATConfig":
        """Check every field on its own. Returns self."""
        r = self.omission_rate
        if not (isinstance(r, (int, float)) and 0.0 <= r < 1.0):
            raise SATConfigError(
                f"--sat-omission-rate must be in [0, 1), got {r!r}; "
                "use 0 for dense training and e.g. 0.5 to omit half of the neurons")
        _check_choice("--sat-metric", self.metric, METRICS)
        _check_choice("--sat-selection", self.selection, SELECTIONS)
        _check_choice("--sat-score-scale", self.score_scale, SCORE_SCALES)
        _check_choice("--sat-gqa-mode", self.gqa_mode, GQA_MODES)
        _check_choice("--sat-dp-selection", self.dp_selection, DP_SELECTIONS)
        _check_choice("--sat-selection-kernel", self.selection_kernel, SELECTION_KERNELS)
        _check_choice("--sat-selection-scope", self.selection_scope, SELECTION_SCOPES)
        for m in self.modules:
            _check_choice("--sat-modules", m, MODULES)
        if not self.modules:
            raise SATConfigError("--sat-modules needs at least one of: mlp attention")
        if not (isinstance(self.channel_multiple, int) and self.channel_multiple >= 1):
            raise SATConfigError(
                f"--sat-channel-multiple must be an integer >= 1, got "
                f"{self.channel_multiple!r}; 1 keeps exactly floor(n (1 - r)) channels")
        if not (self.temperature > 0.0 and math.isfinite(self.temperature)):
            raise SATConfigError(
                f"--sat-temperature must be a positive number, got {self.temperature!r}; "
                "the paper uses 0.05")
        if self.lors_start is not None:
            if self.train_iters is None or self.train_iters <= 0:
                raise SATConfigError(
                    "--sat-lors-start needs --train-iters (T of Eq. 11) to be set; "
                    "LORS is defined in iterations")
            if not (0 <= self.lors_start < self.train_iters):
                raise SATConfigError(
                    f"--sat-lors-start (eta) must be in [0, --train-iters) = [0, "
                    f"{self.train_iters}), got {self.lors_start}")
            if self.lors_ladders < 1:
                raise SATConfigError(
                    f"--sat-lors-ladders (L) must be >= 1, got {self.lors_ladders}")
        return self

    def validate_model(self, *, num_attention_heads: int, num_query_groups: int,
                       ffn_hidden_size: int, tp_size: int) -> "SATConfig":
        """Check the settings against the model shape and the tensor-parallel size.

        Each tensor-parallel rank keeps floor(n_local * (1 - r)) of its own neurons, so
        the neuron counts must split evenly over the ranks and the kept count must be >= 1.
        """
        self.validate()
        if num_attention_heads % tp_size:
            raise SATConfigError(
                f"--num-attention-heads {num_attention_heads} cannot be split over "
                f"--tensor-model-parallel-size {tp_size}; choose a TP size that divides it")
        if num_query_groups % tp_size:
            raise SATConfigError(
                f"--num-query-groups {num_query_groups} cannot be split over "
                f"--tensor-model-parallel-size {tp_size}; SAT selects heads inside each "
                "rank's own kv groups, so choose a TP size that divides the group count")
        if ffn_hidden_size % tp_size:
            raise SATConfigError(
                f"--ffn-hidden-size {ffn_hidden_size} cannot be split over "
                f"--tensor-model-parallel-size {tp_size}")
        if not self.enabled:
            return self
        r = self.omission_rate
        if "mlp" in self.modules:
            local = ffn_hidden_size // tp_size
            if kept_count(local, r) < 1:
                raise SATConfigError(
                    f"--sat-omission-rate {r} keeps 0 of the {local} MLP channels per "
                    "tensor-parallel rank; lower the rate")
        if "attention" in self.modules:
            heads, groups = num_attention_heads // tp_size, num_query_groups // tp_size
            if groups == heads or self.gqa_mode == "groups":
                unit, what = groups, "kv groups" if groups != heads else "heads"
            else:
                unit, what = heads // groups, "query heads per kv group"
            if kept_count(unit, r) < 1:
                fixes = ["lower the rate", "lower --tensor-model-parallel-size"]
                if self.gqa_mode == "groups" and groups != heads:
                    fixes.append("use --sat-gqa-mode heads")
                raise SATConfigError(
                    f"--sat-omission-rate {r} keeps 0 of the {unit} {what} per "
                    f"tensor-parallel rank; {', '.join(fixes[:-1])} or {fixes[-1]}")
        return self


def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SATConfigError(f"{flag} got {value!r}; choose one of: {', '.join(choices)}")
