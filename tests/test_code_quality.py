"""Typed throughout and lint-clean: the same checks a reviewer would run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_mypy_strict_passes() -> None:
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_lint_and_format_pass() -> None:
    lint = run("ruff", "check", "gql_service", "tests", "worker.py")
    assert lint.returncode == 0, lint.stdout
    fmt = run("ruff", "format", "--check", "gql_service", "tests", "worker.py")
    assert fmt.returncode == 0, fmt.stdout


def test_module_boundaries_hold() -> None:
    """The contracts in pyproject.toml: workers never import Strawberry, the API never
    imports the worker side, providers never touch Redis."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout, result.stdout
