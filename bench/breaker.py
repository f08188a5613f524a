"""18. What the fallbacks' circuit breaker costs a job on the healthy path.

The same batch, queued and then drained by one async worker at concurrency 256 against the
stub at 0 ms (the worker bound by its CPU, so any cost shows in full), with LLM_FALLBACKS
unset (no breaker: each call checks the pause, PTTL) and set (each call checks the pause and
the primary's breaker in one script), in interleaved rounds of the same run. The primary
should answer every call, so the fallback, a stub of its own, should get none: the section
says how many it got (the stub, a thread of the harness's process, has failed a few calls of
a 256-call burst; without fallbacks those are retried, with them they go to the fallback).
"""

from __future__ import annotations

import json
from typing import Any

from redis import Redis

from tests.openai_stub import OpenAIStub

from .async_worker import run_workers
from .harness import median, progress
from .scenarios import Sizes

FIGURES = ("jobs_per_s", "cpu_ms_per_job", "p50_ms", "p99_ms")


def breaker(redis_url: str, stub: OpenAIStub, sizes: Sizes) -> dict[str, Any]:
    progress("18. the fallbacks' circuit breaker: its checks' cost per job, on a healthy primary")
    redis = Redis.from_url(redis_url)
    stub.reset()
    fallback = OpenAIStub().start()
    on = {"LLM_FALLBACKS": json.dumps([{"model": "bench-fallback", "baseUrl": fallback.base_url}])}
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    shape: dict[str, Any] = {"worker_class": "async", "workers": 1, "concurrency": 256, "jobs": sizes.breaker_jobs}
    try:
        for _ in range(sizes.breaker_rounds):
            runs["off"].append(run_workers(redis, redis_url, stub, **shape))
            runs["on"].append(run_workers(redis, redis_url, stub, **shape, settings=on))
        fallback_calls = len(fallback.arrivals)
    finally:
        fallback.stop()
    rows = {name: {k: median(r[k] for r in rounds) for k in FIGURES} for name, rounds in runs.items()}
    ratio = rows["on"]["jobs_per_s"] / rows["off"]["jobs_per_s"]
    progress(
        f"    jobs/s off {rows['off']['jobs_per_s']:.1f}, on {rows['on']['jobs_per_s']:.1f} ({ratio:.2f}x); "
        f"CPU ms per job off {rows['off']['cpu_ms_per_job']:.2f}, on {rows['on']['cpu_ms_per_job']:.2f}"
    )
    return {"jobs": sizes.breaker_jobs, "rounds": sizes.breaker_rounds, "concurrency": 256, "rows": rows,
            "ratio": ratio, "runs": runs, "fallback_calls": fallback_calls}  # fmt: skip


def report(b: dict[str, Any]) -> list[str]:
    rows = b["rows"]
    cpu = rows["on"]["cpu_ms_per_job"] - rows["off"]["cpu_ms_per_job"]
    return [
        "## 18. Fallbacks: the circuit breaker's checks on a healthy primary",
        "",
        f"{b['jobs']} jobs queued, then one async worker (concurrency {b['concurrency']}) drains them against the stub",
        "at 0 ms, so the worker is bound by its CPU and any cost shows in full: with `LLM_FALLBACKS` unset (no",
        "breaker; each call checks the pause) and set (each call checks the pause and the primary's breaker in the",
        f"same script, and counts nothing back while it answers), {b['rounds']} interleaved rounds each (medians).",
        f"The fallback got {b['fallback_calls']} calls (0 when the primary, the stub, answered every call).",
        "",
        "| `LLM_FALLBACKS` | jobs/s | CPU ms per job | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(
            f"| {name} | {r['jobs_per_s']:.1f} | {r['cpu_ms_per_job']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |"
            for name, r in (("unset", rows["off"]), ("set", rows["on"]))
        ),
        "",
        f"With the breaker: {b['ratio']:.2f}x the jobs/s, {cpu:+.2f} CPU ms per job; the rounds ranged "
        f"{_spread(b, 'off', 'jobs_per_s', '.1f')} jobs/s and {_spread(b, 'off', 'cpu_ms_per_job', '.2f')} CPU ms "
        f"unset, {_spread(b, 'on', 'jobs_per_s', '.1f')} and {_spread(b, 'on', 'cpu_ms_per_job', '.2f')} set. A "
        "call makes the same one Redis round trip either way (tests/test_fallbacks.py counts them).",
        "",
    ]


def _spread(b: dict[str, Any], name: str, figure: str, form: str) -> str:
    values = [r[figure] for r in b["runs"][name]]
    return f"{min(values):{form}}-{max(values):{form}}"
