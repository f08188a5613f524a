"""The schema through `schema.execute` / `schema.subscribe`, with a real Redis behind it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import pytest
from redis import Redis

from gql_service import keys, store
from gql_service.api.schema import Context, schema
from gql_service.models import JobStage, JobStatus

from . import records

SUBMIT = """
mutation Submit($text: String!, $key: String) {
  submitText(input: {text: $text, idempotencyKey: $key}) {
    deduplicated
    job { id status stage version attempts requestId createdAt result { summary } }
  }
}"""
JOB = "query Job($id: ID!) { job(id: $id) { id status stage version } }"
UPDATES = (
    "subscription Updates($id: ID!) { jobUpdates(id: $id) { id status stage version result { summary sentiment } } }"
)


async def run(context: Context, query: str, **variables: Any) -> Any:
    return await schema.execute(query, variable_values=variables, context_value=context)


def codes(result: Any) -> list[str | None]:
    return [e.extensions.get("code") if e.extensions else None for e in result.errors or []]


async def submit(
    context: Context, text: str = "I loved the clinic. Dr. Rao was kind.", key: str | None = None
) -> dict[str, Any]:
    result = await run(context, SUBMIT, text=text, key=key)
    assert result.errors is None, result.errors
    return result.data["submitText"]


async def test_submit_creates_a_queued_job_version_1_and_enqueues_it(context: Context, sync_redis: Redis) -> None:
    payload = await submit(context)
    job = payload["job"]
    assert payload["deduplicated"] is False
    assert (job["status"], job["stage"], job["version"], job["attempts"]) == ("QUEUED", "QUEUED", 1, 0)
    assert job["requestId"] == "test-request" and job["result"] is None
    assert sync_redis.lrange("rq:queue:llm", 0, -1) == [job["id"].encode()]
    assert sync_redis.hget(keys.job(job["id"]), "t") == b"I loved the clinic. Dr. Rao was kind."
    result = await run(context, JOB, id=job["id"])
    assert result.data["job"] == {"id": job["id"], "status": "QUEUED", "stage": "QUEUED", "version": 1}


async def test_unknown_job_is_null(context: Context) -> None:
    result = await run(context, JOB, id="does-not-exist")
    assert result.errors is None and result.data == {"job": None}


async def test_idempotency_key_returns_the_same_job(context: Context, sync_redis: Redis) -> None:
    first = await submit(context, key="order-42")
    again = await submit(context, key="order-42")
    assert again["deduplicated"] is True and again["job"]["id"] == first["job"]["id"]
    other = await submit(context, key="order-43")
    assert other["job"]["id"] != first["job"]["id"]
    assert sync_redis.llen("rq:queue:llm") == 2


async def test_concurrent_duplicates_create_exactly_one_job(context: Context, sync_redis: Redis) -> None:
    payloads = await asyncio.gather(*(submit(context, key="same") for _ in range(20)))
    assert len({p["job"]["id"] for p in payloads}) == 1
    assert sum(not p["deduplicated"] for p in payloads) == 1
    assert sync_redis.llen("rq:queue:llm") == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "must not be empty"),
        ("   \n\t ", "must not be empty"),
        ("x" * 1001, "limit is 1000"),
        # The history's PostgreSQL can't store NUL: refused here rather than lost there.
        ("a text with a \x00 inside", "must not contain NUL"),
    ],
)
async def test_bad_text_is_bad_user_input_and_creates_nothing(
    context: Context, sync_redis: Redis, text: str, message: str
) -> None:
    result = await run(context, SUBMIT, text=text)
    assert codes(result) == ["BAD_USER_INPUT"]
    assert message in result.errors[0].message
    assert sync_redis.dbsize() == 0


async def test_text_at_the_limit_is_accepted(context: Context) -> None:
    assert (await submit(context, text="x" * 1000))["job"]["status"] == "QUEUED"


async def test_oversized_idempotency_key_is_rejected(context: Context) -> None:
    result = await run(context, SUBMIT, text="fine", key="k" * 201)
    assert codes(result) == ["BAD_USER_INPUT"]


@pytest.mark.parametrize(
    ("variables", "fragment"), [({"text": 123}, "String cannot represent"), ({}, "to be provided")]
)
async def test_wrong_variable_types_are_rejected_before_execution(
    context: Context, sync_redis: Redis, variables: dict[str, Any], fragment: str
) -> None:
    result = await schema.execute(SUBMIT, variable_values=variables, context_value=context)
    assert result.data is None and fragment in result.errors[0].message
    assert sync_redis.dbsize() == 0


async def test_hostile_queries_are_refused(context: Context) -> None:
    deep = 'query { job(id: "x") { result { entities { type } } } }'
    assert (await run(context, deep)).errors is None
    aliases = "query { " + " ".join(f'a{i}: job(id: "x") {{ id }}' for i in range(31)) + " }"
    result = await run(context, aliases)
    assert result.errors and "aliases" in result.errors[0].message.lower()
    many_tokens = "query { " + " ".join(f"a{i}: __typename" for i in range(1200)) + " }"
    result = await run(context, many_tokens)
    assert result.errors and "token" in result.errors[0].message.lower()


def drive(
    redis_url: str, job_id: str, stages: list[tuple[JobStatus, JobStage]], started: threading.Event | None = None
) -> threading.Thread:
    """Stand-in worker: the same store transitions a real worker makes, from another thread."""

    def work() -> None:
        client = Redis.from_url(redis_url)
        if started is not None:
            started.wait(5)
        for status, stage in stages:
            change = {"status": status, "stage": stage}
            records.update_job(client, job_id, lambda j, change=change: j.model_copy(update=change), ttl_s=60)
        client.close()

    thread = threading.Thread(target=work)
    thread.start()
    return thread


RUN = [
    (JobStatus.STARTED, JobStage.CALLING_LLM),
    (JobStatus.STARTED, JobStage.VALIDATING),
    (JobStatus.STARTED, JobStage.REPAIRING),
    (JobStatus.STARTED, JobStage.VALIDATING),
    (JobStatus.FINISHED, JobStage.DONE),
]


async def collect(context: Context, job_id: str, on_first: Any = None) -> tuple[list[dict[str, Any]], list[Any]]:
    events, errors = [], []
    stream = await schema.subscribe(UPDATES, variable_values={"id": job_id}, context_value=context)
    async with asyncio.timeout(10):
        async for result in stream:
            if result.errors:
                errors.extend(result.errors)
            else:
                events.append(result.data["jobUpdates"])
                if on_first is not None and len(events) == 1:
                    on_first()
    return events, errors


async def test_subscribing_before_the_work_starts_sees_every_version_in_order(context: Context, redis_url: str) -> None:
    job_id = (await submit(context))["job"]["id"]
    go = threading.Event()
    worker = drive(redis_url, job_id, RUN, started=go)
    events, errors = await collect(context, job_id, on_first=go.set)
    worker.join()
    assert errors == []
    versions = [e["version"] for e in events]
    assert versions[0] == 1 and versions[-1] == 6
    assert versions == sorted(set(versions))  # strictly increasing, no repeats
    assert events[-1]["status"] == "FINISHED" and events[-1]["stage"] == "DONE"


async def test_subscribing_after_the_end_gets_exactly_the_final_state(context: Context, redis_url: str) -> None:
    job_id = (await submit(context))["job"]["id"]
    drive(redis_url, job_id, RUN).join()
    events, errors = await collect(context, job_id)
    assert errors == []
    assert [(e["version"], e["stage"]) for e in events] == [(6, "DONE")]


async def test_racing_subscribers_never_miss_the_terminal_state(context: Context, redis_url: str) -> None:
    job_ids = [(await submit(context))["job"]["id"] for _ in range(10)]
    workers = [drive(redis_url, j, RUN) for j in job_ids]  # racing the subscriptions on purpose
    results = await asyncio.gather(*(collect(context, j) for j in job_ids))
    for w in workers:
        w.join()
    for events, errors in results:
        assert errors == []
        versions = [e["version"] for e in events]
        assert versions == sorted(set(versions)) and events[-1]["stage"] == "DONE" and versions[-1] == 6


async def test_nothing_is_published_to_subscribers_after_the_terminal_event(
    context: Context, sync_redis: Redis, redis_url: str
) -> None:
    job_id = (await submit(context))["job"]["id"]
    drive(redis_url, job_id, [(JobStatus.CANCELED, JobStage.CANCELED), *RUN]).join()
    record = store.get_job_sync(sync_redis, job_id)
    assert record is not None and record.status is JobStatus.CANCELED and record.version == 2
    events, _ = await collect(context, job_id)
    assert [e["status"] for e in events] == ["CANCELED"]


async def test_unknown_job_subscription_ends_with_not_found(context: Context) -> None:
    events, errors = await collect(context, "no-such-job")
    assert events == []
    assert [e.extensions["code"] for e in errors] == ["NOT_FOUND"]


async def test_subscription_leaves_no_channel_behind(context: Context, async_redis: Any) -> None:
    job_id = (await submit(context))["job"]["id"]
    stream = await schema.subscribe(UPDATES, variable_values={"id": job_id}, context_value=context)
    first_seen = asyncio.Event()

    async def consume() -> None:
        async for _ in stream:
            first_seen.set()

    # The websocket transports run each subscription in a task and cancel it when the
    # client completes or goes away; do the same.
    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_seen.wait(), 5)
    assert context.jobs.broadcast.subscriber_count == 1
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert context.jobs.broadcast.subscriber_count == 0
    async with context.jobs.broadcast.subscribe("barrier"):
        pass  # Redis has processed the UNSUBSCRIBE once this returns
    assert dict(await async_redis.pubsub_numsub(f"gqls:job:{job_id}:events")) == {
        f"gqls:job:{job_id}:events".encode(): 0
    }


@pytest.mark.parametrize(
    "field", ["jobUpdates(id: $id)", "jobsUpdates(ids: [$id])", "jobUpdates(id: $id, partial: true)"]
)
async def test_a_subscription_closed_between_two_frames_lets_go_at_once(context: Context, field: str) -> None:
    """The transports close a subscription's stream (aclose) when the client completes while
    a frame is being sent, the resolver paused at its `yield`: the generators it reads from
    must close with it, not whenever the garbage collector finds them (a subscription was
    once still counted 10 s after a socket's 2,000 rapid subscribe/complete pairs)."""
    job_id = (await submit(context))["job"]["id"]
    query = "subscription Updates($id: ID!) { %s { id version } }" % field
    stream = await schema.subscribe(query, variable_values={"id": job_id}, context_value=context)
    first = await asyncio.wait_for(stream.__anext__(), 5)
    assert not first.errors and context.jobs.broadcast.subscriber_count > 0
    await stream.aclose()  # type: ignore[union-attr]
    assert context.jobs.broadcast.subscriber_count == 0
    assert context.jobs.slots.watched[context.tenant] == 0


async def test_an_idempotency_key_reused_for_another_text_is_refused_and_queues_nothing(
    context: Context, sync_redis: Redis
) -> None:
    first = await submit(context, text="The first text.", key="order-7")
    reused = await run(context, SUBMIT, text="A different text.", key="order-7")
    assert codes(reused) == ["IDEMPOTENCY_KEY_REUSED"] and reused.data is None
    assert "different request" in reused.errors[0].message
    same = await submit(context, text="The first text.", key="order-7")
    assert same["deduplicated"] is True and same["job"]["id"] == first["job"]["id"]
    assert sync_redis.llen("rq:queue:llm") == 1


async def test_a_key_written_before_fingerprints_still_deduplicates(context: Context, sync_redis: Redis) -> None:
    """Keys stored by the previous version hold the job id alone: a repeat is answered as before."""
    first = await submit(context, text="Older text.", key="legacy")
    idem = keys.idempotency("public", "legacy")
    sync_redis.set(idem, first["job"]["id"])
    again = await submit(context, text="Any text at all.", key="legacy")
    assert again["deduplicated"] is True and again["job"]["id"] == first["job"]["id"]
