"""``pretrain_sat.py`` end to end on CPU (gloo): parallel layouts, exact resume, start-up
errors and ``--help``.

The ``e2e`` tests launch ``torchrun`` with a tiny GPT (see ``_launch.py``); each run takes
10-20 s on two cores, mostly imports. Run only the quick ones with ``-m "not e2e"``.
"""

from __future__ import annotations

import pytest

from _launch import MOCK_DATA, TINY_GPT, TRAINING, Run, pretrain, read_tensorboard, run_script

NO_DROPOUT = ["--attention-dropout", "0", "--hidden-dropout", "0"]
ITERATIONS = range(1, 13)


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
    """One process, fp32, no dropout; saves a checkpoint after iteration 6."""
    return runs("tp1", 1, NO_DROPOUT + ["--save", str(workdir / "tp1-checkpoint"),
                                        "--save-interval", "6"])


def _data_parallel_fp32(runs) -> Run:
    # Also the uninterrupted run of the fp32 resume test.
    return runs("dp2-distopt-fp32", 2, NO_DROPOUT + ["--use-distributed-optimizer"])


@pytest.mark.e2e
def test_single_process_run_learns_and_logs_the_omission_rate(runs, workdir):
    ref = _reference(runs, workdir)
    assert sorted(ref.exact) == list(ITERATIONS)
    assert ref.exact[12] < 0.75 * ref.exact[1]  # the mock data is learnable
    rates = read_tensorboard(ref.tensorboard_dir, "sat omission rate")
    assert rates == {i: 0.0 for i in ITERATIONS}
    assert "sat omission rate: 0.000000E+00" in ref.output


@pytest.mark.e2e
@pytest.mark.parametrize("layout", ["tp2", "dp2", "pp2"])
def test_parallel_layout_matches_single_process(runs, workdir, layout):
    ref = _reference(runs, workdir)
    if layout == "tp2":
        run = runs("tp2", 2, NO_DROPOUT + ["--tensor-model-parallel-size", "2"])
        trained = ITERATIONS
    elif layout == "dp2":
        run = _data_parallel_fp32(runs)
        trained = ITERATIONS
    else:
        # Megatron seeds each pipeline stage differently (seed + 100 * stage), so a PP=2
        # run cannot start from the TP=1 weights: continue from its checkpoint instead.
        run = runs("pp2", 2, NO_DROPOUT + [
            "--pipeline-model-parallel-size", "2",
            "--load", str(workdir / "tp1-checkpoint"), "--ckpt-step", "6"])
        trained = range(7, 13)
    assert sorted(run.exact) == list(trained)
    assert run.exact[trained[-1]] < 0.85 * run.exact[trained[0]]
    for i in trained:
        assert run.exact[i] == pytest.approx(ref.exact[i], rel=1e-4), (i, run.exact, ref.exact)


@pytest.mark.e2e
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_distributed_optimizer_resumes_exactly(runs, tmp_path, precision):
    if precision == "fp32":
        flags = NO_DROPOUT + ["--use-distributed-optimizer"]
        full = _data_parallel_fp32(runs)
    else:  # with dropout: the RNG states must be restored too
        flags = ["--bf16", "--use-distributed-optimizer"]
        full = runs("dp2-distopt-bf16", 2, flags)
    save = ["--save", str(tmp_path / "checkpoint"), "--save-interval", "6"]

    first = pretrain(2, flags + save + ["--exit-interval", "6"], tmp_path / "tb-first")
    assert first.returncode == 0, first.output[-6000:]
    assert (tmp_path / "checkpoint" / "iter_0000006").is_dir()
    assert sorted(first.exact) == list(range(1, 7))

    second = pretrain(2, flags + save + ["--load", str(tmp_path / "checkpoint")],
                      tmp_path / "tb-second")
    assert second.returncode == 0, second.output[-6000:]
    assert sorted(second.exact) == list(range(7, 13))

    for i in ITERATIONS:  # float32 from TensorBoard: equal means bitwise equal
        assert (first.exact | second.exact)[i] == full.exact[i], (i, first.exact,
                                                                 second.exact, full.exact)
    # The printed losses (7 digits) agree too, except iteration 8: megatron's first log
    # line of a run does not reset its running sums (training_log, is_first_iteration),
    # so with --log-interval 1 a run's second line shows the mean of its first two
    # iterations. For the resumed run that is the line of iteration 8.
    for i in (7, 9, 10, 11, 12):
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
], ids=["rate-1", "rate-negative", "unknown-metric", "heads-over-tp", "missing-data"])
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
