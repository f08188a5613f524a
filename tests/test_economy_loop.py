"""The economy loop (gql_service.worker.economy) in process, against a real Redis and the
stub's Batch API through the real SDK: what a worker that dies mid-way leaves, what the
reconciler leaves alone, and what an economy job costs."""

from __future__ import annotations

import asyncio
import threading

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.lock import Lock
from rq.job import Job as RQJob

from gql_service import economy_store, keys, pricing, queueing, store
from gql_service.api.batches import BatchService
from gql_service.api.errors import IdempotencyKeyReused
from gql_service.api.jobs import JobService
from gql_service.economy_store import ChunkState
from gql_service.models import BatchMode, JobPriority, JobStage, JobStatus, TokenUsage
from gql_service.pricing import Price
from gql_service.settings import Settings
from gql_service.worker import economy
from gql_service.worker.economy import Economy
from gql_service.worker.llm.provider_batches import Answer, OpenAIBatches
from gql_service.worker.reconciler import Reconciler

from .openai_stub import OpenAIStub

MODEL = "stub-model"


class Killed(BaseException):
    """The worker's death, mid-step (a BaseException: nothing in the loop catches it)."""


def loop(redis: AsyncRedis, sync_redis: Redis, settings: Settings, stub: OpenAIStub) -> Economy:
    api = OpenAIBatches(AsyncOpenAI(api_key="sk-test", base_url=stub.base_url, max_retries=0), model=MODEL)
    return Economy(redis, api, queueing.llm_queues(settings, sync_redis), settings, model=MODEL, endpoint="stub")


async def economy_jobs(jobs: JobService, n: int) -> tuple[str, list[str]]:
    """A closed ECONOMY batch of `n` jobs, submitted as the API does."""
    batches = BatchService(jobs)
    batch, _ = await batches.create(
        name="economy", metadata=None, idempotency_key=None, tenant="public", mode=BatchMode.ECONOMY
    )
    news = [
        jobs.new_job(f"text {i}", idempotency_key=None, tenant="public", request_id=None, batch_id=batch.id)
        for i in range(n)
    ]
    submitted = await jobs.submit_many(news, batch_id=batch.id, economy=True)
    await batches.close(batch.id, tenant="public")
    return batch.id, [outcome[0].id for outcome in submitted if isinstance(outcome, tuple)]


def eager_reconciler(async_redis: AsyncRedis, sync_redis: Redis, settings: Settings) -> Reconciler:
    """A reconciler for which every job has stood still long enough."""
    reconciling = settings.model_copy(update={"reconcile_interval_s": 0.001})
    return Reconciler(async_redis, queueing.llm_queues(settings, sync_redis), reconciling, consumer="test")


def queued(sync_redis: Redis, settings: Settings) -> list[str]:
    return queueing.llm_queues(settings, sync_redis)[JobPriority.NORMAL].job_ids


async def test_a_worker_killed_while_reading_the_output_hands_each_job_over_once(
    jobs: JobService, async_redis: AsyncRedis, sync_redis: Redis, settings: Settings, stub: OpenAIStub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    batch_id, ids = await economy_jobs(jobs, 40)
    assert queued(sync_redis, settings) == []  # held for the provider batch, not on RQ's queue
    stub.batches.instant = True
    monkeypatch.setattr(economy, "GROUP", 10)

    doomed = loop(async_redis, sync_redis, settings, stub)
    settle, groups = doomed.jobs.settle, 0

    async def dies_at_the_third_group(chunk_id: str, answers: list[Answer]) -> None:
        nonlocal groups
        if groups == 2:
            raise Killed
        groups += 1
        await settle(chunk_id, answers)

    doomed.jobs.settle = dies_at_the_third_group  # type: ignore[method-assign]
    assert await doomed.flush() == 1
    [chunk_id] = await economy_store.active(async_redis)
    with pytest.raises(Killed):
        await doomed.advance(chunk_id)
    chunk = await economy_store.chunk(async_redis, chunk_id)
    assert chunk is not None and chunk.state is ChunkState.READING
    assert len(queued(sync_redis, settings)) == 20  # two groups handed over before it died

    await loop(async_redis, sync_redis, settings, stub).advance(chunk_id)  # the next worker
    assert sorted(queued(sync_redis, settings)) == sorted(ids)  # each once: none twice, none lost
    assert await economy_store.active(async_redis) == []
    answers = [await async_redis.hget(keys.job(job_id), keys.ANSWER_FIELD) for job_id in ids]
    assert all(answers)
    assert len(stub.batches.created) == 1
    [chunk_done] = await economy_store.of_batch(async_redis, batch_id)
    assert chunk_done.state is ChunkState.DONE and chunk_done.provider_batch == stub.batches.created[0].id


async def test_the_reconciler_leaves_jobs_a_provider_batch_has_or_will_have(
    jobs: JobService, async_redis: AsyncRedis, sync_redis: Redis, settings: Settings, stub: OpenAIStub
) -> None:
    reconciler = eager_reconciler(async_redis, sync_redis, settings)
    _, ids = await economy_jobs(jobs, 5)
    await asyncio.sleep(0.01)  # older than the (tiny) interval
    assert await reconciler.reconcile() == 0  # waiting to be sent: no RQ job, and none needed
    stub.batches.hold = threading.Event()  # never set: it stays in progress
    work = loop(async_redis, sync_redis, settings, stub)
    await work.flush()
    [chunk_id] = await economy_store.active(async_redis)
    await work.advance(chunk_id)
    in_batch = await store.get_jobs(async_redis, ids)
    assert {(r.status, r.stage) for r in in_batch if r} == {(JobStatus.STARTED, JobStage.PROVIDER_BATCH)}
    await asyncio.sleep(0.01)
    assert await reconciler.reconcile() == 0
    assert queued(sync_redis, settings) == []


async def test_a_batch_made_with_a_key_is_not_given_back_for_another_mode(jobs: JobService) -> None:
    batches = BatchService(jobs)
    await batches.create(name="n", metadata=None, idempotency_key="k", tenant="public", mode=BatchMode.ECONOMY)
    with pytest.raises(IdempotencyKeyReused, match="mode"):
        await batches.create(name="n", metadata=None, idempotency_key="k", tenant="public")


def test_what_a_provider_batch_answered_costs_the_batch_discount() -> None:
    prices = {"m": Price(input_per_mtok=1.0, output_per_mtok=2.0)}
    batch = TokenUsage(prompt_tokens=1_000_000, completion_tokens=1_000_000, total_tokens=2_000_000)
    repair = TokenUsage(prompt_tokens=1_000_000, total_tokens=1_000_000)
    assert pricing.job_cost(prices, "m", batch) == 3.0
    assert pricing.job_cost(prices, "m", batch, batch_usage=batch, batch_discount=0.5) == 1.5
    # A repair re-ask is an interactive call: its tokens cost the full price.
    assert pricing.job_cost(prices, "m", batch + repair, batch_usage=batch, batch_discount=0.5) == 2.5


async def test_a_server_without_a_batch_api_sends_the_jobs_the_interactive_way(
    jobs: JobService, async_redis: AsyncRedis, sync_redis: Redis, settings: Settings, stub: OpenAIStub
) -> None:
    batch_id, ids = await economy_jobs(jobs, 12)
    # An OpenAI-compatible server that has chat completions and no /files: a 404 to the upload.
    client = AsyncOpenAI(api_key="sk-test", base_url=f"{stub.base_url}/no-batch-api", max_retries=0)
    work = Economy(async_redis, OpenAIBatches(client, model=MODEL), queueing.llm_queues(settings, sync_redis), settings,
                   model=MODEL, endpoint="stub")  # fmt: skip
    await work.flush()
    [chunk_id] = await economy_store.active(async_redis)
    await work.advance(chunk_id)
    assert sorted(queued(sync_redis, settings)) == sorted(ids)  # each on its RQ queue, once
    assert await economy_store.active(async_redis) == []
    [chunk] = await economy_store.of_batch(async_redis, batch_id)
    assert chunk.state is ChunkState.DONE and chunk.status == "failed"
    await work.advance(chunk_id)  # a second look changes nothing
    assert len(queued(sync_redis, settings)) == len(ids)


async def test_the_reconciler_revives_a_handed_over_job_whose_rq_entry_was_lost(
    jobs: JobService, async_redis: AsyncRedis, sync_redis: Redis, settings: Settings, stub: OpenAIStub
) -> None:
    reconciler = eager_reconciler(async_redis, sync_redis, settings)
    _, ids = await economy_jobs(jobs, 3)
    stub.batches.instant = True
    work = loop(async_redis, sync_redis, settings, stub)
    await work.flush()
    [chunk_id] = await economy_store.active(async_redis)
    await asyncio.sleep(0.01)
    assert await reconciler.reconcile() == 0  # taken into a chunk, not yet at the provider: the loop's
    await work.advance(chunk_id)
    assert sorted(queued(sync_redis, settings)) == sorted(ids)
    lost = ids[0]  # a failover loses its RQ entry after the hand-over
    sync_redis.delete(RQJob.key_for(lost))
    sync_redis.lrem(queueing.llm_queues(settings, sync_redis)[JobPriority.NORMAL].key, 0, lost)
    await asyncio.sleep(0.01)
    assert await reconciler.reconcile() == 1
    assert lost in queued(sync_redis, settings)


async def test_a_take_repeated_after_a_lost_reply_takes_nothing_more(async_redis: AsyncRedis) -> None:
    async with async_redis.pipeline(transaction=True) as pipe:
        economy_store.hold(pipe, "batch_x", {f"job{n}": float(n) for n in range(5)}, ttl_s=60)
        await pipe.execute()
    assert await economy_store.take(async_redis, "batch_x", "chunk1", most=2, ttl_s=60) == 2
    assert await economy_store.take(async_redis, "batch_x", "chunk1", most=2, ttl_s=60) == 0  # the same take again
    assert await economy_store.job_ids(async_redis, "chunk1") == ["job0", "job1"]
    # Only a full chunk, when asked so: 3 wait, 5 would make one.
    assert await economy_store.take(async_redis, "batch_x", "chunk2", most=5, ttl_s=60, full=True) == 0
    assert await economy_store.take(async_redis, "batch_x", "chunk2", most=5, ttl_s=60) == 3


async def test_a_chunk_that_fails_now_holds_up_no_other(
    jobs: JobService, async_redis: AsyncRedis, sync_redis: Redis, settings: Settings, stub: OpenAIStub
) -> None:
    stub.batches.instant = True
    for _ in range(2):
        await economy_jobs(jobs, 3)
    work = loop(async_redis, sync_redis, settings, stub)
    await work.flush()
    first, second = await economy_store.active(async_redis)
    advance = work.advance

    async def provider_away_for_the_first(chunk_id: str, lock: object = None) -> None:
        if chunk_id == first:
            raise openai.APIConnectionError(request=httpx.Request("GET", stub.base_url))
        await advance(chunk_id)

    work.advance = provider_away_for_the_first  # type: ignore[method-assign,assignment]
    await work.step()
    assert await economy_store.active(async_redis) == [first]  # the second went all the way


async def test_a_canceled_batch_s_chunk_is_never_sent(
    jobs: JobService, async_redis: AsyncRedis, sync_redis: Redis, settings: Settings, stub: OpenAIStub
) -> None:
    batch_id, _ = await economy_jobs(jobs, 4)
    work = loop(async_redis, sync_redis, settings, stub)
    await work.flush()  # taken into a chunk: the cancel finds no waiting job, and the chunk sees it
    await BatchService(jobs).cancel(batch_id, tenant="public")
    [chunk_id] = await economy_store.active(async_redis)
    await work.advance(chunk_id)
    [chunk] = await economy_store.of_batch(async_redis, batch_id)
    assert chunk.state is ChunkState.DONE and chunk.status == "cancelled"
    assert stub.batches.uploads == [] and stub.batches.created == []
    in_chunk = await store.get_jobs(async_redis, await economy_store.job_ids(async_redis, chunk_id))
    assert {r.status for r in in_chunk if r} == {JobStatus.CANCELED}  # by cancelBatch, as every job of it


async def test_a_worker_whose_lock_lapsed_makes_no_provider_batch(
    jobs: JobService, async_redis: AsyncRedis, sync_redis: Redis, settings: Settings, stub: OpenAIStub
) -> None:
    await economy_jobs(jobs, 4)
    work = loop(async_redis, sync_redis, settings, stub)
    await work.flush()
    [chunk_id] = await economy_store.active(async_redis)
    lapsed = Lock(async_redis, keys.economy_lock(chunk_id), timeout=5)  # never acquired: not this worker's
    await work.advance(chunk_id, lapsed)
    chunk = await economy_store.chunk(async_redis, chunk_id)
    assert chunk is not None and chunk.state is ChunkState.UPLOADED  # uploaded, then it stopped
    assert stub.batches.created == []
