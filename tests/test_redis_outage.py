"""Redis goes away and comes back: fast errors meanwhile, no restart needed after.

The Redis here runs with AOF (appendfsync always), as production should: the job records
survive the restart. Without it a restart loses every job record, queue and idempotency key.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
from redis import Redis
from rq import Queue, Worker

from gql_service import store
from gql_service.cli.embedded_redis import EmbeddedRedis, free_port

from .clients import SUBMIT, TEXT, follow, post, submit
from .openai_stub import OpenAIStub
from .service import Service, wait_until

AOF = ("--appendonly", "yes", "--appendfsync", "always")


def aof_redis(port: int, data_dir: Path) -> EmbeddedRedis:
    """The same Redis (port, data directory, AOF) each time it is started."""
    return EmbeddedRedis(port=port, data_dir=str(data_dir), extra_args=AOF).start()


def ready(svc: Service) -> int:
    return httpx.get(f"http://127.0.0.1:{svc.port}/readyz", timeout=5).status_code


async def test_outage_fails_fast_then_everything_resumes(tmp_path: Path) -> None:
    port = free_port()
    redis = aof_redis(port, tmp_path)
    svc = Service(redis.url, workers=1, env={"RQ_QUEUE": "llm-outage"})
    try:
        svc.start()
        before = submit(svc)
        assert (await follow(svc, before))[-1]["status"] == "FINISHED"
        # A subscription to a job that is still QUEUED when Redis goes down.
        svc.procs[0].stop()  # no worker for now, so the next job waits
        job_id = submit(svc)
        got_first = asyncio.Event()
        open_subscription = asyncio.create_task(follow(svc, job_id, first_seen=got_first))
        await asyncio.wait_for(got_first.wait(), 10)

        redis.stop()
        started = time.monotonic()
        body = post(svc, SUBMIT, text=TEXT).json()
        took = time.monotonic() - started
        assert body["errors"][0]["extensions"]["code"] == "SERVICE_UNAVAILABLE"
        assert "Traceback" not in str(body) and took < 3
        assert post(svc, "query($id: ID!) { job(id: $id) { id } }", id=job_id).json()["errors"][0]["extensions"][
            "code"
        ] == ("SERVICE_UNAVAILABLE")
        assert ready(svc) == 503
        started = time.monotonic()
        late = asyncio.create_task(follow(svc, job_id))
        failed = await asyncio.gather(late, return_exceptions=True)
        assert "SERVICE_UNAVAILABLE" in str(failed[0]) and time.monotonic() - started < 5

        redis = aof_redis(port, tmp_path)
        wait_until(lambda: ready(svc) == 200, what="readiness after the restart")
        svc.start_worker(1)
        events = await asyncio.wait_for(open_subscription, 30)  # the same subscription, still open
        assert events[0]["version"] == 1 and events[-1]["status"] == "FINISHED"
        assert (await follow(svc, before))[-1]["status"] == "FINISHED"  # kept by AOF
        after = submit(svc)
        assert (await follow(svc, after))[-1]["status"] == "FINISHED"
    finally:
        svc.stop()
        redis.stop()


async def test_a_running_worker_survives_an_outage(tmp_path: Path) -> None:
    port = free_port()
    redis = aof_redis(port, tmp_path)
    svc = Service(redis.url, workers=1, env={"RQ_QUEUE": "llm-outage-worker"})
    try:
        svc.start()
        # The worker at work first (registered with RQ): what survives an outage here is a
        # running worker, not one still starting (tests/test_cli.py covers that one).
        with Redis.from_url(redis.url) as client:
            queue = Queue("llm-outage-worker", connection=client)
            wait_until(lambda: len(Worker.all(queue=queue)) == 1, timeout_s=90, what="the worker to register")
        redis.stop()
        assert ready(svc) == 503
        redis = aof_redis(port, tmp_path)
        wait_until(lambda: ready(svc) == 200, what="readiness after the restart")
        assert svc.procs[0].popen.poll() is None, svc.logs()
        events = await asyncio.wait_for(follow(svc, submit(svc)), 60)
        assert events[-1]["status"] == "FINISHED"
    finally:
        svc.stop()
        redis.stop()


async def test_jobs_in_flight_when_redis_restarts_all_end_finished(tmp_path: Path, stub: OpenAIStub) -> None:
    """Twenty jobs inside their LLM calls in one async worker; Redis goes away until after
    the calls have answered, then comes back: every job still ends FINISHED (written once
    Redis answers, or retried), none is left STARTED, and the worker process lives on."""
    port = free_port()
    redis = aof_redis(port, tmp_path)
    stub.latency_s = 1.0
    env = {**stub.env, "RQ_QUEUE": "llm-outage-in-flight", "WORKER_LOST_AFTER_S": "3", "LLM_TIMEOUT_S": "10"}
    svc = Service(redis.url, workers=1, env=env)
    try:
        svc.start()
        job_ids = [submit(svc) for _ in range(20)]
        await asyncio.to_thread(wait_until, lambda: len(stub.requests) >= 20, what="20 calls open")
        redis.stop()
        await asyncio.sleep(2.0)  # the calls answer while Redis is down (there is no event to await)
        redis = aof_redis(port, tmp_path)
        client = Redis.from_url(redis.url)

        def ended() -> bool:
            records = [store.get_job_sync(client, job_id) for job_id in job_ids]
            return all(r is not None and r.terminal for r in records)

        await asyncio.to_thread(wait_until, ended, timeout_s=40, what="every job to end")
        records = [store.get_job_sync(client, job_id) for job_id in job_ids]
        assert svc.procs[0].popen.poll() is None, svc.logs()
        assert {(r.status.value if r else None) for r in records} == {"FINISHED"}
    finally:
        stub.latency_s = 0.0
        svc.stop()
        redis.stop()
