"""Priorities with real workers and the OpenAI-compatible stub: a HIGH job overtakes a
backlog of LOW ones in every worker class, and LOW (and NORMAL) jobs still finish while HIGH
ones keep arriving (the share of takes of gql_service/worker/priorities.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime

import pytest
from redis import Redis

from gql_service import keys
from gql_service.models import JobRecord

from .clients import submit_many
from .openai_stub import OpenAIStub
from .records import records, until_ended
from .service import Service, wait_until

LLM_S = 0.2


@pytest.fixture
def slow_stub(stub: OpenAIStub) -> Iterator[OpenAIStub]:
    stub.latency_s = LLM_S
    yield stub
    stub.latency_s = 0.0


def waiting_at(when: datetime, jobs: list[JobRecord]) -> int:
    """How many of these jobs had not started at `when` (or have not yet)."""
    return sum(1 for r in jobs if r.started_at is None or r.started_at > when)


def service(redis_url: str, stub: OpenAIStub, queue: str, worker_class: str) -> Service:
    env = {**stub.env, "RQ_QUEUE": queue, "WORKER_CLASS": worker_class, "WORKER_CONCURRENCY": "4"}
    return Service(redis_url, workers=0, env=env)


def listening(svc: Service) -> None:
    """A worker process, once it has said it listens (the async worker: once it started)."""
    worker = svc.start_worker(1)
    wait_until(lambda: "Listening on" in worker.output() or "worker: queues" in worker.output(), timeout_s=90)


def test_high_jobs_overtake_300_queued_low_ones(redis_url: str, sync_redis: Redis, slow_stub: OpenAIStub) -> None:
    """One async worker at concurrency 4, the LLM at 200 ms: 300 LOW jobs queued, then 5
    HIGH. Every HIGH ends while at least 200 LOW still wait."""
    with service(redis_url, slow_stub, "prio-async", "async") as svc:
        low = submit_many(svc, 300, priority="LOW")
        listening(svc)
        wait_until(lambda: len(slow_stub.requests) >= 4, what="the first LOW jobs in their calls")
        high = submit_many(svc, 5, priority="HIGH")
        ended = until_ended(sync_redis, high, timeout_s=60)
        last_high = max(r.finished_at for r in ended if r.finished_at is not None)
        assert all(r.status.value == "FINISHED" for r in ended)
        still = waiting_at(last_high, records(sync_redis, low))
        assert still >= 200, f"only {still} LOW jobs still waited when the last HIGH one ended"


@pytest.mark.parametrize("worker_class", ["fork", "simple"])
def test_every_worker_class_takes_high_first(
    redis_url: str, sync_redis: Redis, slow_stub: OpenAIStub, worker_class: str
) -> None:
    """A worker of one job at a time: 20 LOW jobs queued, then 2 HIGH, each taken next."""
    with service(redis_url, slow_stub, f"prio-{worker_class}", worker_class) as svc:
        low = submit_many(svc, 20, priority="LOW")
        listening(svc)
        wait_until(lambda: len(slow_stub.requests) >= 1, what="the first LOW job in its call")
        high = submit_many(svc, 2, priority="HIGH")
        last_high = max(r.finished_at for r in until_ended(sync_redis, high, timeout_s=60) if r.finished_at is not None)
        still = waiting_at(last_high, records(sync_redis, low))
        assert still >= 15, f"only {still} LOW jobs still waited when the last HIGH one ended"


class HighFlood:
    """Keeps HIGH jobs waiting on their queue: tops it up whenever fewer than `depth` wait."""

    def __init__(self, svc: Service, redis: Redis, queue: str, depth: int = 20) -> None:
        self.svc, self.redis, self.depth = svc, redis, depth
        self.key = f"rq:queue:{keys.llm_queue(queue, 'HIGH')}"
        self.ids: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="high-flood", daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            if self.redis.llen(self.key) < self.depth:
                self.ids += submit_many(self.svc, self.depth, priority="HIGH")
            self.stop.wait(0.02)

    def __enter__(self) -> HighFlood:
        self.ids += submit_many(self.svc, self.depth * 2, priority="HIGH")
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(15)


def test_low_and_normal_jobs_finish_while_high_ones_keep_arriving(
    redis_url: str, sync_redis: Redis, slow_stub: OpenAIStub
) -> None:
    """HIGH jobs never stop waiting, yet one take in ten goes to LOW and one to NORMAL
    (PRIORITY_SHARE_EVERY): each of the LOW and NORMAL jobs that ends was taken while HIGH
    jobs submitted before it was taken were still waiting."""
    queue = "prio-flood"
    with service(redis_url, slow_stub, queue, "async") as svc:
        low, normal = submit_many(svc, 10, priority="LOW"), submit_many(svc, 10, priority="NORMAL")
        with HighFlood(svc, sync_redis, queue) as flood:
            listening(svc)
            done = until_ended(sync_redis, low[:5] + normal[:5], timeout_s=90)
            assert flood.thread.is_alive()
            high = records(sync_redis, list(flood.ids))
        for job in done:
            assert job.started_at is not None
            overtaken = [h for h in high if h.created_at < job.started_at and waiting_at(job.started_at, [h])]
            assert overtaken, f"job {job.id} ({job.priority}) was taken with no HIGH job waiting"
        assert sum(1 for h in high if h.terminal) > len(done), "HIGH jobs should still take most of the slots"
