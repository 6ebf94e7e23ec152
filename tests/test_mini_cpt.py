"""The mini continual-pre-training study (examples/mini_cpt) end to end at toy size on CPU.

Synthetic Chinese and the shipped Moby-Dick chapters go through stage 0 (tokenizer
extension, tokenization, held-out files), then ``study.py all`` runs the same driver the
GPU call runs: an English base, the resize, the base evaluation and two CPT runs (full
and maxip + sampling + LORS) as concurrent processes, then ``report.py`` renders the
tables. Values are checked against what the inputs imply, not only for existence. The
tests that need the study are ``e2e`` (about a minute together, on two cores); the others
take seconds.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy
import pytest
import sentencepiece
import torch

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "examples" / "mini_cpt"
TOY = {"MINI_CPT_TOY": "1"}
RUNS = ("full", "maxip-sampling-lors")
ZH = ("news", "reviews", "novel", "poetry")

sys.path.insert(0, str(STUDY))
with mock.patch.dict(os.environ, TOY):
    settings = importlib.import_module("settings")
    toy_corpora = importlib.import_module("toy_corpora")
    prepare = importlib.import_module("prepare")
    report = importlib.import_module("report")
    study_module = importlib.import_module("study")
    driver_module = importlib.import_module("driver")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict[str, Path]:
    """Stage 0 in-process, then the driver as the GPU call runs it."""
    root = tmp_path_factory.mktemp("mini_cpt")
    toy_corpora.build(root / "corpora")
    with mock.patch.dict(os.environ, TOY):
        assert prepare.main(["--corpora", str(root / "corpora"), "--output-dir",
                             str(root / "data"), "--workers", "1"]) == 0
    env = {**os.environ, **TOY, "MINI_CPT_RUNS": ",".join(RUNS), "OUT": str(root / "out"),
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(STUDY / "study.py"), "--data-dir",
                           str(root / "data"), "--work-dir", str(root / "work"), "all"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return {"root": root, "data": root / "data", "work": root / "work", "out": root / "out",
            "stdout": proc.stdout}


def _results(study) -> dict:
    return json.loads((study["out"] / "results.json").read_text())


@pytest.mark.e2e
def test_stage0_tokenizes_with_the_right_vocabularies(study):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = study["data"]
    base = sentencepiece.SentencePieceProcessor(
        model_file=str(data / "tokenizer" / "base" / "tokenizer.model"))
    extended = sentencepiece.SentencePieceProcessor(
        model_file=str(data / "tokenizer" / "extended" / "tokenizer.model"))
    record = json.loads((data / "prepare.json").read_text())
    assert extended.vocab_size() == base.vocab_size() + record["extend_stats"]["added"]
    for lang, tokenizer, new_pieces in (("en", base, False), ("zh", extended, True)):
        dataset = IndexedDataset(str(data / f"{lang}_train_text_document"))
        ids = numpy.concatenate([dataset[i] for i in range(len(dataset))])
        assert len(ids) == record[f"{lang}_train"]["tokens"]
        assert ids.max() < tokenizer.vocab_size()
        assert (ids >= base.vocab_size()).any() == new_pieces  # Chinese uses the new pieces
        first = (data / f"{lang}_train.txt")
        assert not first.exists()  # the intermediate text is removed
    heldout = (data / "heldout" / "news.txt").read_text(encoding="utf-8")
    corpus = (study["root"] / "corpora" / "zh" / "heldout" / "news.txt").read_text("utf-8")
    assert heldout.strip() and corpus.startswith(heldout.strip().split("\n\n")[0])


@pytest.mark.e2e
def test_driver_trains_evaluates_and_records_every_run(study):
    results = _results(study)
    toy = settings.TOY
    assert results["profile"] == "toy" and results["plan"]["cpt_iters"] == toy.cpt.iters
    base = results["base"]
    assert base["status"] == "ok"
    assert [step for step, _ in base["losses"]] == list(range(1, toy.base.iters + 1))
    assert base["losses"][-1][1] < base["losses"][0][1] - 0.5  # the base learned English
    assert set(results["runs"]) == set(RUNS)
    for name in RUNS:
        run = results["runs"][name]
        assert run["status"] == "ok", run.get("log_tail")
        assert [step for step, _ in run["losses"]] == list(range(1, toy.cpt.iters + 1))
        assert set(run["ppl"]) == set(settings.EVAL_SETS)
        assert all(math.isfinite(p) and p > 1 for p in run["ppl"].values())
        for domain in ZH:  # continual pre-training on Chinese helps every Chinese domain
            assert run["ppl"][domain] < base["ppl"][domain] / 10, (name, domain)
        assert not (study["work"] / name / "checkpoint").exists()  # deleted after evaluation
    sat = results["runs"]["maxip-sampling-lors"]["sat"]
    eta = round(2 * toy.cpt.iters / 3)
    assert (sat["omission_rate"], sat["lors_start"], sat["lors_ladders"]) == (0.5, eta, 5)
    rates = [r["omission_rate"] for r in results["runs"]["maxip-sampling-lors"]["throughput"]]
    assert rates[0] == 0.5 and rates[-1] == 0.0  # LORS: sparse first, dense at the end
    assert results["runs"]["maxip-sampling-lors"]["flops"] < results["runs"]["full"]["flops"]
    # the base in its own vocabulary on English is the resized base there, up to the
    # probability mass the new (Chinese) output rows take
    assert base["ppl_own_tokenizer"]["en"] <= base["ppl"]["en"] < 1.5 * base[
        "ppl_own_tokenizer"]["en"]
    size = sum(p.stat().st_size for p in study["out"].rglob("*") if p.is_file())
    assert size < 1 << 20
    assert "finished: 2 of 2 runs ok" in study["stdout"]


@pytest.mark.e2e
def test_resize_keeps_the_old_token_logits(study):
    from megatron_sat.convert import load_hf_from_megatron

    work, data = study["work"], study["data"]
    base_tok = data / "tokenizer" / "base" / "tokenizer.model"
    ext_tok = data / "tokenizer" / "extended" / "tokenizer.model"
    base = load_hf_from_megatron(work / "base" / "checkpoint", tokenizer_model=base_tok)
    resized = load_hf_from_megatron(work / "base_resized", tokenizer_model=ext_tok)
    old = base.config.vocab_size
    assert resized.config.vocab_size == sentencepiece.SentencePieceProcessor(
        model_file=str(ext_tok)).vocab_size() > old
    ids = torch.randint(0, old, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, after = base(input_ids=ids).logits, resized(input_ids=ids).logits
    assert torch.equal(after[..., :old], before)


@pytest.mark.e2e
def test_evaluating_with_the_wrong_tokenizer_fails(study, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    evaluate_ppl = importlib.import_module("evaluate_ppl")
    data = study["data"]
    code = evaluate_ppl.main(["--model", str(study["work"] / "base" / "checkpoint"),
                              "--tokenizer-model",
                              str(data / "tokenizer" / "extended" / "tokenizer.model"),
                              "--input", str(data / "heldout" / "en.txt")])
    assert code == 2
    assert "the model's embedding has 512 rows" in capsys.readouterr().err


@pytest.mark.e2e
def test_report_renders_the_tables_and_the_figure(study, tmp_path):
    results = _results(study)
    doc = tmp_path / "quality.md"
    doc.write_text(f"# head\n\n{report.BEGIN}\nTODO\n{report.END}\n\ntail\n", encoding="utf-8")
    figure = tmp_path / "img" / "loss.png"
    with mock.patch.dict(os.environ, TOY):
        assert report.main([str(study["out"] / "results.json"), "--doc", str(doc),
                            "--figure", str(figure)]) == 0
    text = doc.read_text(encoding="utf-8")
    assert text.startswith("# head\n\n") and text.endswith("\n\ntail\n") and "TODO" not in text
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](img/loss.png)" in text
    rows = {line.split(" | ")[0]: line.split(" | ") for line in text.splitlines()
            if line.startswith("| ") and line.split(" | ")[0][2:].isdigit()}
    for number, name in (("| 1", "base"), ("| 2", "full"), ("| 11", "maxip-sampling-lors")):
        run = results["base"] if name == "base" else results["runs"][name]
        cells = rows[number]
        assert cells[5:9] == [report.fmt(run["ppl"][d]) for d in ZH]
        avg = statistics.fmean(run["ppl"][d] for d in ZH)
        assert cells[9] == f"**{report.fmt(avg)}**"
        assert cells[10] == report.fmt(run["ppl"]["en"])
    assert rows["| 2"][11] == "1.00"
    flops = results["runs"]["maxip-sampling-lors"]["flops"] / results["runs"]["full"]["flops"]
    assert rows["| 11"][11] == f"{flops:.2f}"
    assert rows["| 4"][-1].startswith("not run")  # magnitude top-k was not in this study


def _fake_results(avg: dict[str, float]) -> dict:
    """Results whose runs have the same perplexity in every domain."""
    runs = {name: {"name": name, "status": "ok", "seed": 1234, "flops": 1,
                   "ppl": {**{d: v for d in ZH}, "en": 10.0}} for name, v in avg.items()}
    return {"runs": runs, "base": None}


def test_claims_follow_the_issue_definitions():
    good = {"full": 10.0, "full-s2": 10.4, "uniform": 14.0, "uniform-lors": 11.0,
            "maxip-sampling": 13.0, "maxip-sampling-lors": 10.3, "spdf": 11.5,
            "magnitude-topk": 20.0, "magnitude-sampling": 15.0, "wanda-topk": 18.0,
            "wanda-sampling": 14.5, "maxip-topk": 19.0}
    lines = report.claims(_fake_results(good))
    assert [line.split(":")[1].split(".**")[0].strip() for line in lines] == ["held"] * 4
    assert "10.30 vs 10.20 (+1.0%)" in lines[2]  # full is the mean of its two seeds
    assert "largest seed spread of a headline run: 0.40" in lines[2]
    assert "uniform: 14.00 -> 11.00 with LORS (full 10.20), 79% of the gap closed" in lines[1]
    bad = {**good, "wanda-sampling": 18.5, "uniform-lors": 13.0, "maxip-sampling-lors": 11.0,
           "spdf": 10.9}
    assert [line.split(":")[1].split(".**")[0].strip() for line in report.claims(
        _fake_results(bad))] == ["did not hold"] * 4
    missing = report.claims(_fake_results({"full": 10.0}))
    assert all("not measured" in line for line in missing)


# Stands in for `study.py`: each stage is instant; `uniform` fails, `maxip-sampling-lors`
# hangs. Records the arguments it got.
FAKE_JOB = """
import json, sys, time
from pathlib import Path
work, command = Path(sys.argv[1]), sys.argv[2:]
name = "base" if command[0] in ("base", "evaluate") else command[-1] if command[0] == "resize" \\
    else command[1]
if command[0] == "run" and name == "uniform":
    sys.exit(3)
if command[0] == "run" and name == "maxip-sampling-lors":
    time.sleep(120)
if command[0] in ("base", "run"):
    (work / name).mkdir(parents=True, exist_ok=True)
    (work / name / "result.json").write_text(json.dumps(
        {"name": name, "status": "ok", "argv": command}))
"""


def test_driver_records_failures_kills_at_the_budget_and_skips(tmp_path, monkeypatch):
    fake = tmp_path / "fake_study.py"
    fake.write_text(FAKE_JOB)
    monkeypatch.setenv("MINI_CPT_RUNS", "full,uniform,maxip-sampling-lors,spdf")
    monkeypatch.setenv("MINI_CPT_BUDGET_S", "4")
    monkeypatch.setenv("MINI_CPT_PARALLEL", "1")
    monkeypatch.setenv("MINI_CPT_CPT_ITERS", "7")
    work, out = tmp_path / "work", tmp_path / "out"
    driver = driver_module.Driver(settings.TOY, study_module.Paths(tmp_path / "data", work), out,
                                 [sys.executable, str(fake), str(work)])
    assert driver.main() == 0
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert results["plan"]["cpt_iters"] == 7 and results["plan"]["reason"] == "MINI_CPT_CPT_ITERS"
    assert runs["full"]["status"] == "ok" and runs["full"]["argv"] == ["run", "full", "--iters",
                                                                       "7"]
    assert runs["uniform"]["status"] == "failed" and runs["uniform"]["error"] == "exit status 3"
    assert runs["maxip-sampling-lors"]["status"] == "killed"
    assert runs["maxip-sampling-lors"]["error"] == "time budget exhausted"
    assert 1 <= runs["maxip-sampling-lors"]["job_wall_s"] < 20
    assert runs["spdf"] == {"name": "spdf", "status": "skipped", "error": "time budget"}
    assert results["base"]["status"] == "ok"
    assert any("spdf: skipped" in message for _, message in results["events"])


@pytest.mark.parametrize("iters", [60, 200])
def test_spdf_matches_the_flops_of_maxip_sampling_lors(iters):
    prof = settings.FULL
    shape = study_module.model_shape(prof, 42_820)
    runs = {r.name: r for r in settings.RUNS}
    tokens = prof.tokens_per_iter
    configs = {n: study_module.sat_config(runs[n], iters, shape, tokens)
               for n in ("spdf", "maxip-sampling-lors")}
    spdf, sat = configs["spdf"], configs["maxip-sampling-lors"]
    assert (sat.lors_start, sat.lors_ladders) == (round(2 * iters / 3), 5)
    assert spdf.lors_ladders == 1 and (spdf.metric, spdf.selection) == ("magnitude", "topk")
    # rate 0.5 through step eta, dense after it
    rates = [study_module.omission_rate_at(spdf, i) for i in range(iters)]
    assert rates == [0.5] * spdf.lors_start + [0.0] * (iters - spdf.lors_start)
    flops = {n: study_module.total_flops(shape, c, tokens) for n, c in configs.items()}
    step = {r: study_module.step_flops(shape, tokens, r) for r in (0.0, 0.5)}
    # one more or one fewer sparse iteration would be further from the reference
    assert abs(flops["spdf"] - flops["maxip-sampling-lors"]) <= (step[0.0] - step[0.5]) / 2
    assert 0.6 * iters < spdf.lors_start < 0.8 * iters
