"""9. Webhooks: deliveries/s to a loopback receiver, and what they cost the LLM jobs.

The same batch of `jobs`, queued and then drained by one async worker, without webhooks
and with a webhook on every job (WEBHOOK_CONCURRENCY at its default), in the same run; at
two points: the LLM at 0 ms (concurrency 256: the worker is bound by its CPU, so any cost
shows in full) and at 1 s (concurrency 64: bound by the LLM, as in production).
Deliveries/s is from the first event received to the last. The receiver is
tests/webhook_receiver.py (uvicorn, verifying each signature with `standardwebhooks`),
in a process of its own: in the harness's, it took the GIL from the LLM stub beside it,
and the LLM's answers, not the worker, slowed down.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import httpx
from redis import Redis

from tests.openai_stub import OpenAIStub

from .async_worker import run_workers
from .harness import progress
from .scenarios import Sizes

SECRET = "whsec_" + "YmVuY2htYXJrIHdlYmhvb2sgc2VjcmV0ISEhISEh"  # base64 of 30 bytes
SETTINGS = {"WEBHOOK_SECRET": SECRET, "WEBHOOK_ALLOW_PRIVATE": "true"}


class ReceiverProcess:
    """tests/webhook_receiver.py in a process of its own."""

    def __init__(self) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tests.webhook_receiver", SECRET], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.popen.stdout is not None
        self.port = int(self.popen.stdout.readline())

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def tally(self, path: str) -> dict[str, Any]:
        answer: dict[str, Any] = httpx.get(f"http://127.0.0.1:{self.port}/_received/{path}", timeout=10).json()
        return answer

    def stop(self) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.close()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()


def webhooks(redis_url: str, stub: OpenAIStub, sizes: Sizes) -> dict[str, Any]:
    progress("9. webhooks")
    redis = Redis.from_url(redis_url)
    jobs = sizes.webhook_jobs
    rows = []
    for llm_s, concurrency in ((0.0, 256), (sizes.async_llm_s, 64)):
        stub.reset()
        stub.latency_s = llm_s
        receiver = ReceiverProcess()
        path = f"bench-{llm_s}"
        try:
            shape = {"worker_class": "async", "workers": 1, "concurrency": concurrency, "jobs": jobs}
            off = run_workers(redis, redis_url, stub, **shape)  # type: ignore[arg-type]
            on = run_workers(redis, redis_url, stub, **shape, settings=SETTINGS, webhook_url=receiver.url(path),  # type: ignore[arg-type]
                             until=lambda: receiver.tally(path)["received"] >= jobs)  # fmt: skip  # noqa: B023
            received = receiver.tally(path)
        finally:
            receiver.stop()
        assert received["received"] == jobs and received["unverified"] == 0, "every event arrives and verifies"
        span = max(received["at"]) - min(received["at"])
        ratio = on["jobs_per_s"] / off["jobs_per_s"]
        per_s = (jobs - 1) / span if span > 0 else 0.0
        row = {"llm_ms": llm_s * 1000, "concurrency": concurrency, "jobs": jobs, "on": on, "off": off,
               "deliveries_per_s": per_s, "ratio": ratio}  # fmt: skip
        progress(f"    LLM {llm_s * 1000:.0f} ms, concurrency {concurrency}: {per_s:.0f} deliveries/s; jobs/s "
                 f"with webhooks {on['jobs_per_s']:.1f}, without {off['jobs_per_s']:.1f} ({ratio:.2f}x)")  # fmt: skip
        rows.append(row)
    return {"jobs": jobs, "rows": rows}
