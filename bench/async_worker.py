"""6. Many LLM calls in flight per worker process: the async worker beside fork and simple.

Each run: a worker (pool) against the stub, jobs submitted with `submitTexts` once the
workers are up, every job's record read back for its submit -> DONE time, the worker
group's resident memory sampled all along, and its CPU time read at the end.
"""

from __future__ import annotations

import collections
import contextlib
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
from redis import Redis

from tests.openai_stub import OpenAIStub
from tests.service import Service, wait_until

from .harness import pct, progress, py_spy_samples
from .scenarios import Sizes, _wait_all_terminal, stub_env

SUBMIT_MANY = "mutation($inputs: [SubmitTextInput!]!) { submitTexts(inputs: $inputs) { job { id } } }"
TEXT = "I loved the clinic. Dr. Rao was kind. Waiting time was 10 minutes at Springfield General Hospital."


def _submit_texts(svc: Service, count: int, webhook_url: str | None = None) -> list[str]:
    ids: list[str] = []
    hook = {"webhookUrl": webhook_url} if webhook_url else {}
    with httpx.Client(timeout=30) as client:
        for start in range(0, count, 100):
            inputs = [{"text": f"{TEXT} ({n})", **hook} for n in range(start, min(count, start + 100))]
            body = client.post(svc.http_url, json={"query": SUBMIT_MANY, "variables": {"inputs": inputs}}).json()
            ids += [answer["job"]["id"] for answer in body["data"]["submitTexts"]]
    return ids


class _Group:
    """A worker process and its children: peak RSS (sampled) and CPU seconds."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak_mib = 0.0
        self.cpu_s = -self._cpu()  # from now: start-up is not per-job work
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _procs(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            total = 0.0
            for proc in self._procs():
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += proc.memory_info().rss / 2**20
            self.peak_mib = max(self.peak_mib, total)

    def _cpu(self) -> float:
        # The worker processes' own CPU, and their work horses' once reaped (children_*).
        total = 0.0
        for proc in self._procs():
            with contextlib.suppress(psutil.NoSuchProcess):  # a work horse that ended meanwhile
                times = proc.cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
        return total

    def stop(self) -> None:
        self.cpu_s += self._cpu()
        self._done.set()
        self._thread.join()


def run_workers(
    redis: Redis,
    redis_url: str,
    stub: OpenAIStub,
    *,
    worker_class: str,
    workers: int,
    concurrency: int,
    jobs: int,
    settings: dict[str, str] | None = None,
    until: Callable[[], bool] | None = None,
    webhook_url: str | None = None,
    queue: str | None = None,
    logs: list[str] | None = None,
) -> dict[str, Any]:
    """Queue `jobs`, start the workers, wait for every job to end (and then for `until`,
    noting when it held): the row of figures. `queue`: its name, instead of one made of the
    shape and `settings`; `logs`: where the processes' output goes once they have stopped."""
    more = "-".join(f"{k}={v}" for k, v in (settings or {}).items())
    queue = queue or f"bench-async-{worker_class}-{workers}-{concurrency}-{jobs}{more}"
    env = stub_env(queue, stub) | {"WORKER_CLASS": worker_class, "WORKER_CONCURRENCY": str(concurrency)}
    env |= settings or {}
    with Service(redis_url, workers=0, env=env) as svc:
        # Queued first, then the workers start: what is measured is how fast they drain a
        # batch, not how fast one API process takes it in.
        ids = _submit_texts(svc, jobs, webhook_url)
        worker = svc.start_worker(workers)
        wait_until(lambda: worker.output().count("Listening on") >= workers, timeout_s=90, what="the workers to listen")
        group = _Group(worker.popen.pid)
        done = _wait_all_terminal(redis, ids, timeout=jobs / max(workers, 1) * max(stub.latency_s, 0.01) * 4 + 120)
        group.stop()
        until_at = None
        if until is not None:
            wait_until(until, timeout_s=300, what="the condition after the jobs")
            until_at = time.time()
    if logs is not None:
        logs.append(svc.logs())
    first = min(r.started_at.timestamp() for r in done if r.started_at)
    last = max(r.finished_at.timestamp() for r in done if r.finished_at)
    # From the moment the workers took their first job to each job's end.
    latency = [(r.finished_at.timestamp() - first) * 1000 for r in done if r.finished_at]
    row = {
        "worker_class": worker_class, "workers": workers, "concurrency": concurrency, "jobs": len(done),
        "llm_ms": stub.latency_s * 1000, "jobs_per_s": len(done) / (last - first),
        "p50_ms": pct(latency, 50), "p99_ms": pct(latency, 99), "peak_rss_mib": group.peak_mib,
        "cpu_ms_per_job": group.cpu_s * 1000 / len(done),
        "first_end_at": min(r.finished_at.timestamp() for r in done if r.finished_at), "until_at": until_at,
    }  # fmt: skip
    shape = f"{workers} x {worker_class}" + (f" at concurrency {concurrency}" if worker_class == "async" else "")
    progress(
        f"    {shape}, {jobs} jobs, LLM {row['llm_ms']:.0f} ms: {row['jobs_per_s']:.1f} jobs/s, "
        f"p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, peak RSS {row['peak_rss_mib']:.0f} MiB, "
        f"{row['cpu_ms_per_job']:.2f} CPU ms/job"
    )
    return row


def _profile(redis: Redis, redis_url: str, stub: OpenAIStub, sizes: Sizes) -> dict[str, Any]:
    """py-spy on one async worker at concurrency 256: where its CPU goes, by library."""
    concurrency = 256
    env = stub_env("bench-async-profile", stub) | {"WORKER_CONCURRENCY": str(concurrency)}
    with tempfile.TemporaryDirectory() as tmp, Service(redis_url, workers=0, env=env) as svc:
        worker = svc.start_worker(1)
        wait_until(lambda: "Listening on" in worker.output(), timeout_s=90, what="the worker to listen")
        raw = Path(tmp) / "profile.txt"
        py_spy = str(Path(sys.executable).parent / "py-spy")
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(worker.popen.pid), "--format", "raw", "--output", str(raw),
             "--rate", "200", "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        ids = _submit_texts(svc, sizes.async_jobs)
        _wait_all_terminal(redis, ids, timeout=300)
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT (not on SIGTERM)
        if spy.wait(30) != 0 or not raw.exists():
            raise RuntimeError("py-spy could not profile the worker (it needs ptrace)")
        samples = raw.read_text()
    by_library: collections.Counter[str] = collections.Counter()
    total = 0
    for stack, count in py_spy_samples(samples):
        total += count
        # Inclusive: a sample counts for every library on its stack (RQ's bookkeeping calls
        # redis-py, the pipeline calls the SDK), so the shares overlap.
        for library in {_library(frame) for frame in stack} - {"other"}:
            by_library[library] += count
    total = total or 1
    shares = {name: count / total for name, count in by_library.most_common()}
    progress("    profile (share of samples with each library on the stack): "
             + ", ".join(f"{k} {v:.0%}" for k, v in list(shares.items())[:10]))  # fmt: skip
    return {"concurrency": concurrency, "jobs": sizes.async_jobs, "shares": shares}


def _library(frame: str) -> str:
    """`function (path/to/module.py:line)` -> the library it belongs to."""
    path = frame.rpartition("(")[2]
    for name in ("gql_service", "rq", "redis", "openai", "httpx2", "aiohttp", "uvloop", "pydantic", "asyncio",
                 "concurrent", "threading", "logging", "json", "limits", "uuid", "socket", "selectors"):  # fmt: skip
        # py-spy names a frame's file relative to its sys.path entry: "redis/asyncio/client.py".
        if path.startswith((f"{name}/", f"{name}.py")) or f"/{name}/" in path:
            return name
    return "other"


def async_worker(redis_url: str, stub: OpenAIStub, sizes: Sizes) -> dict[str, Any]:
    progress("6. many calls in flight per worker process: async vs fork vs simple")
    redis = Redis.from_url(redis_url)
    stub.latency_s = sizes.async_llm_s
    ceiling = against_the_sdk(redis, redis_url, stub, sizes)
    pool = {"workers": sizes.pool_workers, "concurrency": 1, "jobs": sizes.async_jobs}
    side_by_side = [
        run_workers(redis, redis_url, stub, worker_class="async", workers=1, concurrency=256, jobs=sizes.async_jobs),
        run_workers(redis, redis_url, stub, worker_class="fork", **pool),
        run_workers(redis, redis_url, stub, worker_class="simple", **pool),
    ]
    sweep = [
        run_workers(redis, redis_url, stub, worker_class="async", workers=1, concurrency=c, jobs=max(4 * c, 200))
        for c in sizes.async_sweep
    ]
    stub.latency_s = 0.0
    cpu = run_workers(redis, redis_url, stub, worker_class="async", workers=1, concurrency=256, jobs=sizes.async_jobs)
    stub.latency_s = sizes.async_llm_s
    profile = _profile(redis, redis_url, stub, sizes) if sizes.profile else None
    stub.latency_s = 0.0
    rpm = rpm_budget(redis_url, stub, sizes)
    return {
        "side_by_side": side_by_side, "ceiling": ceiling, "sweep": sweep, "cpu": cpu, "profile": profile, "rpm": rpm,
    }  # fmt: skip


def sdk_alone(stub: OpenAIStub, *, calls: int, concurrency: int) -> dict[str, Any]:
    """The worker's LLM client alone (bench/sdk_alone.py), in a process of its own."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.sdk_alone", stub.base_url, str(calls), str(concurrency)],
        capture_output=True, text=True, check=True, timeout=calls * max(stub.latency_s, 0.01) + 120,
    )  # fmt: skip
    row: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    progress(
        f"    the SDK alone, {calls} calls at concurrency {concurrency}, LLM {stub.latency_s * 1000:.0f} ms: "
        f"{row['calls_per_s']:.1f} calls/s, {row['cpu_ms_per_call']:.2f} CPU ms/call"
    )
    return row


def against_the_sdk(redis: Redis, redis_url: str, stub: OpenAIStub, sizes: Sizes) -> dict[str, Any]:
    """One async worker at concurrency 256 against its client's ceiling: the SDK alone making
    as many calls, as many at once, to the same stub, in alternating rounds so that both see
    the same machine (it is shared). Not streamed (LLM_STREAM=false) on either side."""
    concurrency, jobs, rounds = 256, sizes.async_jobs, []
    for n in range(sizes.ceiling_rounds):
        sdk = sdk_alone(stub, calls=jobs, concurrency=concurrency)
        worker = run_workers(
            redis, redis_url, stub, worker_class="async", workers=1, concurrency=concurrency, jobs=jobs,
            settings={"LLM_STREAM": "false"}, queue=f"bench-ceiling-{n}",
        )  # fmt: skip
        rounds.append({"sdk": sdk, "worker": worker, "ratio": worker["jobs_per_s"] / sdk["calls_per_s"]})
        progress(f"      round {n + 1}: the worker at {rounds[-1]['ratio']:.2f}x the SDK alone")
    return {
        "concurrency": concurrency, "jobs": jobs, "llm_ms": stub.latency_s * 1000, "rounds": rounds,
        "ratio": statistics.median(r["ratio"] for r in rounds),
    }  # fmt: skip


def rpm_budget(redis_url: str, stub: OpenAIStub, sizes: Sizes) -> dict[str, Any]:
    """LLM_RPM over two async worker processes with a deep queue, against a stub that
    enforces the same requests-per-minute as a provider would."""
    rpm, seconds = sizes.rpm, sizes.rpm_seconds
    progress(f"    LLM_RPM={rpm}, two async worker processes, {sizes.rpm_jobs} jobs queued, {seconds:.0f} s")
    stub.reset()
    stub.enforce_rpm = rpm
    env = stub_env("bench-rpm", stub) | {"LLM_RPM": str(rpm), "WORKER_CONCURRENCY": "256"}
    with Service(redis_url, workers=0, env=env) as svc:
        _submit_texts(svc, sizes.rpm_jobs)
        workers = svc.start_worker(2)
        wait_until(lambda: len(stub.arrivals) > 0, timeout_s=30, what="the first call")
        first = stub.arrivals[0]
        time.sleep(max(0.0, first + seconds + 1 - time.monotonic()))
        calls = [t for t in stub.arrivals if t - first < seconds]
        over = stub.over_limit
        # Measured: stopped at once, not warmly (its jobs in flight wait a minute for budget).
        workers.kill_group()
    stub.reset()
    per_minute = len(calls) * 60 / seconds
    progress(f"      {len(calls)} calls in {seconds:.0f} s ({per_minute:.0f} a minute), {over} answered 429")
    return {"rpm": rpm, "seconds": seconds, "calls": len(calls), "per_minute": per_minute, "answered_429": over}
