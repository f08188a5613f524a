"""API keys for the LLM endpoints go in an HTTP header: one that can't is a bad setting,
said in one line at start-up, not a failure of every job later."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .test_cli import run_cli


@pytest.mark.parametrize(
    "key", ["sk-…abc", "sk-abc\u2013def", "sk-abc\n", "sk-ab\x07c"], ids=["ellipsis", "dash", "newline", "bell"]
)
@pytest.mark.parametrize("command", ["worker", "serve"])
def test_a_key_no_header_can_carry_is_one_line_at_start_up(tmp_path: Path, key: str, command: str) -> None:
    result = run_cli(command, env={"OPENAI_API_KEY": key}, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("gql-service: bad setting: OPENAI_API_KEY:") and "HTTP header" in lines[0]
    assert key.strip() not in result.stderr  # a secret is never printed


def test_a_fallback_key_no_header_can_carry_is_one_line_at_start_up(tmp_path: Path) -> None:
    fallbacks = json.dumps([{"model": "m", "apiKeyEnv": "GQLS_FALLBACK_KEY"}])
    env = {"OPENAI_API_KEY": "sk-fine", "LLM_FALLBACKS": fallbacks, "GQLS_FALLBACK_KEY": "sk-…"}
    result = run_cli("worker", env=env, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("gql-service: bad setting: LLM_FALLBACKS:") and "sk-…" not in lines[0]
    assert "entry 0: the key in GQLS_FALLBACK_KEY holds a character an HTTP header can't carry" in lines[0]
