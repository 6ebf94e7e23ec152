"""Import the project's scripts (``tools/*.py``, ``examples/...``) as modules in tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

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


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py``."""
    return load_script(REPO / "tools" / f"{name}.py")


def train_tiny_tokenizer(out: Path, vocab: int, files: list[Path]) -> Path:
    """``tools/train_tokenizer.py`` on ``files`` into ``out``; its ``tokenizer.model``."""
    argv = ["--input", *map(str, files), "--output-dir", str(out), "--vocab-size", str(vocab)]
    assert load_tool("train_tokenizer").main(argv) == 0
    return out / "tokenizer.model"
