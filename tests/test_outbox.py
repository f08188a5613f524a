"""The outboxes (archive, webhooks): one bad entry never holds up the rest, a poison entry
ends in its outbox's dead letters (and can be replayed), the streams are bounded, and no
process writes an entry that no consumer reads. Real Redis, PostgreSQL, uvicorn and RQ
worker processes."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis as AsyncRedis

from gql_service import keys, store
from gql_service.models import Extraction, JobRecord, JobStage, JobStatus

from .openai_stub import VALID_EXTRACTION

TTL = 3600


@pytest.mark.parametrize(
    "nul",
    [
        {"summary": "A visit\x00 to the clinic."},
        {"tags": ["health", "clin\x00ic"]},
        {"entities": [{"type": "PER\x00SON", "value": "Dr. Rao", "confidence": 0.9}]},
        {"entities": [{"type": "PERSON", "value": "Dr.\x00Rao", "confidence": 0.9}]},
        {"language": "e\x00"},
    ],
)
def test_an_extraction_with_a_nul_in_any_text_is_invalid(nul: dict[str, object]) -> None:
    Extraction.model_validate(VALID_EXTRACTION)  # the same answer without it is fine
    with pytest.raises(ValidationError):
        Extraction.model_validate({**VALID_EXTRACTION, **nul})


# -- the store: entries only into outboxes that exist, bounded -----------------------------
async def end(redis: AsyncRedis, job_id: str, *, webhook: bool = True, bound: int = store.OUTBOX_MAX_LEN) -> None:
    record = JobRecord(id=job_id, webhook_url="https://example.com/hook" if webhook else None)
    async with redis.pipeline(transaction=True) as pipe:
        store.create_job(pipe, record, text="A text.", ttl_s=TTL)
        await pipe.execute()
    finished = {"status": JobStatus.FINISHED, "stage": JobStage.DONE}
    _, changed = await store.update_job(
        redis, job_id, lambda job: job.model_copy(update=finished), ttl_s=TTL, outbox_max_len=bound
    )
    assert changed


async def drained(redis: AsyncRedis, *outboxes: keys.Outbox) -> None:
    """What a drainer does when it starts: its stream, with its group."""
    for box in outboxes:
        await redis.xgroup_create(box.stream, box.group, id="0", mkstream=True)


async def test_a_transition_writes_an_outbox_entry_only_once_its_stream_exists(async_redis: AsyncRedis) -> None:
    await end(async_redis, "before")
    assert await async_redis.exists(keys.ARCHIVE_OUTBOX, keys.WEBHOOK_OUTBOX) == 0  # nobody reads them: not written
    await drained(async_redis, keys.ARCHIVE)
    await end(async_redis, "archived")
    [(_, fields)] = await async_redis.xrange(keys.ARCHIVE_OUTBOX)
    assert store.decode(fields[b"d"]).id == "archived" and fields[b"t"] == b"A text."
    assert not await async_redis.exists(keys.WEBHOOK_OUTBOX)
    await drained(async_redis, keys.WEBHOOKS)
    await end(async_redis, "hooked")
    assert [store.decode(f[b"d"]).id for _, f in await async_redis.xrange(keys.WEBHOOK_OUTBOX)] == ["hooked"]
    # Drained empty, the stream stays (and so does the rule's answer).
    ids = [entry_id for entry_id, _ in await async_redis.xrange(keys.ARCHIVE_OUTBOX)]
    await async_redis.xack(keys.ARCHIVE_OUTBOX, keys.ARCHIVE.group, *ids)
    await async_redis.xdel(keys.ARCHIVE_OUTBOX, *ids)
    assert await async_redis.exists(keys.ARCHIVE_OUTBOX) == 1
    await end(async_redis, "after", webhook=False)
    assert await async_redis.xlen(keys.ARCHIVE_OUTBOX) == 1


async def test_every_outbox_entry_carries_the_max_len_bound(async_redis: AsyncRedis) -> None:
    await drained(async_redis, keys.ARCHIVE, keys.WEBHOOKS)
    for n in range(400):
        await end(async_redis, f"job-{n}", bound=50)
    # MAXLEN ~ trims whole stream nodes (100 entries each): about the bound, never 400.
    for stream in (keys.ARCHIVE_OUTBOX, keys.WEBHOOK_OUTBOX):
        assert 50 <= await async_redis.xlen(stream) < 150
