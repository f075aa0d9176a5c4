"""Lint is part of the test suite: ruff, at the version pinned in the ``test`` extra, with the
rules in pyproject.toml's ``[tool.ruff]`` tables, over the whole repository.

A missing ruff fails the test (it does not skip): a skipped lint check would let a lint
problem through unnoticed.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_check_passes():
    if importlib.util.find_spec("ruff") is None:
        pytest.fail("ruff is not installed: install the test extra, "
                    "`pip install --no-build-isolation -e .[test]` (or `pip install -e .[test]`)",
                    pytrace=False)
    # --no-cache: leave no .ruff_cache behind in the working tree.
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                             "--output-format", "concise", str(ROOT)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
        pytest.fail(f"`ruff check` exited {result.returncode} (rules: pyproject.toml's "
                    f"[tool.ruff]; `ruff check --fix --select I` sorts imports):\n"
                    f"{result.stdout}{result.stderr}", pytrace=False)
