"""``pretrain_sat.py`` end to end on CPU (gloo): parallel layouts, exact resume, start-up
errors and ``--help``.

The ``e2e`` tests launch ``torchrun`` with a tiny GPT (see ``_launch.py``); each run takes
10-20 s on two cores, mostly imports. Run only the quick ones with ``-m "not e2e"``.
"""

from __future__ import annotations

import re

import pytest
import torch

from _launch import (MOCK_DATA, REPO, TINY_GPT, TRAINING, Run, pretrain, read_tensorboard,
                     run_script)

NO_DROPOUT = ["--attention-dropout", "0", "--hidden-dropout", "0"]
ITERATIONS = range(1, 13)
# SAT at r = 0.5, maxip + sampling, LORS from step 2 in 3 ladders over T = 12 steps.
SAT = ["--sat-omission-rate", "0.5", "--sat-metric", "maxip", "--sat-selection", "sampling",
       "--sat-lors-start", "2", "--sat-lors-ladders", "3"]
# Eq. 11 by hand for T = 12, eta = 2, L = 3: (t - eta) / (T - eta) = (t - 2) / 10 against
# the ladder bounds 1/7, 3/7, 7/7: t = 3 is ladder 1, t = 4..6 ladder 2, t >= 7 dense.
SAT_RATES = {1: 0.5, 2: 0.5, 3: 1 / 3, 4: 1 / 6, 5: 1 / 6, 6: 1 / 6} | {
    t: 0.0 for t in range(7, 13)}
# Every layout below, with SAT on.
LAYOUTS = {
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "tp2-sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "dp2": (2, ["--use-distributed-optimizer"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def runs(workdir):
    """``runs(name, nproc, flags)``: a successful training run, launched once per module."""
    done: dict[str, Run] = {}

    def get(name: str, nproc: int, flags: list[str]) -> Run:
        if name not in done:
            run = pretrain(nproc, flags, workdir / f"{name}-tensorboard")
            assert run.returncode == 0, run.output[-6000:]
            done[name] = run
        return done[name]

    return get


def _reference(runs, workdir) -> Run:
    """Dense (r = 0), one process, fp32, no dropout; saves a checkpoint after iteration 6."""
    return runs("tp1", 1, NO_DROPOUT + ["--save", str(workdir / "tp1-checkpoint"),
                                        "--save-interval", "6"])


def _sat_reference(runs) -> Run:
    return runs("sat-tp1", 1, NO_DROPOUT + SAT)


def _sat_data_parallel_fp32(runs) -> Run:
    # Also the uninterrupted run of the fp32 resume test.
    return runs("sat-dp2", 2, NO_DROPOUT + SAT + LAYOUTS["dp2"][1])


@pytest.mark.e2e
def test_single_process_run_learns_and_logs_the_omission_rate(runs, workdir):
    ref = _reference(runs, workdir)
    assert sorted(ref.exact) == list(ITERATIONS)
    assert ref.exact[12] < 0.75 * ref.exact[1]  # the mock data is learnable
    rates = read_tensorboard(ref.tensorboard_dir, "sat omission rate")
    assert rates == {i: 0.0 for i in ITERATIONS}
    assert "sat omission rate: 0.000000E+00" in ref.output


@pytest.mark.e2e
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dense_layout_matches_single_process(runs, workdir, layout):
    """At r = 0 every layout computes the same model: the losses agree to fp32 round-off."""
    ref = _reference(runs, workdir)
    nproc, flags = LAYOUTS[layout]
    if layout == "pp2":
        # Megatron seeds each pipeline stage differently (seed + 100 * stage), so a PP=2
        # run cannot start from the TP=1 weights: continue from its checkpoint instead.
        flags = flags + ["--load", str(workdir / "tp1-checkpoint"), "--ckpt-step", "6"]
        trained = range(7, 13)
    else:
        trained = ITERATIONS
    run = runs(layout, nproc, NO_DROPOUT + flags)
    assert sorted(run.exact) == list(trained)
    for i in trained:
        assert run.exact[i] == pytest.approx(ref.exact[i], rel=1e-4), (i, run.exact, ref.exact)


@pytest.mark.e2e
@pytest.mark.parametrize("layout", ["tp1", *LAYOUTS])
def test_sat_layout_trains_on_the_lors_schedule(runs, layout):
    """With SAT + LORS each layout draws its own subnetworks (per rank), so the losses
    differ from the single process; they must decrease and follow Eq. 11's rates."""
    if layout == "tp1":
        run = _sat_reference(runs)
    elif layout == "dp2":
        run = _sat_data_parallel_fp32(runs)
    else:
        nproc, flags = LAYOUTS[layout]
        run = runs(f"sat-{layout}", nproc, NO_DROPOUT + SAT + flags)
    assert sorted(run.exact) == list(ITERATIONS)
    assert run.exact[12] < 0.8 * run.exact[1]
    rates = read_tensorboard(run.tensorboard_dir, "sat omission rate")
    assert rates == pytest.approx(SAT_RATES, abs=1e-6)


@pytest.mark.e2e
@pytest.mark.parametrize("recompute", [
    ["--recompute-granularity", "full", "--recompute-method", "uniform",
     "--recompute-num-layers", "1"],
    ["--recompute-granularity", "selective"],
], ids=["full", "selective"])
def test_recompute_reproduces_the_losses_exactly(runs, tmp_path, recompute):
    """Recompute re-runs the forward with the indices drawn in the first forward."""
    ref = _sat_reference(runs)
    run = pretrain(1, NO_DROPOUT + SAT + recompute, tmp_path / "tb")
    assert run.returncode == 0, run.output[-6000:]
    assert run.exact == ref.exact


@pytest.mark.e2e
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_distributed_optimizer_resumes_exactly(runs, tmp_path, precision):
    """Stopped after iteration 5, inside LORS's second ladder, and resumed."""
    if precision == "fp32":
        flags = NO_DROPOUT + SAT + LAYOUTS["dp2"][1]
        full = _sat_data_parallel_fp32(runs)
    else:  # with dropout: the RNG states must be restored too
        flags = ["--bf16"] + SAT + LAYOUTS["dp2"][1]
        full = runs("sat-dp2-bf16", 2, flags)
    save = ["--save", str(tmp_path / "checkpoint"), "--save-interval", "5"]

    first = pretrain(2, flags + save + ["--exit-interval", "5"], tmp_path / "tb-first")
    assert first.returncode == 0, first.output[-6000:]
    assert (tmp_path / "checkpoint" / "iter_0000005").is_dir()
    assert sorted(first.exact) == list(range(1, 6))

    second = pretrain(2, flags + save + ["--load", str(tmp_path / "checkpoint")],
                      tmp_path / "tb-second")
    assert second.returncode == 0, second.output[-6000:]
    assert sorted(second.exact) == list(range(6, 13))

    for i in ITERATIONS:  # float32 from TensorBoard: equal means bitwise equal
        assert (first.exact | second.exact)[i] == full.exact[i], (i, first.exact,
                                                                 second.exact, full.exact)
    # The printed losses (7 digits) agree too, except iteration 7: megatron's first log
    # line of a run does not reset its running sums (training_log, is_first_iteration),
    # so with --log-interval 1 a run's second line shows the mean of its first two
    # iterations. For the resumed run that is the line of iteration 7.
    for i in (6, 8, 9, 10, 11, 12):
        assert second.printed[i] == full.printed[i], (i, second.printed, full.printed)


@pytest.mark.parametrize("flags,env,message", [
    (MOCK_DATA + ["--sat-omission-rate", "1.0"], {},
     "argument --sat-omission-rate: 1.0 is outside"),
    (MOCK_DATA + ["--sat-omission-rate", "-0.1"], {},
     "argument --sat-omission-rate: -0.1 is outside"),
    (MOCK_DATA + ["--sat-metric", "foo"], {}, "argument --sat-metric: invalid choice: 'foo'"),
    # As rank 0 of a 4-process job: the heads do not split over TP=4. Found before any
    # process group or model exists.
    (MOCK_DATA + ["--num-attention-heads", "6", "--num-query-groups", "2",
      "--hidden-size", "48", "--tensor-model-parallel-size", "4"], {"WORLD_SIZE": "4"},
     "--num-attention-heads 6 cannot be split over --tensor-model-parallel-size 4"),
    (["--data-path", "/nonexistent/corpus_text_document"], {},
     "--data-path /nonexistent/corpus_text_document: file not found: "
     "/nonexistent/corpus_text_document.bin"),
    (MOCK_DATA + ["--tokenizer-type", "GPTSentencePieceTokenizer",
                  "--tokenizer-model", "/nonexistent/tokenizer.model"], {},
     "--tokenizer-model /nonexistent/tokenizer.model: file not found"),
    (MOCK_DATA + ["--cuda-graph-impl", "local"], {},
     "--cuda-graph-impl local: SAT selects neurons in Python"),
    (MOCK_DATA + ["--reset-attention-mask"], {},
     "--reset-attention-mask: SAT's attention runs causal fused kernels"),
], ids=["rate-1", "rate-negative", "unknown-metric", "heads-over-tp", "missing-data",
        "missing-tokenizer", "cuda-graphs", "reset-attention-mask"])
def test_bad_input_fails_early_naming_the_flag(tmp_path, flags, env, message):
    save = ["--save", str(tmp_path / "checkpoint"), "--save-interval", "6"]
    result = run_script(TINY_GPT + TRAINING + flags + save, env=env)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"pretrain_sat.py: error: {message}" in result.stderr
    assert not (tmp_path / "checkpoint").exists()


def test_help_lists_megatron_and_sat_flags():
    result = run_script(["--help"])
    assert result.returncode == 0, result.stderr[-3000:]
    for flag in ("--sat-omission-rate", "--sat-metric", "--tensor-model-parallel-size",
                 "--use-distributed-optimizer", "--data-path"):
        assert flag in result.stdout
    assert "10%)" in result.stdout  # a help string with a bare "%", which crashes megatron
    assert "90% of data for training" in result.stdout  # and one with "%%"


@pytest.mark.e2e
def test_tokenizer_that_does_not_fit_the_checkpoint_fails_early(runs, workdir, tmp_path):
    """The reference checkpoint has 256 embedding rows (--vocab-size 256, a multiple of
    128); the demo tokenizer has 3072 pieces."""
    _reference(runs, workdir)
    tokenizer = REPO / "data" / "demo" / "tokenizer.model"
    flags = ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model",
             str(tokenizer), "--load", str(workdir / "tp1-checkpoint"),
             "--save", str(tmp_path / "checkpoint"), "--save-interval", "6"]
    result = run_script(TINY_GPT + TRAINING + MOCK_DATA + flags)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert (f"pretrain_sat.py: error: --tokenizer-model {tokenizer} has 3072 pieces, 3072 "
            "rows after padding to --make-vocab-size-divisible-by 128 x "
            "--tensor-model-parallel-size 1, but the checkpoint in --load "
            f"{workdir / 'tp1-checkpoint'} has 256 embedding rows") in result.stderr
    assert not (tmp_path / "checkpoint").exists()


def test_forward_losses_are_checked_once_per_iteration():
    """The NaN check sees the sum of an iteration's micro-batch losses at its last one:
    NaN if any was NaN; the next iteration starts afresh."""
    from pretrain_sat import IterationLosses

    losses = IterationLosses()
    assert losses.add(torch.tensor(1.0), 2) is None
    assert losses.add(torch.tensor(2.0), 2).item() == 3.0
    assert losses.add(torch.tensor(float("nan")), 2) is None
    assert torch.isnan(losses.add(torch.tensor(1.0), 2))
    assert losses.add(torch.tensor(5.0), 1).item() == 5.0
    # a pass cut short (an earlier iteration's pending loss) does not leak into the next
    assert losses.add(torch.tensor(1.0), 2, iteration=7) is None
    assert losses.add(torch.tensor(2.0), 2, iteration=8) is None
    assert losses.add(torch.tensor(3.0), 2, iteration=8).item() == 5.0


@pytest.mark.e2e
def test_evaluation_with_its_own_micro_batch_size(tmp_path):
    """Batches in evaluation have --eval-micro-batch-size rows: the same validation (and
    test) sequences in micro-batches of 1 give the losses of micro-batches of 2."""
    evaluate = ["--train-iters", "4", "--eval-interval", "4", "--eval-iters", "2"]
    losses = {}
    for mbs in (1, 2):
        run = pretrain(1, NO_DROPOUT + evaluate + ["--eval-micro-batch-size", str(mbs)],
                       tmp_path / f"eval{mbs}")
        assert run.returncode == 0, run.output[-3000:]
        # the periodic evaluation, then the final ones on the validation and test sets
        losses[mbs] = [float(v) for v in re.findall(
            r"validation loss at iteration 4 [^|]*\| lm loss value: ([0-9.E+-]+)", run.output)]
        assert len(losses[mbs]) == 3, run.output[-3000:]
    assert losses[1] == pytest.approx(losses[2], rel=1e-5)
