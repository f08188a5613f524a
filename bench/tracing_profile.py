"""Where `always_on` tracing spends a process's CPU: py-spy on the API under the submitText
load and on the async worker draining its jobs, each with tracing on, every span sampled.

A sample counts as tracing when OpenTelemetry's code is on its stack (span creation and
end, context, propagation, and the batch processor's thread encoding and sending spans),
or when its innermost frame is the service's own tracing code (gql_service/tracing.py,
trace_export.py, api/http_spans.py, worker/job_spans.py). Shares are of the samples where
the process was busy, every thread included: unlike requests/s on a shared machine, they
do not move with what else runs on it.
"""

from __future__ import annotations

import collections
import contextlib
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from redis import Redis

from tests.openai_stub import OpenAIStub
from tests.service import Service, wait_until

from .async_worker import _submit_texts
from .harness import loadgen, py_spy_samples
from .scenarios import SUBMIT_BODY, Sizes, _wait_all_terminal

GLUE = ("gql_service/tracing.py", "gql_service/trace_export.py", "api/http_spans.py", "worker/job_spans.py")
EXPORT = ("opentelemetry/sdk/trace/export", "opentelemetry/exporter/", "opentelemetry/sdk/_shared_internal")


@contextlib.contextmanager
def spy(pid: int) -> Iterator[dict[str, Any]]:
    """py-spy on `pid` while the block runs; then the shares, in the dict it yields."""
    shares: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "profile.txt"
        py_spy = str(Path(sys.executable).parent / "py-spy")
        process = subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--format", "raw", "--output", str(raw), "--rate", "200",
             "--nonblocking", "--full-filenames"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            yield shares
        finally:
            process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            if process.wait(30) != 0 or not raw.exists():
                raise RuntimeError("py-spy could not profile the process (it needs ptrace)")
            shares.update(classify(raw.read_text()))


def classify(raw: str) -> dict[str, Any]:
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for frames, n in py_spy_samples(raw):
        total += n
        if any(f"/{part}" in frame for frame in frames for part in EXPORT):
            counts["export"] += n  # the batch processor's thread: encoding, the HTTP request
        elif any("/opentelemetry/" in frame for frame in frames):
            counts["spans"] += n  # on the request's or the job's path
        elif any(part in frames[-1] for part in GLUE):
            counts["glue"] += n
    total = total or 1
    shares = {name: counts[name] / total for name in ("spans", "export", "glue")}
    return {"samples": total, "share": sum(shares.values()), **shares}


def profile(redis_url: str, stub: OpenAIStub, sizes: Sizes, env: dict[str, str]) -> dict[str, Any]:
    """`env`: tracing on, always_on, to a receiver that is up."""
    from .harness import api_pid

    result: dict[str, Any] = {}
    with Service(redis_url, workers=0, env={"RQ_QUEUE": "bench-tracing-profile-api", **env}) as svc:
        loadgen(svc.http_url, SUBMIT_BODY, concurrency=sizes.concurrency, duration=sizes.submit_seconds / 2)
        with spy(api_pid(svc)) as shares:
            loadgen(svc.http_url, SUBMIT_BODY, concurrency=sizes.concurrency, duration=sizes.submit_seconds * 2)
        result["api"] = shares
    stub.latency_s = sizes.async_llm_s
    worker_env = {
        "RQ_QUEUE": "bench-tracing-profile-worker", "LLM_PROVIDER": "openai", "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": stub.base_url, "WORKER_CONCURRENCY": "256", "LLM_STREAM": "false", **env,
    }  # fmt: skip
    try:
        with Service(redis_url, workers=0, env=worker_env) as svc:
            worker = svc.start_worker(1)
            wait_until(lambda: "Listening on" in worker.output(), timeout_s=90, what="the worker to listen")
            with spy(worker.popen.pid) as shares:
                ids = _submit_texts(svc, sizes.async_jobs)
                _wait_all_terminal(Redis.from_url(redis_url), ids, timeout=300)
            result["worker"] = shares
    finally:
        stub.latency_s = 0.0
    return result
