"""One attempt of a job, stage by stage, against real Redis and the stub LLM."""

from __future__ import annotations

import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from gql_service import keys, store
from gql_service.models import MAX_ERROR_CHARS, MAX_MODEL_CHARS, JobError, JobErrorCode, JobRecord, JobStage, JobStatus
from gql_service.worker.llm.offline import OfflineProvider
from gql_service.worker.llm.openai_provider import OpenAIProvider, make_client
from gql_service.worker.pipeline import Attempt, InvalidOutput, RetryLater, validate

from .openai_stub import VALID_EXTRACTION, Fault, OpenAIStub
from .records import create_job

TTL = 3600


@pytest.fixture
def job(sync_redis: Redis) -> JobRecord:
    return create_job(sync_redis, "job-1")


class Events:
    """Every state published for the job, read from Redis pub/sub."""

    def __init__(self, redis: Redis, job_id: str) -> None:
        self.pubsub = redis.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(keys.job_events(job_id))
        self.pubsub.get_message(timeout=1)

    def until_terminal(self) -> list[JobRecord]:
        out: list[JobRecord] = []
        while not (out and out[-1].terminal):
            message = self.pubsub.get_message(timeout=5)
            assert message is not None, f"no terminal event; saw {[e.stage for e in out]}"
            out.append(store.decode(message["data"]))
        self.pubsub.close()
        return out


def openai(stub: OpenAIStub) -> OpenAIProvider:
    return OpenAIProvider(make_client(api_key="k", base_url=stub.base_url, timeout_s=5), model="stub-model")


async def test_happy_path_stages_and_result(
    sync_redis: Redis, async_redis: AsyncRedis, job: JobRecord, stub: OpenAIStub
) -> None:
    events = Events(sync_redis, job.id)
    final = await Attempt(async_redis, openai(stub), job.id, ttl_s=TTL).run(retries_left=2)
    assert final is not None and final.status is JobStatus.FINISHED and final.stage is JobStage.DONE
    assert final.result is not None and final.result.model_dump(mode="json") == VALID_EXTRACTION
    assert final.usage is not None and final.usage.total_tokens == 150
    assert final.attempts == 1 and final.started_at and final.finished_at
    seen = events.until_terminal()
    assert [e.stage for e in seen] == [JobStage.CALLING_LLM, JobStage.VALIDATING, JobStage.DONE]
    assert [e.version for e in seen] == [2, 3, 4]


async def test_invalid_output_is_repaired_once_and_usage_is_summed(
    sync_redis: Redis, async_redis: AsyncRedis, job: JobRecord, stub: OpenAIStub
) -> None:
    stub.script(Fault.raw("this is not json"), Fault.ok())
    events = Events(sync_redis, job.id)
    final = await Attempt(async_redis, openai(stub), job.id, ttl_s=TTL).run(retries_left=0)
    assert final is not None and final.status is JobStatus.FINISHED
    assert final.usage is not None and final.usage.total_tokens == 300
    assert [e.stage for e in events.until_terminal()] == [
        JobStage.CALLING_LLM,
        JobStage.VALIDATING,
        JobStage.REPAIRING,
        JobStage.VALIDATING,
        JobStage.DONE,
    ]
    assert "not valid JSON" in stub.requests[-1]["messages"][-1]["content"]


async def test_output_breaking_the_schema_twice_fails_invalid_output(
    sync_redis: Redis, async_redis: AsyncRedis, job: JobRecord, stub: OpenAIStub
) -> None:
    bad = dict(VALID_EXTRACTION, toxicity_score=7, tags=[])
    stub.script(Fault.ok(bad), Fault.ok(bad))
    final = await Attempt(async_redis, openai(stub), job.id, ttl_s=TTL).run(retries_left=2)
    assert final is not None and final.status is JobStatus.FAILED and final.stage is JobStage.FAILED
    assert final.error is not None and final.error.code is JobErrorCode.INVALID_OUTPUT
    assert "toxicity_score" in final.error.message and "tags" in final.error.message
    assert final.usage is not None and final.usage.total_tokens == 300


async def test_a_nul_in_the_answer_is_repaired_once_then_invalid_output(
    sync_redis: Redis, async_redis: AsyncRedis, job: JobRecord, stub: OpenAIStub
) -> None:
    # PostgreSQL's text can't hold NUL: an answer with one never becomes the record's result.
    nul = dict(VALID_EXTRACTION, summary="A visit\x00 to the clinic.")
    stub.script(Fault.ok(nul), Fault.ok(nul))
    events = Events(sync_redis, job.id)
    final = await Attempt(async_redis, openai(stub), job.id, ttl_s=TTL).run(retries_left=2)
    assert JobStage.REPAIRING in [e.stage for e in events.until_terminal()]
    assert final is not None and final.result is None
    assert final.error is not None and final.error.code is JobErrorCode.INVALID_OUTPUT
    assert "summary" in final.error.message and "NUL" in final.error.message
    assert "NUL" in stub.requests[-1]["messages"][-1]["content"]  # the repair said what to fix


async def test_transient_error_with_retries_left_is_retrying(
    sync_redis: Redis, async_redis: AsyncRedis, job: JobRecord, stub: OpenAIStub
) -> None:
    stub.script(Fault.http(429))
    with pytest.raises(RetryLater):
        await Attempt(async_redis, openai(stub), job.id, ttl_s=TTL).run(retries_left=1)
    record = store.get_job_sync(sync_redis, job.id)
    assert record is not None and record.status is JobStatus.RETRYING and record.stage is JobStage.QUEUED
    assert record.error is not None and record.error.code is JobErrorCode.RATE_LIMITED and record.error.retryable
    # The next attempt counts up and clears the error on success.
    final = await Attempt(async_redis, openai(stub), job.id, ttl_s=TTL).run(retries_left=0)
    assert final is not None and final.status is JobStatus.FINISHED and final.attempts == 2 and final.error is None


async def test_transient_error_on_the_last_attempt_fails_retryable(
    sync_redis: Redis, async_redis: AsyncRedis, job: JobRecord, stub: OpenAIStub
) -> None:
    stub.script(Fault.http(500))
    final = await Attempt(async_redis, openai(stub), job.id, ttl_s=TTL).run(retries_left=0)
    assert final is not None and final.status is JobStatus.FAILED
    assert final.error is not None and final.error.code is JobErrorCode.PROVIDER_ERROR and final.error.retryable


@pytest.mark.parametrize(
    ("fault", "code"), [(Fault.refusal(), JobErrorCode.REFUSED), (Fault.truncated(), JobErrorCode.TRUNCATED)]
)
async def test_refusal_and_truncation_fail_without_repair(
    sync_redis: Redis, async_redis: AsyncRedis, job: JobRecord, stub: OpenAIStub, fault: Fault, code: JobErrorCode
) -> None:
    stub.script(fault)
    final = await Attempt(async_redis, openai(stub), job.id, ttl_s=TTL).run(retries_left=2)
    assert final is not None and final.error is not None and final.error.code is code
    assert len(stub.requests) == 1


async def test_a_finished_job_is_not_run_again(sync_redis: Redis, async_redis: AsyncRedis, job: JobRecord) -> None:
    await Attempt(async_redis, OfflineProvider(), job.id, ttl_s=TTL).run(retries_left=0)
    assert await Attempt(async_redis, OfflineProvider(), job.id, ttl_s=TTL).run(retries_left=0) is None
    record = store.get_job_sync(sync_redis, job.id)
    assert record is not None and record.attempts == 1


def test_validate_explains_what_is_wrong() -> None:
    with pytest.raises(InvalidOutput, match="not valid JSON"):
        validate("{")
    with pytest.raises(InvalidOutput, match="summary.*at most 40"):
        validate(__import__("json").dumps(dict(VALID_EXTRACTION, summary="word " * 41)))
    with pytest.raises(InvalidOutput, match="entities.0.confidence"):
        validate(
            __import__("json").dumps(dict(VALID_EXTRACTION, entities=[{"type": "X", "value": "y", "confidence": 1.5}]))
        )
    assert validate(__import__("json").dumps(dict(VALID_EXTRACTION, language="EN"))).language == "en"


async def test_oversized_model_output_is_never_stored(
    sync_redis: Redis, async_redis: AsyncRedis, job: JobRecord, stub: OpenAIStub
) -> None:
    """A 4 MB summary (in few words), a 500,000-character model name: the record keeps
    what the contract bounds, and the whole record stays small."""
    huge = dict(VALID_EXTRACTION, summary="word " * 10 + "x" * 4_000_000, tags=["t" * 100_000])
    stub.script(Fault.ok(huge), Fault.model_named("m" * 500_000, huge))
    final = await Attempt(async_redis, openai(stub), job.id, ttl_s=TTL).run(retries_left=0)
    assert final is not None and final.error is not None and final.error.code is JobErrorCode.INVALID_OUTPUT
    assert "summary" in final.error.message and "tags" in final.error.message
    assert final.result is None
    assert sync_redis.memory_usage(keys.job(job.id)) < 20_000  # type: ignore[operator]
    stub.script(Fault.model_named("m" * 500_000))
    other = JobRecord(id="job-2")
    with sync_redis.pipeline() as pipe:
        store.create_job(pipe, other, text="text", ttl_s=TTL)
        pipe.execute()
    done = await Attempt(async_redis, openai(stub), other.id, ttl_s=TTL).run(retries_left=0)
    assert done is not None and done.status is JobStatus.FINISHED
    assert done.model is not None and len(done.model) == MAX_MODEL_CHARS


def test_error_messages_are_bounded() -> None:
    assert len(JobError(code=JobErrorCode.REFUSED, message="no " * 100_000).message) == MAX_ERROR_CHARS
