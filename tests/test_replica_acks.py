"""REDIS_MIN_REPLICAS_ACKED against a real Redis that has no replica (so no WAIT is ever
confirmed) and one demoted while a WAIT is pending: a write that is not confirmed is
refused, never repeated, and the work it started is stopped all the same."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq.job import Job as RQJob

from gql_service import keys, store
from gql_service.api.batches import BatchService
from gql_service.api.errors import ServiceUnavailable
from gql_service.api.jobs import JobService
from gql_service.broadcast import Broadcast
from gql_service.cli.embedded_redis import EmbeddedRedis
from gql_service.redis_conn import async_client
from gql_service.settings import RedisTarget, ReplicaAck, Settings
from gql_service.worker.llm.offline import OfflineProvider
from gql_service.worker.pipeline import Attempt

from .records import create_job


def _acked(jobs: JobService, settings: Settings, *, timeout_ms: int, redis: AsyncRedis | None = None) -> JobService:
    acked = settings.model_copy(
        update={"redis_min_replicas_acked": 1, "redis_replica_ack_timeout_ms": timeout_ms, "redis_timeout_s": 5.0}
    )
    return JobService(
        redis=redis or jobs.redis, sync_redis=jobs.sync_redis, broadcast=jobs.broadcast, settings=acked,
        acked_redis=redis or jobs.redis,
    )  # fmt: skip


def _queued(sync_redis: Redis, settings: Settings) -> list[bytes]:
    return list(sync_redis.lrange(f"rq:queue:{settings.rq_queue}", 0, -1))


async def test_an_unconfirmed_submission_is_refused_and_found_again_by_its_key(
    jobs: JobService, sync_redis: Redis, settings: Settings
) -> None:
    acked = _acked(jobs, settings, timeout_ms=200)
    with pytest.raises(ServiceUnavailable, match=r"0 of 1 replica\(s\) confirmed it within 200 ms"):
        await acked.submit("some text", idempotency_key="k1", tenant="public", request_id=None)
    [queued] = _queued(sync_redis, settings)
    # The write is on the primary: the same key finds that very job (and waits again).
    with pytest.raises(ServiceUnavailable):
        await acked.submit("some text", idempotency_key="k1", tenant="public", request_id=None)
    record, deduplicated = await jobs.submit("some text", idempotency_key="k1", tenant="public", request_id=None)
    assert deduplicated and record.id.encode() == queued
    assert _queued(sync_redis, settings) == [queued]


async def _wait_pending(sync_redis: Redis) -> dict[str, Any]:
    """The client blocked in WAIT, once there is one."""
    async with asyncio.timeout(5):
        while True:
            blocked = [c for c in sync_redis.client_list() if c["cmd"] == "wait"]
            if blocked:
                return blocked[0]
            await asyncio.sleep(0.01)


async def test_a_connection_dropped_during_the_wait_does_not_submit_twice(
    jobs: JobService, sync_redis: Redis, settings: Settings
) -> None:
    acked = _acked(jobs, settings, timeout_ms=2000)
    submitting = asyncio.create_task(acked.submit("some text", idempotency_key=None, tenant="public", request_id=None))
    sync_redis.client_kill_filter(_id=(await _wait_pending(sync_redis))["id"])
    with pytest.raises(ServiceUnavailable, match="the wait failed"):
        await submitting
    # redis-py retries a pipeline whose connection dropped: had it retried this one, the
    # MULTI would have run again (a second copy of the job on the queue).
    assert len(_queued(sync_redis, settings)) == 1
    assert sync_redis.zcard(keys.tenant_jobs("public")) == 1


async def test_a_primary_demoted_during_the_wait_is_service_unavailable(settings: Settings) -> None:
    with EmbeddedRedis() as primary, EmbeddedRedis() as other:
        redis, sync_redis = async_client(primary.url), Redis.from_url(primary.url)
        pubsub = async_client(primary.url, max_connections=1, retries=0)
        broadcast = Broadcast(pubsub)
        plain = JobService(redis=redis, sync_redis=sync_redis, broadcast=broadcast, settings=settings)
        acked = _acked(plain, settings, timeout_ms=2000)
        try:
            submitting = asyncio.create_task(acked.submit("text", idempotency_key=None, tenant="t", request_id=None))
            await _wait_pending(sync_redis)
            sync_redis.replicaof("127.0.0.1", other.port)  # Redis answers the WAIT: UNBLOCKED
            with pytest.raises(ServiceUnavailable, match="UNBLOCKED"):
                await submitting
        finally:
            await redis.aclose()
            await pubsub.aclose()
            sync_redis.close()


async def test_an_unconfirmed_cancel_still_stops_the_job(
    jobs: JobService, sync_redis: Redis, settings: Settings
) -> None:
    record, _ = await jobs.submit("some text", idempotency_key=None, tenant="public", request_id=None)
    with pytest.raises(ServiceUnavailable, match="confirmed"):
        await _acked(jobs, settings, timeout_ms=200).cancel(record.id, tenant="public")
    canceled = await store.get_job(jobs.redis, record.id)
    assert canceled is not None and canceled.status.value == "CANCELED"
    assert RQJob.fetch(record.id, connection=sync_redis).get_status() == "canceled"  # no worker will take it


async def test_an_unconfirmed_batch_cancel_is_refused_like_a_job_cancel_and_stops_every_job(
    jobs: JobService, sync_redis: Redis, settings: Settings
) -> None:
    """cancelBatch goes through cancelJob's path: its ends wait for replicas too (they did not
    wait before), and its queued RQ jobs come off the queue (they were left for a worker)."""
    batches = BatchService(jobs)
    batch, _ = await batches.create(name="to cancel", metadata=None, idempotency_key=None, tenant="public")
    added = await jobs.submit_many(
        [jobs.new_job(f"text {i}", idempotency_key=None, tenant="public", request_id=None, batch_id=batch.id)
         for i in range(3)],
        batch_id=batch.id,
    )  # fmt: skip
    job_ids = [outcome[0].id for outcome in added if isinstance(outcome, tuple)]
    assert len(job_ids) == 3 and len(_queued(sync_redis, settings)) == 3
    acked = _acked(jobs, settings, timeout_ms=200)
    with pytest.raises(ServiceUnavailable, match="confirmed"):
        await BatchService(acked).cancel(batch.id, tenant="public")
    for job_id in job_ids:
        canceled = await store.get_job(jobs.redis, job_id)
        assert canceled is not None and canceled.status.value == "CANCELED"
        assert RQJob.fetch(job_id, connection=sync_redis).get_status() == "canceled"
    assert _queued(sync_redis, settings) == []


async def test_a_workers_unconfirmed_end_stands(
    async_redis: AsyncRedis, sync_redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """No client waits for a worker's write: the end is on the primary, and a failover that
    lost it would leave the job to the reconciler."""
    job = create_job(sync_redis, "unconfirmed")
    attempt = Attempt(async_redis, OfflineProvider(), job.id, ttl_s=60, ack=ReplicaAck(1, 100))
    with caplog.at_level(logging.WARNING, logger="gql_service.worker.pipeline"):
        final = await attempt.run(retries_left=0)
    assert final is not None and final.status.value == "FINISHED"
    assert "its end is not confirmed by the replicas" in caplog.text
    # The stages before the end were not waited for: one warning, for the end alone.
    assert caplog.text.count("not confirmed") == 1


def test_a_redis_target_shows_no_password() -> None:
    target = RedisTarget(url="redis://:hunter2@10.0.0.5:6379/0", sentinels=(("s1", 26379),), sentinel_password="pw2")
    for shown in (str(target), repr(target), repr(RedisTarget(url="redis://:hunter2@h:1/0"))):
        assert "hunter2" not in shown and "pw2" not in shown, shown
