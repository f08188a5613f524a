"""17. Priorities: how long HIGH jobs wait behind a backlog of LOW ones. `priority_low_jobs`
LOW jobs are queued, one async worker (concurrency 64, the LLM stub at `priority_llm_s`)
works through them, and once every slot is busy `priority_high_jobs` HIGH jobs are
submitted one at a time; each one's wait is from its submission to its start (the records'
own times), its end to end to its end.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
from redis import Redis

from gql_service import store
from gql_service.models import JobRecord
from tests.openai_stub import OpenAIStub
from tests.service import Service, wait_until

from .harness import pct, progress
from .scenarios import Sizes, stub_env

CONCURRENCY = 64
TEXT = "Ticket {n}: the parcel came late and the box was damaged, but support replaced it quickly."
SUBMIT_MANY = "mutation($inputs: [SubmitTextInput!]!) { submitTexts(inputs: $inputs) { job { id } } }"
SUBMIT = "mutation($t: String!) { submitText(input: {text: $t, priority: HIGH}) { job { id } } }"


def _records(redis: Redis, ids: list[str]) -> list[JobRecord]:
    return [r for r in (store.get_job_sync(redis, i) for i in ids) if r is not None]


def _ms(values: list[float]) -> dict[str, float]:
    return {"p50_ms": pct(values, 50), "p99_ms": pct(values, 99), "max_ms": max(values)}


def priorities(redis_url: str, stub: OpenAIStub, sizes: Sizes) -> dict[str, Any]:
    lows, highs, llm_s = sizes.priority_low_jobs, sizes.priority_high_jobs, sizes.priority_llm_s
    progress(f"17. {highs} HIGH jobs behind {lows} queued LOW ones, LLM {llm_s * 1000:.0f} ms, one async worker")
    stub.reset()
    stub.latency_s = llm_s
    redis = Redis.from_url(redis_url)
    env = stub_env("bench-prio", stub) | {"WORKER_CONCURRENCY": str(CONCURRENCY)}
    try:
        with Service(redis_url, workers=0, env=env) as svc, httpx.Client(timeout=60) as client:
            low: list[str] = []
            for start in range(0, lows, 100):
                inputs = [{"text": TEXT.format(n=n), "priority": "LOW"} for n in range(start, min(lows, start + 100))]
                body = client.post(svc.http_url, json={"query": SUBMIT_MANY, "variables": {"inputs": inputs}}).json()
                low += [p["job"]["id"] for p in body["data"]["submitTexts"]]
            svc.start_worker(1)
            wait_until(lambda: len(stub.requests) >= CONCURRENCY, timeout_s=120, what="every slot busy")
            started, low_before = time.monotonic(), sum(1 for r in _records(redis, low) if r.terminal)
            high: list[str] = []
            for n in range(highs):
                body = client.post(svc.http_url, json={"query": SUBMIT, "variables": {"t": TEXT.format(n=-n)}}).json()
                high.append(body["data"]["submitText"]["job"]["id"])
                time.sleep(llm_s / 2)  # the load's shape: HIGH jobs arriving one by one, not a burst
            wait_until(lambda: all(r.terminal for r in _records(redis, high)), timeout_s=120, what="the HIGH jobs")
            elapsed = time.monotonic() - started
            ended = _records(redis, high)
            low_done = sum(1 for r in _records(redis, low) if r.terminal) - low_before
    finally:
        stub.latency_s = 0.0
        redis.close()
    waits = [(r.started_at - r.created_at).total_seconds() * 1000 for r in ended if r.started_at]
    e2e = [(r.finished_at - r.created_at).total_seconds() * 1000 for r in ended if r.finished_at]
    low_per_s = low_done / elapsed
    result = {
        "low_jobs": lows, "high_jobs": highs, "llm_ms": llm_s * 1000, "concurrency": CONCURRENCY,
        "wait": _ms(waits), "end_to_end": _ms(e2e), "low_done": low_done, "low_per_s": low_per_s,
        # Where a job at the back of the backlog would be without priorities: first in, first out.
        "fifo_wait_s": lows / low_per_s if low_per_s else float("inf"),
    }  # fmt: skip
    progress(
        f"    HIGH wait p50 {result['wait']['p50_ms']:.0f} ms, p99 {result['wait']['p99_ms']:.0f} ms; end to end p50 "
        f"{result['end_to_end']['p50_ms']:.0f} ms; {low_done} LOW ended meanwhile ({low_per_s:.1f}/s)"
    )
    return result
