#!/usr/bin/env python3
"""Turn the study's ``results.json`` into docs/quality.md tables and a loss-curve figure.

Writes, between the markers ``<!-- mini_cpt:results:begin -->`` and
``<!-- mini_cpt:results:end -->`` of the document (the rest is left alone):

* a table laid out like the paper's Table 1 (rows: methods; columns: perplexity per
  Chinese domain, their mean, English perplexity, training FLOPs relative to full CPT and
  wall time), with the mean over seeds where a run has two;
* the per-seed numbers of the runs with two seeds;
* the four claims of the issue, each with its numbers and whether it held;
* the timing of every run;

and a PNG like the paper's Figure 3: (a) training loss of the sampling variants against
full CPT, (b) LORS runs and the SPDF-style run against full CPT, (c) the omission-rate
schedules.

    python examples/mini_cpt/report.py results.json [--doc docs/quality.md]
        [--figure docs/img/mini_cpt_loss.png]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from settings import REPO, SEEDS, ZH_DOMAINS

sys.path.insert(0, str(REPO))
from megatron_sat.config import SATConfig  # noqa: E402
from megatron_sat.schedule import omission_rate_at  # noqa: E402

BEGIN, END = "<!-- mini_cpt:results:begin -->", "<!-- mini_cpt:results:end -->"
FEW_PERCENT = 0.05  # "within a few percent" of full CPT
MOST = 0.5  # "closes most of the gap"
METRICS = ("magnitude", "wanda", "maxip")

# Table 1 rows: (section, run name without seed suffix, CPT, metric, selection, LORS)
ROWS = [
    ("w/o sparsity", "base", False, "", "", ""),
    ("w/o sparsity", "full", True, "", "", ""),
    ("w/ sparsity (r = 0.5)", "uniform", True, "uniform", "", ""),
    *(("w/ sparsity (r = 0.5)", f"{m}-topk", True, m, "top-k", "") for m in METRICS),
    *(("w/ sparsity (r = 0.5)", f"{m}-sampling", True, m, "sampling", "") for m in METRICS),
    ("w/ sparsity + LORS", "uniform-lors", True, "uniform", "", "yes"),
    ("w/ sparsity + LORS", "maxip-sampling-lors", True, "maxip", "sampling", "yes"),
    ("SPDF-style: sparse, then dense", "spdf", True, "magnitude", "top-k (fixed)", "L = 1"),
    ("defaults (extra runs)", "maxip-sampling-lors-minmax", True, "maxip", "sampling, minmax",
     "yes"),
    ("defaults (extra runs)", "maxip-sampling-lors-groups", True, "maxip",
     "sampling, GQA groups", "yes"),
    ("defaults (extra runs)", "maxip-sampling-lors-tau0.1", True, "maxip", "sampling, tau 0.1",
     "yes"),
]
HEADLINE = ("full", "maxip-sampling-lors", "uniform-lors")


class ReportError(Exception):
    pass


def seed_names(name: str) -> list[str]:
    return [name] + [f"{name}-s{i + 1}" for i in range(1, len(SEEDS))]


def ok_runs(results: dict) -> dict[str, dict]:
    runs = {n: r for n, r in results["runs"].items() if r.get("status") == "ok" and "ppl" in r}
    if results.get("base") and "ppl" in results["base"]:
        runs["base"] = results["base"]
    return runs


def zh_avg(run: dict) -> float:
    """The paper's Avg: arithmetic mean of the domain perplexities."""
    return statistics.fmean(run["ppl"][d] for d in ZH_DOMAINS)


def seeds_of(runs: dict[str, dict], name: str) -> list[dict]:
    return [runs[n] for n in seed_names(name) if n in runs]


def mean_of(values: list[float]) -> float:
    return statistics.fmean(values)


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 1000 else f"{value:.2f}"


# ----------------------------------------------------------------------------- tables


def table1(results: dict) -> str:
    runs = ok_runs(results)
    full_flops = [r["flops"] for r in seeds_of(runs, "full")]
    head = ["#", "CPT", "metric", "selection", "LORS", *ZH_DOMAINS, "Avg ↓", "en ↓",
            "FLOPs", "time s", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    section, number = None, 0
    for sec, name, cpt, metric, selection, lors in ROWS:
        done = seeds_of(runs, name)
        if not done and sec == "defaults (extra runs)":
            continue
        if sec != section:
            lines.append(f"| | *{sec}* |" + " |" * (len(head) - 2))
            section = sec
        number += 1
        cells = [str(number), "✓" if cpt else "✗", metric, selection, lors]
        if not done:
            status = results["runs"].get(name, {}).get("status", "not run")
            cells += ["-"] * (len(ZH_DOMAINS) + 4) + [status]
        else:
            ppl = {k: mean_of([r["ppl"][k] for r in done]) for k in (*ZH_DOMAINS, "en")}
            flops = (f"{mean_of([r['flops'] for r in done]) / full_flops[0]:.2f}"
                     if full_flops and "flops" in done[0] else "-")
            wall = [r["train_wall_s"] for r in done if r.get("train_wall_s")]
            cells += [fmt(ppl[d]) for d in ZH_DOMAINS]
            cells += [f"**{fmt(mean_of([zh_avg(r) for r in done]))}**", fmt(ppl["en"]), flops,
                      f"{mean_of(wall):.0f}" if wall and name != "base" else "-",
                      str(len(done))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_table(results: dict) -> str:
    runs = ok_runs(results)
    lines = ["| run | seed | " + " | ".join(ZH_DOMAINS) + " | Avg | en |",
             "|---|---|" + "---|" * (len(ZH_DOMAINS) + 2)]
    for name in HEADLINE:
        for run in seeds_of(runs, name):
            lines.append(f"| {run['name']} | {run['seed']} | "
                         + " | ".join(fmt(run["ppl"][d]) for d in ZH_DOMAINS)
                         + f" | {fmt(zh_avg(run))} | {fmt(run['ppl']['en'])} |")
    return "\n".join(lines)


def timing_table(results: dict) -> str:
    lines = ["| run | status | iterations | job s | training s (process) | training s "
             "(logged iterations) | tokens/s (median) | evaluation s |",
             "|---|---|---|---|---|---|---|---|"]
    entries = ([results["base"]] if results.get("base") else []) + list(results["runs"].values())
    for r in entries:
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        done = r["losses"][-1][0] if r.get("losses") else "-"
        lines.append(f"| {r['name']} | {r.get('status', '?')} | {done} | "
                     f"{r.get('job_wall_s', '-')} | {r.get('train_wall_s', '-')} | "
                     f"{r.get('train_logged_s', '-')} | {tps} | {r.get('eval_s', '-')} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- claims


def claims(results: dict) -> list[str]:
    """The issue's four checks, each as one line: what was compared, and whether it held."""
    runs = ok_runs(results)
    avg = {name: mean_of([zh_avg(r) for r in seeds_of(runs, name)])
           for name in {row[1] for row in ROWS} if seeds_of(runs, name)}
    spread = {name: max(zh_avg(r) for r in seeds_of(runs, name))
              - min(zh_avg(r) for r in seeds_of(runs, name))
              for name in HEADLINE if len(seeds_of(runs, name)) > 1}
    noise = max(spread.values(), default=None)
    noise_note = (f" (largest seed spread of a headline run: {noise:.2f})"
                  if noise is not None else " (no second seed)")
    out = []

    pairs = [(m, avg.get(f"{m}-sampling"), avg.get(f"{m}-topk")) for m in METRICS]
    if all(s is not None and t is not None for _, s, t in pairs):
        held = all(s < t for _, s, t in pairs)
        detail = ", ".join(f"{m} {fmt(s)} vs {fmt(t)}" for m, s, t in pairs)
        out.append(f"**Sampling beats top-k for every metric: {verdict(held)}.** Avg zh "
                   f"perplexity, sampling vs top-k: {detail}.")
    else:
        out.append("**Sampling beats top-k for every metric:** not measured (runs missing).")

    full = avg.get("full")
    closed = []
    for plain, lors in (("uniform", "uniform-lors"), ("maxip-sampling", "maxip-sampling-lors")):
        if full is not None and avg.get(plain) is not None and avg.get(lors) is not None:
            gap, rest = avg[plain] - full, avg[lors] - full
            closed.append((plain, avg[plain], avg[lors], 1 - rest / gap if gap > 0 else None))
    if closed:
        held = all(c is not None and c > MOST for *_, c in closed)
        detail = "; ".join(f"{p}: {fmt(a)} -> {fmt(b)} with LORS (full {fmt(full)}), "
                           + (f"{100 * c:.0f}% of the gap closed" if c is not None
                              else "no gap to close")
                           for p, a, b, c in closed)
        out.append(f"**LORS closes most (> {100 * MOST:.0f}%) of the gap to full CPT: "
                   f"{verdict(held)}.** {detail}.")
    else:
        out.append("**LORS closes most of the gap to full CPT:** not measured (runs missing).")

    sat = avg.get("maxip-sampling-lors")
    if full is not None and sat is not None:
        rel = sat / full - 1
        out.append(f"**maxip + sampling + LORS within {100 * FEW_PERCENT:.0f}% of full CPT: "
                   f"{verdict(rel <= FEW_PERCENT)}.** Avg zh perplexity {fmt(sat)} vs "
                   f"{fmt(full)} ({100 * rel:+.1f}%){noise_note}.")
    else:
        out.append("**maxip + sampling + LORS within a few percent of full CPT:** not measured.")

    spdf = avg.get("spdf")
    if sat is not None and spdf is not None:
        out.append(f"**SAT beats SPDF-style at equal FLOPs: {verdict(sat < spdf)}.** Avg zh "
                   f"perplexity {fmt(sat)} (maxip + sampling + LORS) vs {fmt(spdf)} (SPDF-style)"
                   f"{noise_note}.")
    else:
        out.append("**SAT beats SPDF at equal FLOPs:** not measured (runs missing).")
    return out


def verdict(held: bool) -> str:
    return "held" if held else "did not hold"


# ----------------------------------------------------------------------------- figure


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = ok_runs(results)
    iters = results["plan"]["cpt_iters"]
    window = max(1, iters // 20)
    panels = [
        ("(a) training loss, sampling (r = 0.5)",
         ["full", "uniform", "magnitude-sampling", "wanda-sampling", "maxip-sampling"]),
        ("(b) training loss, LORS and SPDF-style",
         ["full", "uniform-lors", "maxip-sampling-lors", "spdf"]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (title, names) in zip(axes, panels):
        for name in names:
            if name in runs and runs[name].get("losses"):
                steps, losses = zip(*runs[name]["losses"])
                ax.plot(steps, smooth(list(losses), window), label=name, linewidth=1.2)
        ax.set(title=title, xlabel="iteration", ylabel=f"lm loss (mean of {window})")
        ax.legend(fontsize=8)
    ax = axes[2]
    for name in ("maxip-sampling-lors", "spdf"):
        sat = results["runs"].get(name, {}).get("sat")
        if sat:
            cfg = SATConfig(**{k: v for k, v in sat.items()})
            ax.step(range(1, iters + 1), [omission_rate_at(cfg, i) for i in range(iters)],
                    where="post", label=f"{name}: eta {cfg.lors_start}, L {cfg.lors_ladders}")
    ax.set(title=f"(c) omission rate, T = {iters}", xlabel="iteration", ylabel="r_t",
           ylim=(-0.02, 0.55))
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- document


def render(results: dict, figure_rel: str) -> str:
    plan = results.get("plan", {})
    settings = results["settings"]
    parts = [
        BEGIN,
        f"Results of one run of `study.py all` ({results['profile']} profile, GPU: "
        f"{results.get('gpu', '?')}, {results.get('elapsed_s', '?')} s of a "
        f"{results['budget_s']:.0f} s budget, {results['parallel']} runs at a time). "
        f"T = {plan.get('cpt_iters')} iterations of {settings['tokens_per_iter']:,} tokens "
        f"per CPT run ({plan.get('tokens_per_run', 0):,} tokens); {plan.get('reason', '')}.",
        "",
        "### Table 1 in miniature (perplexity on held-out text, extended tokenizer)",
        "",
        table1(results),
        "",
        "Avg: the mean of the four Chinese domains, as in the paper. FLOPs: training FLOPs "
        "relative to full CPT (`megatron_sat/flops.py`). time: wall seconds of the "
        "training process, start-up included, while sharing the GPU with the other runs.",
        "",
        "### Seeds",
        "",
        seeds_table(results),
        "",
        "### The claims",
        "",
        *[f"* {line}" for line in claims(results)],
        "",
        "### Training loss (Figure 3 in miniature)",
        "",
        f"![training loss]({figure_rel})",
        "",
        "### Timing",
        "",
        timing_table(results),
    ]
    notes = results.get("notes", []) + [f"{n}: {r.get('status')} ({r.get('error', '')})"
                                         for n, r in results["runs"].items()
                                         if r.get("status") != "ok"]
    if notes:
        parts += ["", "Notes: " + "; ".join(notes) + "."]
    parts.append(END)
    return "\n".join(parts)


def replace_section(text: str, section: str, doc: Path) -> str:
    """``text`` with its one marked results section replaced by ``section``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ReportError(f"--doc {doc}: needs exactly one {BEGIN} ... {END} section")
    return text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="results.json of `study.py all`")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "quality.md")
    parser.add_argument("--figure", type=Path,
                        default=REPO / "docs" / "img" / "mini_cpt_loss.png")
    args = parser.parse_args(argv)
    try:
        if not args.results.is_file():
            raise ReportError(f"results: no such file: {args.results}")
        if not args.doc.is_file():
            raise ReportError(f"--doc: no such file: {args.doc}")
        results = json.loads(args.results.read_text())
        section = render(results, os.path.relpath(args.figure, args.doc.parent))
        text = replace_section(args.doc.read_text(encoding="utf-8"), section, args.doc)
        figure(results, args.figure)
        tmp = args.doc.with_name(f".{args.doc.name}.tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, args.doc)
    except ReportError as e:
        print(f"report.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.doc} and {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
