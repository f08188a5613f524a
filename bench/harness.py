"""What the scenarios share: progress output, processes, memory, Redis connections, stats."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil
from redis import Redis

from gql_service import keys, store
from gql_service.api.app import API_CLIENT_NAME
from gql_service.models import JobRecord

START = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {message}", file=sys.stderr, flush=True)


def raise_fd_limit() -> None:
    """10,000 websockets need 10,000 descriptors on each side; children inherit this."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def api_redis_connections(redis: Redis) -> int:
    return sum(1 for c in redis.client_list() if c.get("name") == API_CLIENT_NAME)


def api_pid(svc: Any) -> int:
    """The uvicorn process of a tests.service.Service (the last process it started)."""
    return int(next(p for p in reversed(svc.procs) if p.name == "api").popen.pid)


def py_spy_samples(raw: str) -> Iterator[tuple[list[str], int]]:
    """py-spy's raw output ("frame;frame;... count" a line): each stack and its count. A frame
    whose name holds a newline (code compiled from a string) splits its sample over lines:
    they are joined until one ends with the count."""
    pending = ""
    for line in raw.splitlines():
        stack, _, count = (pending + line).rpartition(" ")
        if not count.isdigit():
            pending += line
            continue
        pending = ""
        yield stack.split(";"), int(count)


def loadgen(
    url: str, body: dict[str, Any], *, concurrency: int, duration: float, warmup: float = 1.0
) -> dict[str, float]:
    """Run bench.loadgen in its own process and return its stats."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", "--url", url, "--body", json.dumps(body),
         "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", str(warmup)],
        capture_output=True, text=True, check=True, timeout=duration + warmup + 60,
    )  # fmt: skip
    return dict(json.loads(out.stdout))


@contextlib.contextmanager
def parked_jobs(redis: Redis, count: int, prefix: str) -> Iterator[list[str]]:
    """QUEUED job records no worker will take: subscriptions to them stay open. Removed
    afterwards: a later section's worker would find records without an RQ job and queue
    them again (gql_service/worker/reconciler.py), running jobs that section never sent."""
    ids = [f"{prefix}-{i}" for i in range(count)]
    with redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            store.create_job(pipe, JobRecord(id=job_id), text="parked", ttl_s=3600)
        pipe.execute()
    try:
        yield ids
    finally:
        job_keys = [keys.job(job_id) for job_id in ids]
        with redis.pipeline(transaction=False) as pipe:
            pipe.delete(*job_keys)
            pipe.zrem(keys.LIVE_JOBS, *job_keys)
            pipe.execute()


@dataclass
class Machine:
    cores: int = field(default_factory=lambda: os.cpu_count() or 0)
    cpu: str = ""
    memory_gib: float = field(default_factory=lambda: psutil.virtual_memory().total / 2**30)
    python: str = field(default_factory=lambda: sys.version.split()[0])

    def __post_init__(self) -> None:
        try:
            with open("/proc/cpuinfo") as info:
                models = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
            self.cpu = models[0] if models else "unknown"
        except OSError:
            self.cpu = "unknown"

    def describe(self, *, cpu: bool = True) -> str:
        model = f" ({self.cpu})" if cpu else ""
        return f"{self.cores} cores{model}, {self.memory_gib:.0f} GiB RAM, Python {self.python}, Linux"
