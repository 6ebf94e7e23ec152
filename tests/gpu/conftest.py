"""GPU tests: one session runs the whole multi-GPU suite (``multi_gpu.run_suite``) and
prints its summary table at the end. A bad GPU_TEST_* variable stops pytest at start-up
with a message naming it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import multi_gpu  # noqa: E402

_results: dict = {}


def pytest_configure(config) -> None:
    try:
        multi_gpu.check_settings()
    except multi_gpu.SuiteError as error:
        raise pytest.UsageError(str(error)) from None


@pytest.fixture(scope="session")
def suite(request) -> dict:
    """The suite's results (``results.json``), run once per session."""
    if not _results:
        out = multi_gpu.default_out()
        capture = request.config.pluginmanager.getplugin("capturemanager")

        def progress(line: str) -> None:
            with capture.global_and_fixture_disabled():  # live, past pytest's capture
                print(line, flush=True)

        _results.update(multi_gpu.run_suite(out, progress))
    return _results


def pytest_terminal_summary(terminalreporter) -> None:
    if _results:
        terminalreporter.write_line("")
        for line in multi_gpu.summary(_results).splitlines():
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"results: {multi_gpu.default_out() / 'results.json'}")
