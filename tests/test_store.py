"""Job records: versioned, atomic, published transitions; terminal jobs never change."""

from __future__ import annotations

import asyncio

import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from gql_service import keys, store
from gql_service.models import JobRecord, JobStage, JobStatus

TTL = 3600


def create(redis: Redis, job_id: str = "j1", text: str = "hello") -> JobRecord:
    record = JobRecord(id=job_id)
    with redis.pipeline() as pipe:
        store.create_job(pipe, record, text=text, ttl_s=TTL)
        pipe.execute()
    return record


def set_stage(stage: JobStage, status: JobStatus = JobStatus.STARTED):
    return lambda job: job.model_copy(update={"stage": stage, "status": status})


def test_create_stores_version_1_text_and_ttl(sync_redis: Redis) -> None:
    create(sync_redis, text="some text")
    got = store.get_job_sync(sync_redis, "j1")
    assert got is not None and got.version == 1 and got.status is JobStatus.QUEUED
    assert sync_redis.hget(keys.job("j1"), "t") == b"some text"
    assert 0 < sync_redis.ttl(keys.job("j1")) <= TTL


async def test_update_bumps_version_and_publishes_the_full_state(sync_redis: Redis, async_redis: AsyncRedis) -> None:
    create(sync_redis)
    pubsub = sync_redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.job_events("j1"))
    assert pubsub.get_message(timeout=1) is None  # the subscribe confirmation is swallowed
    record, changed = await store.update_job(async_redis, "j1", set_stage(JobStage.CALLING_LLM), ttl_s=TTL)
    assert changed and record is not None and record.version == 2
    message = pubsub.get_message(timeout=2)
    assert message is not None
    published = store.decode(message["data"])
    assert published == record
    assert store.get_job_sync(sync_redis, "j1") == record
    pubsub.close()


async def test_terminal_job_never_changes(sync_redis: Redis, async_redis: AsyncRedis) -> None:
    create(sync_redis)
    await store.update_job(async_redis, "j1", set_stage(JobStage.DONE, JobStatus.FINISHED), ttl_s=TTL)
    record, changed = await store.update_job(async_redis, "j1", set_stage(JobStage.CALLING_LLM), ttl_s=TTL)
    assert not changed
    assert record is not None and record.status is JobStatus.FINISHED and record.version == 2


def test_a_change_that_hands_back_the_record_it_was_given_is_refused() -> None:
    """A change is given the current record itself (not a deep copy: 30 µs a transition), so
    one that changed it in place would change what the caller still holds as last seen."""

    def in_place(job: JobRecord) -> JobRecord:
        job.attempts += 1
        return job

    current = JobRecord(id="j1")
    with pytest.raises(ValueError, match="changed copy"):
        store.next_state(current, in_place)
    new = store.next_state(current, set_stage(JobStage.CALLING_LLM))
    assert new is not None and new.stage is JobStage.CALLING_LLM and current.stage is JobStage.QUEUED


async def test_unknown_job_is_none(sync_redis: Redis, async_redis: AsyncRedis) -> None:
    assert store.get_job_sync(sync_redis, "nope") is None
    assert await store.update_job(async_redis, "nope", set_stage(JobStage.DONE), ttl_s=TTL) == (None, False)


async def test_concurrent_writers_lose_no_update(redis_url: str) -> None:
    setup = Redis.from_url(redis_url)
    create(setup)

    async def bump(n: int) -> None:
        client = AsyncRedis.from_url(redis_url)
        for _ in range(n):
            await store.update_job(client, "j1", lambda j: j.model_copy(update={"attempts": j.attempts + 1}), ttl_s=TTL)
        await client.aclose()

    await asyncio.gather(*(bump(50) for _ in range(4)))
    final = store.get_job_sync(setup, "j1")
    assert final is not None
    assert final.attempts == 200
    assert final.version == 201
    setup.close()


def test_a_transition_sent_twice_is_applied_once(sync_redis: Redis) -> None:
    """What redis-py does when the reply to EVALSHA is lost with the connection: send the
    same call again. The repeat must succeed without applying the change a second time."""
    create(sync_redis)
    current = store.get_job_sync(sync_redis, "j1")
    assert current is not None
    new = current.model_copy(update={"version": 2, "attempts": current.attempts + 1})
    script = sync_redis.register_script(store._CAS_LUA)
    keys_, args = store.cas_args(current, new, TTL, "token-1")
    assert script(keys=keys_, args=args) == [1, 0]
    outcome, watchers, stored = script(keys=keys_, args=args)  # the retry: reported applied...
    assert (outcome, watchers, store.decode(stored)) == (2, 0, new)
    after = store.get_job_sync(sync_redis, "j1")
    assert after is not None and (after.version, after.attempts) == (2, 1)  # ...and applied once
    # A different transition from the same stale version is still refused.
    other_keys, other_args = store.cas_args(current, new, TTL, "token-2")
    assert script(keys=other_keys, args=other_args) == [0, 0]


async def test_a_step_tried_again_after_its_reply_was_lost_lands_once(
    async_redis: AsyncRedis, sync_redis: Redis
) -> None:
    """A worker whose transition landed but whose reply was lost past redis-py's retries
    tries the same step again, with the same token, from a fresh read: reported written,
    with the state it wrote, and applied once (attempts were counted twice before)."""
    create(sync_redis, "j9")

    def attempt(job: JobRecord) -> JobRecord:
        return job.model_copy(update={"attempts": job.attempts + 1, "status": JobStatus.STARTED})

    first = await store.transition(async_redis, "j9", attempt, ttl_s=TTL, token="step-1")
    again = await store.transition(async_redis, "j9", attempt, ttl_s=TTL, token="step-1")
    assert first.changed and again.changed and again.record == first.record
    assert again.record is not None and (again.record.version, again.record.attempts) == (2, 1)
    # With the state it last saw (the worker's fast path) it is the script that notices.
    assert first.record is not None
    stale = await store.transition(async_redis, "j9", attempt, ttl_s=TTL, token="step-1", last_seen=first.record)
    assert stale.changed and stale.record == first.record
    other = await store.transition(async_redis, "j9", attempt, ttl_s=TTL, token="step-2")
    assert other.record is not None and other.record.attempts == 2


# -- two steps in one round trip (gql_service/worker/job_ends.py two_steps) ---------------
async def _two_steps(async_redis: AsyncRedis, last_seen: JobRecord, tokens: tuple[str, str] = ("t-1", "t-2")):
    from gql_service.worker.job_ends import two_steps

    validating, done = set_stage(JobStage.VALIDATING), set_stage(JobStage.DONE, JobStatus.FINISHED)
    return await two_steps(async_redis, "j1", validating, done, last_seen, ttl_s=TTL, outbox_max_len=100,
                           tokens=tokens)  # fmt: skip


async def test_two_steps_are_both_written_and_published_in_order(sync_redis: Redis, async_redis: AsyncRedis) -> None:
    record = create(sync_redis)
    pubsub = sync_redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.job_events("j1"))
    assert pubsub.get_message(timeout=1) is None
    one, two = await _two_steps(async_redis, record)
    assert one.changed and one.record is not None and (one.record.stage, one.record.version) == (JobStage.VALIDATING, 2)
    assert two.changed and two.record is not None and (two.record.stage, two.record.version) == (JobStage.DONE, 3)
    published = [store.decode(m["data"]) for m in (pubsub.get_message(timeout=2), pubsub.get_message(timeout=2)) if m]
    assert published == [one.record, two.record]
    assert store.get_job_sync(sync_redis, "j1") == two.record
    again = await _two_steps(async_redis, record)  # a retry of both (a lost reply): nothing applied twice
    assert store.get_job_sync(sync_redis, "j1") == two.record and again[1].record == two.record
    pubsub.close()


async def test_a_write_in_between_is_never_overwritten_by_the_second_step(
    sync_redis: Redis, async_redis: AsyncRedis
) -> None:
    """Canceled (version 2) after the worker last saw version 1: the first step is refused, and
    so is the second, though it expects version 2: the record's last write is not the first's."""
    record = create(sync_redis)
    canceled, _ = await store.update_job(async_redis, "j1", set_stage(JobStage.CANCELED, JobStatus.CANCELED), ttl_s=TTL)
    one, two = await _two_steps(async_redis, record)
    assert not one.changed and not two.changed
    assert store.get_job_sync(sync_redis, "j1") == canceled
