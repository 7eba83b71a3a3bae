"""ruff (configured in pyproject.toml's [tool.ruff]) passes on the package, the tests and the benchmarks; mypy
(its [tool.mypy]: the packages named in `files`) finds no type error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUFF = os.path.join(os.path.dirname(sys.executable), "ruff")
MYPY = os.path.join(os.path.dirname(sys.executable), "mypy")


def test_ruff_check_passes():
    if not os.path.isfile(RUFF):
        pytest.skip(f"ruff is not installed next to {sys.executable}: pip install --group dev")
    proc = subprocess.run([RUFF, "check", "--no-cache", "moe_monitor", "tests", "benchmarks"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"ruff check failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"


def test_mypy_passes():
    if not os.path.isfile(MYPY):
        pytest.skip(f"mypy is not installed next to {sys.executable}: pip install --group dev")
    proc = subprocess.run([MYPY], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mypy failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
