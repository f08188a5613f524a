"""The reconciler: jobs whose RQ entry is gone (a failover lost it) are queued again, or
failed once their attempts are spent; jobs RQ still holds are left alone. Against a real
Redis, with the API's own submissions, and once with real worker processes."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq import Queue
from rq.job import Job as RQJob

from gql_service import keys, queueing, store
from gql_service.api.jobs import JobService
from gql_service.cli.embedded_redis import EmbeddedRedis
from gql_service.models import JobPriority, JobStage, JobStatus
from gql_service.redis_conn import async_client
from gql_service.settings import Settings
from gql_service.worker import reconciler
from gql_service.worker.reconciler import Reconciler

from .clients import follow, post, submit
from .lossy_proxy import LossyProxy
from .service import Service

JOB = "query($id: ID!) { job(id: $id) { status stage attempts error { code message retryable } } }"


def _reconciler(async_redis: AsyncRedis, sync_redis: Redis, settings: Settings) -> Reconciler:
    settings = settings.model_copy(update={"reconcile_interval_s": 0.001})  # everything has stood still long enough
    return Reconciler(async_redis, queueing.llm_queues(settings, sync_redis), settings, consumer="test")


def _lose_rq_entry(redis: Redis, queue: str, job_id: str) -> None:
    """What a failover does to a job whose RQ writes had not reached the replica."""
    redis.delete(RQJob.key_for(job_id))
    redis.lrem(f"rq:queue:{queue}", 0, job_id)


async def test_a_job_whose_rq_entry_is_gone_is_queued_again(
    jobs: JobService, async_redis: AsyncRedis, sync_redis: Redis, settings: Settings
) -> None:
    record, _ = await jobs.submit("some text", idempotency_key=None, tenant="public", request_id=None)
    kept, _ = await jobs.submit("other text", idempotency_key=None, tenant="public", request_id=None)
    _lose_rq_entry(sync_redis, settings.rq_queue, record.id)
    await asyncio.sleep(0.01)  # older than the (tiny) interval

    assert await _reconciler(async_redis, sync_redis, settings).reconcile() == 1

    revived = await store.get_job(async_redis, record.id)
    assert revived is not None and (revived.status, revived.stage) == (JobStatus.RETRYING, JobStage.QUEUED)
    assert revived.error is not None and revived.error.code.value == "WORKER_LOST" and revived.error.retryable
    assert "queue entry was lost" in revived.error.message
    assert RQJob.fetch(record.id, connection=sync_redis).get_status() == "queued"
    assert sync_redis.lrange(f"rq:queue:{settings.rq_queue}", 0, -1) == [kept.id.encode(), record.id.encode()]
    untouched = await store.get_job(async_redis, kept.id)
    assert untouched is not None and untouched.version == 1  # RQ still had it: left alone


async def test_a_job_whose_end_was_lost_fails_when_no_attempts_are_left(
    jobs: JobService, async_redis: AsyncRedis, sync_redis: Redis, settings: Settings
) -> None:
    record, _ = await jobs.submit("some text", idempotency_key=None, tenant="public", request_id=None)

    def started_for_the_last_time(job: Any) -> Any:
        return job.model_copy(update={"status": JobStatus.STARTED, "stage": JobStage.VALIDATING, "attempts": 3})

    await store.update_job(async_redis, record.id, started_for_the_last_time, ttl_s=60)
    # RQ's job ended (its FINISHED reached the replica), the record's end did not.
    RQJob.fetch(record.id, connection=sync_redis).set_status("finished")
    await asyncio.sleep(0.01)

    assert await _reconciler(async_redis, sync_redis, settings).reconcile() == 1

    failed = await store.get_job(async_redis, record.id)
    assert failed is not None and (failed.status, failed.stage) == (JobStatus.FAILED, JobStage.FAILED)
    assert failed.error is not None and failed.error.code.value == "WORKER_LOST" and not failed.error.retryable
    assert "RQ's job for it is finished" in failed.error.message
    assert not await async_redis.zscore(keys.LIVE_JOBS, keys.job(record.id))  # ended: off the live list


async def test_jobs_that_ended_or_expired_leave_the_live_list(
    jobs: JobService, async_redis: AsyncRedis, sync_redis: Redis, settings: Settings
) -> None:
    record, _ = await jobs.submit("some text", idempotency_key=None, tenant="public", request_id=None)
    assert await async_redis.zscore(keys.LIVE_JOBS, keys.job(record.id))
    await async_redis.delete(keys.job(record.id))  # its TTL ran out
    await asyncio.sleep(0.01)
    assert await _reconciler(async_redis, sync_redis, settings).reconcile() == 0
    assert await async_redis.zcard(keys.LIVE_JOBS) == 0


async def test_a_lost_job_goes_back_on_its_own_priority_queue(
    jobs: JobService, async_redis: AsyncRedis, sync_redis: Redis, settings: Settings
) -> None:
    record, _ = await jobs.submit(
        "low text", idempotency_key=None, tenant="public", request_id=None, priority=JobPriority.LOW
    )
    low = keys.llm_queue(settings.rq_queue, "LOW")
    _lose_rq_entry(sync_redis, low, record.id)
    await asyncio.sleep(0.01)  # older than the (tiny) interval
    assert await _reconciler(async_redis, sync_redis, settings).reconcile() == 1
    assert sync_redis.lrange(f"rq:queue:{low}", 0, -1) == [record.id.encode()]
    assert record.id.encode() not in sync_redis.lrange(f"rq:queue:{settings.rq_queue}", 0, -1)
    assert RQJob.fetch(record.id, connection=sync_redis).origin == low


async def test_only_one_process_reconciles_at_a_time(
    async_redis: AsyncRedis, sync_redis: Redis, settings: Settings
) -> None:
    first = _reconciler(async_redis, sync_redis, settings)
    second = Reconciler(async_redis, first.queues, first.settings, consumer="another")
    assert [await first._lead(), await second._lead(), await first._lead()] == [True, False, True]


def test_a_worker_runs_a_job_whose_queue_entry_was_lost() -> None:
    env = {"RECONCILE_INTERVAL_S": "1", "OFFLINE_STREAM_DELAY_MS": "0"}
    with EmbeddedRedis() as redis_server, Service(redis_server.url, workers=0, env=env) as svc:
        job_id = submit(svc)
        redis = Redis.from_url(redis_server.url)
        _lose_rq_entry(redis, "llm", job_id)
        redis.close()
        events: list[dict[str, Any]] = []
        subscribed = threading.Event()  # set at the snapshot: the worker must not start before

        def watch() -> None:
            events.extend(asyncio.run(follow(svc, job_id, first_seen=subscribed)))  # type: ignore[arg-type]

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        assert subscribed.wait(15)
        svc.start_worker(1)
        watcher.join(30)
        final = post(svc, JOB, id=job_id).json()["data"]["job"]
    assert (final["status"], final["attempts"]) == ("FINISHED", 1), final
    seen = [(e["status"], (e["error"] or {}).get("code")) for e in events]
    assert seen[0] == ("QUEUED", None) and seen[-1] == ("FINISHED", None), seen
    assert ("RETRYING", "WORKER_LOST") in seen, seen


async def test_two_revives_of_one_stale_read_queue_the_job_once(
    jobs: JobService, async_redis: AsyncRedis, sync_redis: Redis, settings: Settings
) -> None:
    record, _ = await jobs.submit("some text", idempotency_key=None, tenant="public", request_id=None)
    _lose_rq_entry(sync_redis, settings.rq_queue, record.id)
    stale = await store.get_job(async_redis, record.id)
    assert stale is not None
    first, second = _reconciler(async_redis, sync_redis, settings), _reconciler(async_redis, sync_redis, settings)
    assert [await first._revive(stale, None), await second._revive(stale, None)] == [1, 0]
    assert sync_redis.lrange(f"rq:queue:{settings.rq_queue}", 0, -1) == [record.id.encode()]


async def test_a_pass_reaches_every_lost_job_whatever_the_batch(
    jobs: JobService, async_redis: AsyncRedis, sync_redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconciler, "BATCH", 2)
    lost = []
    for n in range(7):
        record, _ = await jobs.submit(f"text {n}", idempotency_key=None, tenant="public", request_id=None)
        _lose_rq_entry(sync_redis, settings.rq_queue, record.id)
        lost.append(record.id)
    await asyncio.sleep(0.01)
    assert await _reconciler(async_redis, sync_redis, settings).reconcile() == 7
    assert sorted(sync_redis.lrange(f"rq:queue:{settings.rq_queue}", 0, -1)) == sorted(j.encode() for j in lost)


async def test_a_revived_job_gets_only_the_attempts_it_has_left(
    jobs: JobService, async_redis: AsyncRedis, sync_redis: Redis, settings: Settings
) -> None:
    record, _ = await jobs.submit("some text", idempotency_key=None, tenant="public", request_id=None)
    await store.update_job(async_redis, record.id, lambda j: j.model_copy(update={"attempts": 2}), ttl_s=60)
    _lose_rq_entry(sync_redis, settings.rq_queue, record.id)
    await asyncio.sleep(0.01)
    assert await _reconciler(async_redis, sync_redis, settings).reconcile() == 1
    # LLM_MAX_ATTEMPTS is 3 and two ran: the next attempt is the last, RQ retries no more.
    assert RQJob.fetch(record.id, connection=sync_redis).retries_left == 0


async def test_a_job_rq_holds_in_a_state_unknown_here_is_left_to_rq(
    jobs: JobService, async_redis: AsyncRedis, sync_redis: Redis, settings: Settings
) -> None:
    record, _ = await jobs.submit("some text", idempotency_key=None, tenant="public", request_id=None)
    sync_redis.hset(RQJob.key_for(record.id), "status", "some_future_state")
    await asyncio.sleep(0.01)
    assert await _reconciler(async_redis, sync_redis, settings).reconcile() == 0


async def test_a_job_whose_rq_job_ended_is_queued_again_as_a_new_one(
    jobs: JobService, async_redis: AsyncRedis, sync_redis: Redis, settings: Settings
) -> None:
    # The record's end was lost, RQ's was not: RQ's job is FAILED, expiring, in its registry.
    record, _ = await jobs.submit("some text", idempotency_key=None, tenant="public", request_id=None)
    queue = Queue(settings.rq_queue, connection=sync_redis)
    sync_redis.lrem(queue.key, 0, record.id)
    sync_redis.hset(RQJob.key_for(record.id), "status", "failed")
    sync_redis.expire(RQJob.key_for(record.id), 3600)
    sync_redis.zadd(queue.failed_job_registry.key, {record.id: 1})
    await asyncio.sleep(0.01)
    assert await _reconciler(async_redis, sync_redis, settings).reconcile() == 1
    assert RQJob.fetch(record.id, connection=sync_redis).get_status() == "queued"
    assert sync_redis.ttl(RQJob.key_for(record.id)) == -1  # not the hour RQ gave the failed one
    assert record.id not in queue.failed_job_registry


async def test_a_revival_whose_replies_are_lost_queues_the_job_once(
    jobs: JobService, sync_redis: Redis, settings: Settings, redis_server: EmbeddedRedis
) -> None:
    """Every other write's reply lost on the way back, from the first (tests/lossy_proxy.py):
    redis-py sends the transition (EVALSHA) and then the script that queues the RQ job again
    (EVAL); each lands once."""
    record, _ = await jobs.submit("some text", idempotency_key=None, tenant="public", request_id=None)
    _lose_rq_entry(sync_redis, settings.rq_queue, record.id)
    await asyncio.sleep(0.01)
    with LossyProxy(redis_server.port, every=2, first=1) as proxy:
        lossy = async_client(proxy.url)
        try:
            assert await _reconciler(lossy, sync_redis, settings).reconcile() == 1
        finally:
            await lossy.aclose()
    assert proxy.dropped["EVALSHA"] >= 1 and proxy.dropped["EVAL"] >= 1, proxy.dropped
    assert sync_redis.lrange(f"rq:queue:{settings.rq_queue}", 0, -1) == [record.id.encode()]
    revived = store.get_job_sync(sync_redis, record.id)
    assert revived is not None and (revived.status, revived.version) == (JobStatus.RETRYING, 2)
