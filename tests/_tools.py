"""Helpers for the tests: import the project's scripts (``tools/*.py``, ``examples/...``) as
modules, run the Triton kernels' case scripts in the CPU interpreter, and run a snippet in
a fresh process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path) -> ModuleType:
    """The module of ``path`` under its file name, registered in ``sys.modules`` (where
    dataclasses look their module up); loaded once per test session."""
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_interpreted(script: str, tmp_path_factory) -> dict:
    """``tests/<script> OUT`` in a subprocess with Triton's CPU interpreter: the JSON it
    writes to OUT, a file under pytest's ``tmp_path_factory``. The Triton kernels' tests
    run this way in CI (no GPU); skipped without Triton."""
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp(Path(script).stem) / "records.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, str(REPO / "tests" / script), str(out)], env=env,
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


def run_snippet(code: str, *args: str, timeout: int = 600) -> dict:
    """``python -c code args...`` in a fresh process (for checks that change megatron's
    module attributes for good) from the repository root: the JSON object it prints last."""
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=timeout, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py``."""
    return load_script(REPO / "tools" / f"{name}.py")


def train_tiny_tokenizer(out: Path, vocab: int, files: list[Path]) -> Path:
    """``tools/train_tokenizer.py`` on ``files`` into ``out``; its ``tokenizer.model``."""
    argv = ["--input", *map(str, files), "--output-dir", str(out), "--vocab-size", str(vocab)]
    assert load_tool("train_tokenizer").main(argv) == 0
    return out / "tokenizer.model"
