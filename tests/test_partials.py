"""Streamed partial results: reading the unfinished JSON, and one attempt's interim frames
through the real `openai` SDK against the loopback stub streaming server-sent events
(end to end: tests/test_partials_e2e.py)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from gql_service import keys, partials, store
from gql_service.models import Extraction, JobRecord, JobStatus
from gql_service.partial_json import parse_partial
from gql_service.worker.llm.openai_provider import OpenAIProvider, make_client
from gql_service.worker.pipeline import Attempt, RetryLater
from gql_service.worker.provider_limits import ProviderLimits

from .openai_stub import VALID_EXTRACTION, Fault, OpenAIStub
from .records import create_job

TTL = 3600


# -- reading the unfinished JSON ---------------------------------------------------------------
def test_every_prefix_of_an_answer_shows_only_what_the_answer_holds() -> None:
    answer = {**VALID_EXTRACTION, "entities": [*VALID_EXTRACTION["entities"], {"type": "ORG", "value": "Acme Labs",
              "confidence": 0.75}], "toxicity_score": 0.05}  # fmt: skip
    text = json.dumps(answer)
    final = Extraction.model_validate(answer)
    summaries = []
    for end in range(len(text) + 1):
        partial = parse_partial(text[:end])
        if partial is None:
            continue
        assert partial.summary is None or final.summary.startswith(partial.summary)
        assert partial.sentiment in (None, final.sentiment)
        assert partial.tags is None or partial.tags == final.tags[: len(partial.tags)]
        assert partial.entities is None or partial.entities == final.entities[: len(partial.entities)]
        assert partial.language in (None, final.language)
        # 0.0 is where 0.05 starts: a number shows once something follows it.
        assert partial.toxicity_score in (None, final.toxicity_score), text[:end]
        summaries.append(partial.summary)
    assert len(set(summaries)) > 20  # the summary grows piece by piece
    last = parse_partial(text)
    assert last is not None and last.model_dump() == final.model_dump()


@pytest.mark.parametrize(
    "text",
    ["", "not json", "[1, 2", '{"summ', '"just a string"'],
)
def test_text_that_is_not_the_start_of_an_answer_shows_nothing(text: str) -> None:
    assert parse_partial(text) is None


def test_values_the_contract_forbids_are_never_shown() -> None:
    partial = parse_partial(
        '{"summary": "ok", "sentiment": "furious", "tags": ["' + "x" * 41 + '", "fine"], "language": "english", '
        '"entities": [{"type": "PERSON", "value": "A", "confidence": 7}, {"type": "ORG", "value": "B", '
        '"confidence": 0.5}], "toxicity_score": -1, '
    )
    assert partial is not None
    assert (partial.sentiment, partial.language, partial.toxicity_score) == (None, None, None)
    assert partial.tags == ["fine"]
    assert partial.entities is not None and [e.value for e in partial.entities] == ["B"]


# -- one attempt, in process ---------------------------------------------------------------------
@pytest.fixture
def job(sync_redis: Redis) -> JobRecord:
    return create_job(sync_redis, "job-partial")


@pytest.fixture
async def openai(stub: OpenAIStub) -> AsyncIterator[Callable[..., OpenAIProvider]]:
    """Providers on the stub, closed after the test (their HTTP sessions belong to its loop)."""
    made: list[OpenAIProvider] = []

    def make(*, stream: bool = True) -> OpenAIProvider:
        client = make_client(api_key="k", base_url=stub.base_url, timeout_s=5)
        made.append(OpenAIProvider(client, model="stub-model", stream=stream))
        return made[-1]

    yield make
    for provider in made:
        await provider.aclose()


async def test_a_streamed_answer_gives_the_same_result_and_usage(
    sync_redis: Redis, async_redis: AsyncRedis, stub: OpenAIStub, openai: Callable[..., OpenAIProvider]
) -> None:
    finals = {}
    for stream in (True, False):
        record = create_job(sync_redis, f"job-stream-{stream}")
        finals[stream] = await Attempt(async_redis, openai(stream=stream), record.id, ttl_s=TTL).run(retries_left=0)
    streamed, whole = finals[True], finals[False]
    assert streamed is not None and whole is not None and streamed.status is JobStatus.FINISHED
    assert streamed.result == whole.result and streamed.result is not None
    assert streamed.usage == whole.usage and streamed.usage is not None and streamed.usage.total_tokens == 150
    asked = stub.requests[0]
    assert asked["stream"] is True and asked["stream_options"] == {"include_usage": True}
    assert asked["response_format"]["type"] == "json_schema"  # the same strict schema
    assert "stream" not in stub.requests[1]


class FrameReader:
    """A subscriber of one job's frame channel, as an API process is for its clients."""

    def __init__(self, redis: Redis, job_id: str) -> None:
        self.pubsub = redis.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(keys.job_partials(job_id))
        assert self.pubsub.get_message(timeout=1) is None  # the confirmation, skipped; now it counts
        assert self.pubsub.subscribed

    def frames(self) -> list[tuple[str, int, int, Any]]:
        out = []
        while (message := self.pubsub.get_message(timeout=0.5)) is not None:
            out.append(partials.decode_frame(message["data"]))
        self.pubsub.close()
        return out


async def run_with_frames(async_redis: AsyncRedis, provider: OpenAIProvider, job_id: str) -> partials.PartialStream:
    stream = partials.PartialStream(async_redis, job_id, interval_s=0.1)
    attempt = Attempt(async_redis, provider, job_id, ttl_s=TTL, partials=stream)
    final = await attempt.run(retries_left=0)
    assert final is not None and final.status is JobStatus.FINISHED
    return stream


async def test_frames_are_coalesced_and_only_published_while_someone_watches(
    sync_redis: Redis, async_redis: AsyncRedis, job: JobRecord, stub: OpenAIStub, openai: Callable[..., OpenAIProvider]
) -> None:
    stub.stream_chunks, stub.stream_seconds = 100, 1.0
    reader = FrameReader(sync_redis, job.id)
    started = time.monotonic()
    watched = await run_with_frames(async_redis, openai(), job.id)
    took_s = time.monotonic() - started  # a 1 s answer, stretched by a loaded machine
    frames = reader.frames()
    # At most one per 100 ms of the answer (the first at once, and one for the latest text).
    assert 3 <= len(frames) <= took_s / 0.1 + 2, (len(frames), took_s)
    assert watched.published == len(frames)
    assert {(job_id, version) for job_id, version, _, _ in frames} == {(job.id, 2)}  # CALLING_LLM's version
    seqs = [seq for _, _, seq, _ in frames]
    assert seqs == sorted(set(seqs))
    lengths = [len(p.summary or "") for _, _, _, p in frames]
    assert lengths == sorted(lengths) and lengths[-1] > lengths[0]

    # Nobody watching: not one frame published.
    stub.reset()
    stub.stream_chunks, stub.stream_seconds = 100, 1.0
    other = create_job(sync_redis, "job-unwatched")
    unwatched = await run_with_frames(async_redis, openai(), other.id)
    assert unwatched.published == 0


async def test_a_stream_cut_midway_is_a_transient_error(
    async_redis: AsyncRedis, job: JobRecord, stub: OpenAIStub, openai: Callable[..., OpenAIProvider]
) -> None:
    stub.script(Fault.cut(after_chunks=3))
    with pytest.raises(RetryLater):
        await Attempt(async_redis, openai(), job.id, ttl_s=TTL).run(retries_left=1)
    record = await store.get_job(async_redis, job.id)
    assert record is not None and record.status is JobStatus.RETRYING and record.error is not None
    assert (record.error.code.value, record.error.retryable) == ("PROVIDER_ERROR", True)
    assert "broke off" in record.error.message


async def test_the_repair_call_streams_frames_of_its_own_version(
    sync_redis: Redis, async_redis: AsyncRedis, job: JobRecord, stub: OpenAIStub, openai: Callable[..., OpenAIProvider]
) -> None:
    stub.stream_chunks, stub.stream_seconds = 40, 0.5
    stub.script(Fault.raw("this is not json"), Fault.ok())
    reader = FrameReader(sync_redis, job.id)
    await run_with_frames(async_redis, openai(), job.id)
    frames = reader.frames()
    # CALLING_LLM (v2) wrote nothing an extraction could be read from; REPAIRING is v4.
    assert frames and {version for _, version, _, _ in frames} == {4}, frames
    final = await store.get_job(async_redis, job.id)
    assert final is not None and final.result is not None
    assert frames[-1][3].summary is not None and final.result.summary.startswith(frames[-1][3].summary)


class NoticingDemand(partials.Demand):
    """The worker's real ear for new watchers, which also says when it has heard one."""

    def __init__(self, redis: AsyncRedis) -> None:
        super().__init__(redis)
        self.noticed = asyncio.Event()

    def heard(self, job_ids: list[str]) -> None:
        super().heard(job_ids)
        self.noticed.set()


async def test_a_watcher_who_arrives_while_the_call_waits_for_its_turn_gets_frames(
    sync_redis: Redis, async_redis: AsyncRedis, job: JobRecord, stub: OpenAIStub, openai: Callable[..., OpenAIProvider]
) -> None:
    # The transition that starts the call counted nobody on the frame channel; then, while
    # the call waits for a slot (a busy provider), a subscriber comes and the API says so.
    # Frames were lost here once: that word reached a worker whose stream had not begun.
    stub.stream_chunks, stub.stream_seconds = 40, 0.5
    demand = NoticingDemand(async_redis)
    await demand.start()
    readers: list[FrameReader] = []

    class BusyProvider(ProviderLimits):
        async def wait_out_pause(self) -> float:
            readers.append(FrameReader(sync_redis, job.id))
            await partials.ask_for_frames(async_redis, [job.id])
            await asyncio.wait_for(demand.noticed.wait(), 10)
            return await super().wait_out_pause()

    limits = BusyProvider(async_redis, endpoint="stub", max_in_flight=None, call_timeout_s=5)
    stream = partials.PartialStream(async_redis, job.id, interval_s=0.1, demand=demand)
    try:
        async with stream:
            final = await Attempt(async_redis, openai(), job.id, ttl_s=TTL, limits=limits, partials=stream).run(
                retries_left=0
            )
    finally:
        await demand.stop()
    assert final is not None and final.status is JobStatus.FINISHED
    [reader] = readers
    frames = reader.frames()
    assert len(frames) >= 2 and stream.published == len(frames), frames
