"""Workers that die or are told to stop: no job is lost or left STARTED.

WORKER_LOST_AFTER_S is 3 here, so a job whose worker was SIGKILLed is noticed within a
few seconds (the default of 60 s bounds it at about 80 s).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from .clients import follow, submit
from .openai_stub import Fault, OpenAIStub
from .service import Proc, Service, wait_until

LOST_AFTER_S = 3


def crash_env(stub: OpenAIStub, queue: str, **extra: str) -> dict[str, str]:
    return {
        "RQ_QUEUE": queue,
        **stub.env,
        "WORKER_LOST_AFTER_S": str(LOST_AFTER_S),
        **extra,
    }


async def follow_until_calling(
    svc: Service, job_id: str, stub: OpenAIStub, requests: int = 1
) -> tuple[asyncio.Task[list[dict[str, Any]]], float]:
    """Subscribe and return once the job is inside its LLM call: the stage says CALLING_LLM
    and the stub has the request (the stage is published just before the request is sent)."""
    calling = asyncio.Event()
    task = asyncio.create_task(follow(svc, job_id, first_seen=calling, until_stage="CALLING_LLM"))
    await asyncio.wait_for(calling.wait(), 15)
    await asyncio.to_thread(wait_until, lambda: len(stub.requests) >= requests, what="the LLM request")
    return task, time.monotonic()


def horse_of(worker: Proc, stub: OpenAIStub) -> psutil.Process:
    # The work horse is the worker's child that is in the middle of a call to the LLM stub
    # (the worker also forks an RQ scheduler, and may do so at any time).
    children = psutil.Process(worker.popen.pid).children()
    horses = [p for p in children if any(c.raddr and c.raddr.port == stub.port for c in p.net_connections("tcp"))]
    assert len(horses) == 1, f"expected one work horse talking to the stub, found {horses}"
    return horses[0]


def kill_tree(worker: Proc) -> None:
    root = psutil.Process(worker.popen.pid)
    for proc in [*root.children(recursive=True), root]:
        proc.send_signal(signal.SIGKILL)
    worker.popen.wait(5)


async def test_sigkilled_worker_and_horse_job_runs_again_on_a_new_worker(e2e_redis: str, stub: OpenAIStub) -> None:
    stub.script(Fault.hang(60))  # the first attempt is mid-call when its worker dies
    with Service(e2e_redis, workers=1, env=crash_env(stub, "llm-crash")) as svc:
        job_id = submit(svc)
        task, killed_at = await follow_until_calling(svc, job_id, stub)
        kill_tree(svc.procs[0])
        svc.start_worker(1)
        events = await asyncio.wait_for(task, 30)
        recovered_after = time.monotonic() - killed_at
    final = events[-1]
    assert (final["status"], final["stage"], final["attempts"]) == ("FINISHED", "DONE", 2)
    lost = [e for e in events if e["status"] == "RETRYING"]
    assert lost and lost[0]["error"]["code"] == "WORKER_LOST" and lost[0]["error"]["retryable"]
    assert recovered_after < LOST_AFTER_S * 2 + 5
    print(f"\nSIGKILLed job DONE on a new worker {recovered_after:.1f} s after the kill")


async def test_sigkilled_worker_without_attempts_left_fails_worker_lost(e2e_redis: str, stub: OpenAIStub) -> None:
    stub.script(Fault.hang(60))
    env = crash_env(stub, "llm-crash-last", LLM_MAX_ATTEMPTS="1")
    with Service(e2e_redis, workers=1, env=env) as svc:
        job_id = submit(svc)
        task, _ = await follow_until_calling(svc, job_id, stub)
        kill_tree(svc.procs[0])
        svc.start_worker(1)  # its registry maintenance finds the abandoned job
        events = await asyncio.wait_for(task, 30)
    final = events[-1]
    assert (final["status"], final["error"]["code"], final["error"]["retryable"]) == ("FAILED", "WORKER_LOST", False)


async def test_killed_work_horse_under_a_live_worker_is_retried(e2e_redis: str, stub: OpenAIStub) -> None:
    stub.script(Fault.hang(60))
    with Service(e2e_redis, workers=1, env=crash_env(stub, "llm-horse", WORKER_CLASS="fork")) as svc:
        job_id = submit(svc)
        task, _ = await follow_until_calling(svc, job_id, stub)
        horse_of(svc.procs[0], stub).send_signal(signal.SIGKILL)
        events = await asyncio.wait_for(task, 30)
    final = events[-1]
    assert (final["status"], final["attempts"]) == ("FINISHED", 2)
    assert any(e["status"] == "RETRYING" and e["error"]["code"] == "WORKER_LOST" for e in events)


async def test_sigterm_lets_the_running_job_finish(e2e_redis: str, stub: OpenAIStub) -> None:
    stub.script(Fault.hang(1.5))  # answers (validly) after 1.5 s
    with Service(e2e_redis, workers=1, env=crash_env(stub, "llm-sigterm")) as svc:
        job_id = submit(svc)
        task, _ = await follow_until_calling(svc, job_id, stub)
        worker = svc.procs[0]
        worker.popen.send_signal(signal.SIGTERM)
        events = await asyncio.wait_for(task, 30)
        assert await asyncio.to_thread(worker.popen.wait, 15) == 0
    assert (events[-1]["status"], events[-1]["attempts"]) == ("FINISHED", 1)


@pytest.mark.parametrize("workers", [2])
async def test_sigterm_to_a_worker_pool_finishes_its_jobs(e2e_redis: str, stub: OpenAIStub, workers: int) -> None:
    stub.script(Fault.hang(1.5), Fault.hang(1.5))
    with Service(e2e_redis, workers=workers, env=crash_env(stub, "llm-sigterm-pool")) as svc:
        ids = [submit(svc), submit(svc)]
        followers = [await follow_until_calling(svc, i, stub, n + 1) for n, i in enumerate(ids)]
        svc.procs[0].popen.send_signal(signal.SIGTERM)
        results = [await asyncio.wait_for(task, 30) for task, _ in followers]
        assert await asyncio.to_thread(svc.procs[0].popen.wait, 20) == 0
    assert [r[-1]["status"] for r in results] == ["FINISHED", "FINISHED"]


@pytest.fixture
def worker_context(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """What run_workers sets up in a worker process, here: the workers' context (an offline
    provider, this test's Redis) and WORKER_LOST_AFTER_S; yields the settings."""
    from gql_service.settings import RedisTarget, Settings
    from gql_service.worker import context, tuning
    from gql_service.worker.llm.offline import OfflineProvider

    settings = Settings(llm_provider="offline", _env_file=None)  # type: ignore[call-arg]
    monkeypatch.setattr(tuning.Tuning, "lost_after_s", LOST_AFTER_S)
    # The process's context for this test only (undone with the monkeypatch).
    monkeypatch.setattr(
        context, "_process", context.WorkerContext(settings, OfflineProvider(), RedisTarget(url=redis_url))
    )
    yield settings


@pytest.mark.parametrize("worker_class", ["async", "fork", "simple"])
def test_rqs_pool_children_connect_and_dequeue_as_the_service_does(
    worker_class: str, worker_context: Any, redis_url: str
) -> None:
    """RQ's worker pool builds its children's connection and passes its own Queue class: the
    children must still dequeue through RQ's intermediate list (one queue at a time) and
    connect through gql_service.redis_conn (its timeouts, retries and Sentinel)."""
    from redis import BlockingConnectionPool, Redis
    from rq import Queue

    from gql_service.worker import tuning, workers

    rqs_own = Redis.from_url(redis_url)  # what RQ's pool hands a child
    queues = [Queue(name, connection=rqs_own) for name in ("llm", "llm-webhooks")]
    worker = workers.WORKER_CLASSES[worker_class](queues, connection=rqs_own, queue_class=Queue)
    assert worker.queue_class is tuning.OneQueueAtATime
    assert all(isinstance(queue, tuning.OneQueueAtATime) for queue in worker.queues)
    assert worker.connection is not rqs_own
    assert isinstance(worker.connection.connection_pool, BlockingConnectionPool)
    assert all(queue.connection is worker.connection for queue in worker.queues)


def test_a_job_lost_before_its_first_attempt_is_retried(worker_context: Any, sync_redis: Any) -> None:
    """Taken by a worker that died (or lost its Redis in a failover) before the job's first
    attempt set its retry policy: RQ's abandoned-job cleanup calls the failure callback, then
    retries the job only if it has retries left. It spent none, so it must get them (it was
    failed for good, WORKER_LOST at attempts 0, before: seen in the Sentinel failover test)."""
    from rq import Queue
    from rq.exceptions import AbandonedJobError

    from gql_service import keys, store
    from gql_service.worker import tasks

    from .records import create_job

    create_job(sync_redis, "lost-early")
    rq_job = Queue("llm", connection=sync_redis).enqueue(keys.TASK, "lost-early", job_id="lost-early")
    assert rq_job.retries_left is None  # no attempt has run
    tasks.on_failure(rq_job, sync_redis, AbandonedJobError, AbandonedJobError(), None)
    record = store.get_job_sync(sync_redis, "lost-early")
    assert record is not None and record.status.value == "RETRYING" and record.error is not None
    assert record.error.code.value == "WORKER_LOST" and record.error.retryable
    assert rq_job.retries_left == worker_context.llm_max_attempts - 1  # what RQ reads next, to retry it


@pytest.mark.parametrize("worker_class", ["async", "fork", "simple"])
def test_starting_a_job_never_shortens_the_workers_own_lifetime(
    worker_class: str, worker_context: Any, sync_redis: Any
) -> None:
    """RQ sets the worker's key (what `rq info` and Worker.all read) and its executions to
    expire with the job's heartbeat TTL when a job starts: WORKER_LOST_AFTER_S, 3 s here. A
    loop busy for 3 s then made a live worker vanish from Worker.all (seen once on CI)."""
    from rq import Queue

    from gql_service import keys
    from gql_service.worker import workers

    worker = workers.WORKER_CLASSES[worker_class](["llm"])
    worker.register_birth()
    job = Queue("llm", connection=sync_redis).enqueue(keys.TASK, "some-job")
    execution = worker.prepare_execution(job)
    worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
    assert 0 < sync_redis.ttl(execution.key) <= LOST_AFTER_S  # the job's own heartbeat stays short
    lifetimes = sync_redis.ttl(worker.key), sync_redis.ttl(worker.executions_key)
    assert min(lifetimes) > worker.worker_ttl, lifetimes


def test_a_worker_killed_while_cleaning_holds_up_no_other_for_long(worker_context: Any, sync_redis: Any) -> None:
    """The registries' cleanup (what notices a SIGKILLed worker's jobs) runs under a lock that
    a killed worker cannot release: RQ's lasts 899 s, so 50 jobs of a worker SIGKILLed while
    it cleaned sat STARTED long after WORKER_LOST_AFTER_S (seen once on CI)."""
    from gql_service.worker import workers

    [queue] = workers.WORKER_CLASSES["async"](["llm"]).queues
    assert queue.acquire_maintenance_lock()  # the worker that is then killed
    assert not queue.acquire_maintenance_lock()  # still one cleaner at a time
    assert 0 < sync_redis.ttl(queue.registry_cleaning_key) <= LOST_AFTER_S
