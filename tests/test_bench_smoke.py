"""Every benchmark scenario at tiny size, so the suite can't rot (the full run is ./scripts/bench)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# About 210 s alone on an idle 2-core machine; CI runs it beside the other half of the suite.
@pytest.mark.timeout(660)
def test_bench_smoke_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = out.read_text()
    headings = (
        "## 1. submitText", "## 2. Subscription fan-out", "## 3. Worker pipeline", "## 4. End to end",
        "## 5. Scale-out", "## 6. Many LLM calls", "## 7. Streamed partial results",
        "## 8. The PostgreSQL job history", "## 9. Webhooks", "## 10. Redis behind Sentinel",
        "## 11. Subscriptions over HTTP", "## 12. A file of", "## 13. Hostile queries",
        "## 15. What tracing costs", "## 16. Tenant budgets", "## 17. Priorities", "## 18. Fallbacks",
        "## 20. Fan-out without garbage",
    )  # fmt: skip
    for heading in headings:
        assert heading in report
    figures = json.loads(out.with_suffix(".json").read_text())
    assert figures["submit"]["graphql"]["rps"] > 0 and figures["submit"]["rest"]["rps"] > 0
    assert all(row["redis_connections"] <= 3 for row in figures["fanout"])
    assert figures["scale_out"]["cross_stages"][-1] == "DONE"
    fan_out, cost = figures["partials"]["fan_out"], figures["partials"]["commands"]
    assert fan_out["frames_min"] >= 1 and fan_out["frames_max"] <= fan_out["bound"]
    # The record's own transitions publish either way; frames only while someone watches.
    publishes = {name: row["by_command"]["publish"] for name, row in cost.items()}
    assert publishes["on"] == publishes["off"] < publishes["on, watched"], publishes
    archive = figures["history"]["archive"]
    assert archive["rows_per_s"] > 0 and archive["on"]["jobs"] == archive["off"]["jobs"] == archive["jobs"]
    for hooks in figures["webhooks"]["rows"]:
        assert hooks["deliveries_per_s"] > 0 and hooks["on"]["jobs"] == hooks["off"]["jobs"] == hooks["jobs"]
    assert figures["bulk"]["cli"]["jobs_per_s"] > 0 and figures["bulk"]["by_hand"]["jobs_per_s"] > 0
    prio = figures["priorities"]
    assert prio["wait"]["p99_ms"] > 0 and prio["low_done"] < prio["low_jobs"], prio
    streams = figures["http_streams"]["rows"]
    assert all(row["kib_per_sub"] > 0 and row["one_p99_ms"] > 0 for row in streams.values())
    assert all(row["p50_ms"] > 0 for row in figures["hostile"]["rows"].values())
    # Tracing was on where it says so: every request and job traced with always_on, none off, nothing dropped.
    traced = figures["tracing"]
    submit, worker = traced["submit"], traced["worker"]
    assert submit["off"]["spans"] == 0 and worker["off"]["spans_per_job"] == 0
    assert 0.95 <= submit["always_on"]["spans_per_request"] <= 1.05 and worker["always_on"]["spans_per_job"] == 2
    assert all(row["dropped"] == 0 for row in submit.values()) and all(r["drop_warnings"] == 0 for r in worker.values())
    assert all(row["jobs_per_s"] > 0 and row["cpu_ms_per_job"] > 0 for row in figures["breaker"]["rows"].values())
    garbage = figures["garbage"]
    # Every client saw every job's snapshot at least (interim frames depend on timing).
    assert garbage["frames"] >= garbage["clients"] * garbage["jobs"] and garbage["healthz"]["requests"] > 0
    sentinel = figures["sentinel"]
    assert all(row["rps"] > 0 for row in sentinel["submit"].values())
    assert all(0 < row["window_s"] < 30 and row["refused"] > 0 for row in sentinel["failover"].values())
    assert (tmp_path / "bench-fanout.png").stat().st_size > 0 and (tmp_path / "bench-workers.png").stat().st_size > 0


def test_a_py_spy_sample_split_over_lines_is_read_whole() -> None:
    """A frame whose name holds a newline splits its sample over two lines of py-spy's raw
    output: the full run once stopped on it (`invalid literal for int()`)."""
    from bench.harness import py_spy_samples

    raw = "main (a.py:1);run (b.py:2) 7\nmain (a.py:1);<lambda\n> (__loader__:-3);call (c.py:4) 2\nidle (d.py:5) 1\n"
    assert list(py_spy_samples(raw)) == [
        (["main (a.py:1)", "run (b.py:2)"], 7),
        (["main (a.py:1)", "<lambda> (__loader__:-3)", "call (c.py:4)"], 2),
        (["idle (d.py:5)"], 1),
    ]
