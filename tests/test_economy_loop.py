"""The economy loop (gql_service.worker.economy) in process, against a real Redis and the
stub's Batch API through the real SDK: what a worker that dies mid-way leaves, what the
reconciler leaves alone, and what an economy job costs."""

from __future__ import annotations

import asyncio
import threading

import pytest
from openai import AsyncOpenAI
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

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
from gql_service.worker.llm.provider_batches import OpenAIBatches
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

    class DiesWhileReading(Economy):
        groups = 0

        async def _settle(self, chunk: economy_store.Chunk, answers: list[economy.Answer]) -> None:
            if self.groups == 2:
                raise Killed
            self.groups += 1
            await super()._settle(chunk, answers)

    first = loop(async_redis, sync_redis, settings, stub)
    doomed = DiesWhileReading(async_redis, first.api, first.queues, settings, model=MODEL, endpoint="stub")
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
    assert {b.id for b in stub.batches.created} == {
        (await economy_store.of_batch(async_redis, batch_id))[0].provider_batch
    }


async def test_the_reconciler_leaves_jobs_a_provider_batch_has_or_will_have(
    jobs: JobService, async_redis: AsyncRedis, sync_redis: Redis, settings: Settings, stub: OpenAIStub
) -> None:
    reconciling = settings.model_copy(update={"reconcile_interval_s": 0.001})
    reconciler = Reconciler(async_redis, queueing.llm_queues(settings, sync_redis), reconciling, consumer="test")
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
