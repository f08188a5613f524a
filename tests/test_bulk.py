"""`gql-service submit --file`: a large file through the CLI against a live service,
interrupted halfway (SIGINT) and run again: exactly one job per line, and a results file
with one line per job, under the input's own ids."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from redis import Redis

from gql_service import keys
from gql_service.cli.embedded_redis import EmbeddedRedis

from .clients import post
from .service import Service

LINES = 2500
BATCHES = "{ batches(first: 1) { edges { node { id status counts { total finished } } } } }"


def _cli(svc: Service, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "GQLS_URL": svc.http_url}
    return subprocess.Popen(
        [sys.executable, "-m", "gql_service", "submit", *args], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _total(redis: Redis) -> int:
    """The batch's count of submitted jobs, read straight from Redis (fast, whatever the
    API is busy with)."""
    [batch_id] = redis.zrange(keys.tenant_batches("public"), 0, -1) or [b""]
    return int(redis.hget(keys.batch(batch_id.decode()), "total") or 0)


@pytest.mark.timeout(240)
def test_a_large_file_survives_an_interrupt_and_resumes_without_duplicates(tmp_path: Path) -> None:
    source, results = tmp_path / "reviews.csv", tmp_path / "results.jsonl"
    with source.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "stars", "text"])
        for n in range(LINES):
            writer.writerow([f"r{n:05d}", n % 5 + 1, f"Review {n}: the delivery was quick, the parcel intact."])
    command = ("--file", str(source), "--column", "text", "--output", str(results))
    with EmbeddedRedis() as redis_server, Service(redis_server.url, workers=0, env={"WORKER_CONCURRENCY": "64"}) as svc:
        redis = Redis.from_url(redis_server.url)
        first = _cli(svc, *command)
        deadline = time.monotonic() + 60
        while _total(redis) < LINES * 0.4:  # no worker yet: only the submissions move
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.005)
        # Halfway, for sure: frozen at once, then Ctrl-C as it wakes.
        first.send_signal(signal.SIGSTOP)
        at_interrupt = _total(redis)
        first.send_signal(signal.SIGINT)
        first.send_signal(signal.SIGCONT)
        _, interrupted = first.communicate(timeout=30)
        assert first.returncode == 130 and "resumes" in interrupted, interrupted
        assert at_interrupt < LINES, "the first run had submitted everything before it was stopped"

        svc.start_worker(1)
        second = _cli(svc, *command)
        _, progress = second.communicate(timeout=180)
        assert second.returncode == 0, progress
        batch = post(svc, BATCHES).json()["data"]["batches"]["edges"][0]["node"]
        jobs_made = redis.zcard(keys.tenant_jobs("public"))
        redis.close()
    assert batch["status"] == "COMPLETED" and batch["counts"] == {"total": LINES, "finished": LINES}
    assert jobs_made == LINES  # one job per line, whatever the interrupt
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(lines) == LINES and {line["id"] for line in lines} == {f"r{n:05d}" for n in range(LINES)}
    assert len({line["job"] for line in lines}) == LINES
    assert all(line["status"] == "FINISHED" and line["result"]["summary"] for line in lines)
    assert "submitted 2500/2500" in progress  # a plain progress line, stderr being no terminal
