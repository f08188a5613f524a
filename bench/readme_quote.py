"""The README's few measured figures, written from the same results as BENCHMARKS.md.

`./scripts/bench` replaces what lies between the README's two markers; tests/test_readme.py
checks that it still says what BENCHMARKS.json holds, so the README can't quote a figure the
committed run did not measure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BEGIN = "<!-- bench: written by ./scripts/bench from BENCHMARKS.json (tests/test_readme.py checks it) -->"
END = "<!-- /bench -->"


def figures(results: dict[str, Any]) -> str:
    """One paragraph: each figure a ratio measured side by side in one run, where there is one."""
    parts = []
    sub = results.get("submit")
    if sub:
        parts.append(
            f"`submitText` serves {sub['ratio']:.2f}x the requests/s of the lesson's FastAPI + RQ endpoint "
            "doing the same enqueue (alternating rounds, one process each)"
        )
    ceiling = (results.get("async_worker") or {}).get("ceiling")
    if ceiling:
        parts.append(
            f"one async worker process drains jobs of a {ceiling['llm_ms'] / 1000:g} s LLM at "
            f"{ceiling['ratio']:.2f}x the calls/s of the OpenAI SDK alone at the same concurrency "
            f"({ceiling['concurrency']})"
        )
    garbage = results.get("garbage")
    if garbage:
        parts.append(
            f"{garbage['clients']} subscribers of {garbage['jobs']:,} streamed jobs get {garbage['frames']:,} frames "
            f"while the API's memory grows {garbage['growth_mib']:.0f} MiB and its slowest `/healthz` takes "
            f"{garbage['healthz']['max_ms']:.0f} ms"
        )
    if not parts:
        return "No benchmark has run yet: `./scripts/bench`."
    return (
        "Measured on a 2-core machine by one `./scripts/bench` ([BENCHMARKS.md](BENCHMARKS.md)): "
        + "; ".join(parts)
        + "."
    )


def block(results: dict[str, Any]) -> str:
    return f"{BEGIN}\n{figures(results)}\n{END}"


def quoted(readme: str) -> str:
    """What the README says between the markers (with them)."""
    start = readme.index(BEGIN)
    return readme[start : readme.index(END, start) + len(END)]


def rewrite(readme: Path, results: dict[str, Any]) -> None:
    text = readme.read_text()
    readme.write_text(text.replace(quoted(text), block(results)))
