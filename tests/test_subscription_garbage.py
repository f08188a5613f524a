"""A subscription's frames leave no garbage behind: what a frame builds is freed when it has
been sent, not kept until the subscription ends and then left to the cycle collector (whose
full collection froze the API for seconds under fan-out: gql_service/api/executor.py)."""

from __future__ import annotations

import asyncio
import gc

from redis.asyncio import Redis as AsyncRedis

from gql_service import store
from gql_service.api.schema import Context, schema
from gql_service.models import JobRecord, JobStage, JobStatus

UPDATES = """subscription($id: ID!) { jobUpdates(id: $id) { id status stage version createdAt updatedAt attempts
  result { summary sentiment tags language toxicityScore entities { type value confidence } }
  error { code message retryable } usage { promptTokens completionTokens totalTokens } } }"""


def _step(job: JobRecord) -> JobRecord:
    stage = JobStage.VALIDATING if job.stage is JobStage.CALLING_LLM else JobStage.CALLING_LLM
    return job.model_copy(update={"status": JobStatus.STARTED, "stage": stage})


def _finish(job: JobRecord) -> JobRecord:
    return job.model_copy(update={"status": JobStatus.FINISHED, "stage": JobStage.DONE})


async def _follow(context: Context, redis: AsyncRedis, changes: int) -> int:
    """One subscription through `changes` versions and the job's end; the frames it got."""
    record, _ = await context.jobs.submit("Some text.", idempotency_key=None, tenant=context.tenant, request_id=None)
    stream = await schema.subscribe(UPDATES, variable_values={"id": record.id}, context_value=context)
    frames = 0
    async with asyncio.timeout(20):
        async for result in stream:  # type: ignore[union-attr]
            assert result.errors is None, result.errors
            frames += 1
            change = _step if frames <= changes else _finish
            if frames <= changes + 1:
                await store.update_job(redis, record.id, change, ttl_s=60)
    return frames


async def _in_cycles(context: Context, redis: AsyncRedis, changes: int) -> int:
    """The objects the cycle collector finds after one subscription of `changes` versions."""
    gc.collect()
    gc.disable()
    try:
        frames = await _follow(context, redis, changes)
        assert frames == changes + 2  # the snapshot, each change, the end
        return gc.collect()
    finally:
        gc.enable()


async def test_a_subscription_s_frames_leave_nothing_for_the_cycle_collector(
    context: Context, async_redis: AsyncRedis
) -> None:
    await _in_cycles(context, async_redis, 2)  # warm-up: caches, first-use imports
    few = min([await _in_cycles(context, async_redis, 2) for _ in range(3)])
    many = min([await _in_cycles(context, async_redis, 42) for _ in range(3)])
    # 40 frames more: before, about 80 objects each (what a frame built, kept until the end).
    assert many - few < 40, (few, many)
