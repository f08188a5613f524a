"""cancelJob: queued and running jobs become CANCELED for good; finished ones can't be."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redis import Redis
from rq.job import Job as RQJob

from gql_service import store

from .clients import follow, post, submit
from .openai_stub import Fault, OpenAIStub
from .service import Service, wait_until
from .test_faults_workers import crash_env, follow_until_calling

CANCEL = "mutation($id: ID!) { cancelJob(id: $id) { id status stage version error { code } } }"


def cancel(svc: Service, job_id: str) -> dict[str, Any]:
    return dict(post(svc, CANCEL, id=job_id).json())


async def test_queued_job_is_canceled_at_once_and_never_runs(e2e_redis: str) -> None:
    with Service(e2e_redis, workers=0, env={"RQ_QUEUE": "llm-cancel-queued"}) as svc:
        job_id = submit(svc)
        body = cancel(svc, job_id)
        assert body["data"]["cancelJob"] == {
            "id": job_id, "status": "CANCELED", "stage": "CANCELED", "version": 2, "error": {"code": "CANCELED"},
        }  # fmt: skip
        assert [e["status"] for e in await follow(svc, job_id)] == ["CANCELED"]
        redis = Redis.from_url(e2e_redis)
        assert redis.lrange("rq:queue:llm-cancel-queued", 0, -1) == []  # taken off the queue
        # Cancelling again is harmless: the same CANCELED job, still version 2.
        assert cancel(svc, job_id)["data"]["cancelJob"]["version"] == 2
        record = store.get_job_sync(redis, job_id)
        assert record is not None and record.status.value == "CANCELED" and record.attempts == 0


async def test_running_job_is_stopped_and_stays_canceled(e2e_redis: str, stub: OpenAIStub) -> None:
    stub.script(Fault.hang(60))
    with Service(e2e_redis, workers=1, env=crash_env(stub, "llm-cancel-running")) as svc:
        job_id = submit(svc)
        task, _ = await follow_until_calling(svc, job_id, stub)
        body = cancel(svc, job_id)
        assert body["data"]["cancelJob"]["status"] == "CANCELED"
        events = await asyncio.wait_for(task, 10)
        assert events[-1]["status"] == "CANCELED" and "FINISHED" not in [e["status"] for e in events]
        redis = Redis.from_url(e2e_redis)
        # The worker kills the work horse; RQ records the job as stopped.
        wait_until(lambda: RQJob.fetch(job_id, connection=redis).get_status().value == "stopped", what="RQ stop")
        record = store.get_job_sync(redis, job_id)
        assert record is not None and record.status.value == "CANCELED" and record.version == events[-1]["version"]


async def test_cancelling_a_finished_job_is_bad_user_input(service: Service) -> None:
    job_id = submit(service)
    assert (await follow(service, job_id))[-1]["status"] == "FINISHED"
    body = cancel(service, job_id)
    assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    assert "FINISHED" in body["errors"][0]["message"]


def test_cancelling_an_unknown_job_is_not_found(service: Service) -> None:
    body = cancel(service, "no-such-job")
    assert body["errors"][0]["extensions"]["code"] == "NOT_FOUND"


def test_a_job_a_worker_takes_as_it_is_canceled_is_stopped(sync_redis: Redis) -> None:
    """The cancel reads the RQ job queued; a worker takes it and ends an execution before RQ's
    cancel runs, which then reads each execution its registry lists and raised on the gone
    one ("Execution ... not found"): cancelBatch answered INTERNAL_SERVER_ERROR under load.
    The job is read again and, now started, its worker is told to stop it."""
    from rq import Queue
    from rq.command import PUBSUB_CHANNEL_TEMPLATE
    from rq.executions import ExecutionRegistry

    from gql_service.api.cancel import Canceller
    from gql_service.settings import Settings

    queue = Queue("llm-cancel-race", connection=sync_redis)
    queued = queue.enqueue("gql_service.worker.tasks.nothing", job_id="job-r")
    read_before = RQJob.fetch(queued.id, connection=sync_redis)  # what the cancel saw: queued
    # Then a worker took it: started, its name on the job, an execution listed that has ended.
    sync_redis.hset(queued.key, mapping={"status": "started", "worker_name": "w-1"})
    sync_redis.zadd(ExecutionRegistry(queued.id, connection=sync_redis).key, {"gone": time.time() + 60})
    commands = sync_redis.pubsub()
    commands.subscribe(PUBSUB_CHANNEL_TEMPLATE % "w-1")
    assert commands.get_message(timeout=1) is not None  # subscribed
    canceller = Canceller(redis=None, acked_redis=None, sync_redis=sync_redis, settings=Settings())  # type: ignore[arg-type]
    canceller._stop_rq_job(read_before)
    told = commands.get_message(timeout=2)
    assert told is not None and b"stop-job" in told["data"] and b"job-r" in told["data"], told
    commands.close()
