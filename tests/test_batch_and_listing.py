"""submitTexts, jobsUpdates and the jobs listing, through the schema with real Redis."""

from __future__ import annotations

import asyncio
import base64
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from redis import Redis

from gql_service import store
from gql_service.api.schema import Context, schema
from gql_service.models import JobRecord, JobStage, JobStatus

from .test_schema import RUN, codes, drive, run

BATCH = """
mutation($inputs: [SubmitTextInput!]!) {
  submitTexts(inputs: $inputs) { deduplicated job { id status version } }
}"""
LIST = """
query($first: Int!, $after: String, $status: JobStatus) {
  jobs(first: $first, after: $after, status: $status) {
    edges { cursor node { id status } }
    pageInfo { hasNextPage endCursor }
  }
}"""
MANY = "subscription($ids: [ID!]!) { jobsUpdates(ids: $ids) { id version status } }"


async def test_batch_submits_good_items_and_reports_bad_ones_by_index(context: Context, sync_redis: Redis) -> None:
    inputs = [{"text": "first"}, {"text": "   "}, {"text": "third"}, {"text": "x" * 1001}]
    result = await run(context, BATCH, inputs=inputs)
    answers = result.data["submitTexts"]
    assert [a is None for a in answers] == [False, True, False, True]
    assert sorted((e.path, e.extensions["index"], e.extensions["code"]) for e in result.errors) == [
        (["submitTexts", 1], 1, "BAD_USER_INPUT"),
        (["submitTexts", 3], 3, "BAD_USER_INPUT"),
    ]
    assert sync_redis.llen("rq:queue:llm") == 2
    assert all(a["job"]["status"] == "QUEUED" for a in answers if a)


async def test_batch_deduplicates_within_and_across_calls(context: Context, sync_redis: Redis) -> None:
    inputs = [{"text": "a", "idempotencyKey": "k1"}, {"text": "a", "idempotencyKey": "k1"}, {"text": "b"}]
    first = (await run(context, BATCH, inputs=inputs)).data["submitTexts"]
    assert first[0]["job"]["id"] == first[1]["job"]["id"]
    assert [a["deduplicated"] for a in first] == [False, True, False]
    again = (await run(context, BATCH, inputs=inputs[:1])).data["submitTexts"]
    assert again[0] == {**first[0], "deduplicated": True}
    assert sync_redis.llen("rq:queue:llm") == 2


async def test_batch_is_bounded(context: Context) -> None:
    result = await run(context, BATCH, inputs=[{"text": "t"}] * 101)
    assert codes(result) == ["BAD_USER_INPUT"]


async def test_jobs_are_listed_newest_first_in_pages(context: Context) -> None:
    ids = []
    for i in range(7):
        ids.append((await run(context, BATCH, inputs=[{"text": f"job {i}"}])).data["submitTexts"][0]["job"]["id"])
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        page = (await run(context, LIST, first=3, after=after)).data["jobs"]
        seen += [e["node"]["id"] for e in page["edges"]]
        pages += 1
        if not page["pageInfo"]["hasNextPage"]:
            break
        after = page["pageInfo"]["endCursor"]
    assert seen == list(reversed(ids)) and pages == 3


async def test_listing_filters_by_status_and_stays_in_the_tenant(context: Context, redis_url: str) -> None:
    ids = [
        (await run(context, BATCH, inputs=[{"text": f"job {i}"}])).data["submitTexts"][0]["job"]["id"] for i in range(4)
    ]
    drive(redis_url, ids[1], [(JobStatus.FINISHED, JobStage.DONE)]).join()
    done = (await run(context, LIST, first=10, status="FINISHED")).data["jobs"]["edges"]
    assert [e["node"]["id"] for e in done] == [ids[1]]
    other = Context(jobs=context.jobs, tenant="someone-else")
    assert (await run(other, LIST, first=10)).data["jobs"]["edges"] == []


async def test_bad_page_arguments_are_bad_user_input(context: Context) -> None:
    assert codes(await run(context, LIST, first=0)) == ["BAD_USER_INPUT"]
    assert codes(await run(context, LIST, first=101)) == ["BAD_USER_INPUT"]
    assert codes(await run(context, LIST, first=5, after="not-a-cursor!")) == ["BAD_USER_INPUT"]


async def test_jobs_updates_streams_many_jobs_and_ends_when_all_have_ended(context: Context, redis_url: str) -> None:
    ids = [
        a["job"]["id"] for a in (await run(context, BATCH, inputs=[{"text": "a"}, {"text": "b"}])).data["submitTexts"]
    ]
    stream = await schema.subscribe(MANY, variable_values={"ids": ids}, context_value=context)
    events: list[dict[str, Any]] = []
    go = threading.Event()
    workers: list[threading.Thread] = []
    async with asyncio.timeout(10):
        async for result in stream:
            assert result.errors is None, result.errors
            events.append(result.data["jobsUpdates"])
            if len(events) == 2:  # both snapshots are in: let the work begin
                workers = [drive(redis_url, j, RUN, started=go) for j in ids]
                go.set()
    for w in workers:
        w.join()
    for job_id in ids:
        versions = [e["version"] for e in events if e["id"] == job_id]
        assert versions[0] == 1 and versions == sorted(set(versions)) and versions[-1] == 6
        assert [e for e in events if e["id"] == job_id][-1]["status"] == "FINISHED"
    assert events[-1]["status"] == "FINISHED"  # the stream ended with the last job's end


async def test_jobs_updates_with_an_unknown_id_is_not_found(context: Context) -> None:
    known = (await run(context, BATCH, inputs=[{"text": "a"}])).data["submitTexts"][0]["job"]["id"]
    stream = await schema.subscribe(MANY, variable_values={"ids": [known, "nope"]}, context_value=context)
    errors = []
    async with asyncio.timeout(10):
        async for result in stream:
            if result.errors:
                errors += result.errors
    assert [e.extensions["code"] for e in errors] == ["NOT_FOUND"]


async def test_a_status_filter_never_hides_older_matches(context: Context, sync_redis: Redis) -> None:
    """One FAILED job older than 1,000 FINISHED ones: paging with the filter reaches it."""
    base = datetime(2026, 1, 1, tzinfo=UTC)
    with sync_redis.pipeline(transaction=False) as pipe:
        for n in range(1001):
            status = JobStatus.FAILED if n == 0 else JobStatus.FINISHED
            record = JobRecord(id=f"job{n:04d}", status=status, created_at=base + timedelta(seconds=n))
            store.create_job(pipe, record, text="t", ttl_s=3600)
            store.index_job(pipe, record, ttl_s=3600)
        pipe.execute()
    found, after, pages = [], None, 0
    while True:
        pages += 1
        page = (await run(context, LIST, first=5, after=after, status="FAILED")).data["jobs"]
        found += [e["node"]["id"] for e in page["edges"]]
        if not page["pageInfo"]["hasNextPage"]:
            break
        after = page["pageInfo"]["endCursor"]
    assert found == ["job0000"]
    assert pages <= 2  # a page looks at up to 1,000 jobs, then says where to go on


async def test_a_cursor_that_is_not_a_number_is_bad_user_input(context: Context) -> None:
    for position in ("nan|x", "inf|x", "-inf|x", "1.5|", "abc"):
        cursor = base64.urlsafe_b64encode(position.encode()).decode()
        result = await run(context, LIST, first=5, after=cursor)
        assert codes(result) == ["BAD_USER_INPUT"], position


async def test_a_null_first_is_the_default_page_as_relay_may_send_it(context: Context) -> None:
    """Connection arguments are nullable (`first: Int = 20`): a client that passes its
    count variable as null gets the default page, as if it had left the argument out (with
    `first: Int!` it was an error)."""
    await run(context, BATCH, inputs=[{"text": f"text {n}"} for n in range(22)])
    query = "query($n: Int) { jobs(first: $n) { edges { cursor } pageInfo { hasNextPage } } }"
    page = await run(context, query, n=None)
    assert page.errors is None, page.errors
    assert len(page.data["jobs"]["edges"]) == 20 and page.data["jobs"]["pageInfo"]["hasNextPage"]
    batches = await run(context, "query($n: Int) { batches(first: $n) { edges { cursor } } }", n=None)
    assert batches.errors is None and batches.data == {"batches": {"edges": []}}
