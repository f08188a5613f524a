"""Batches: the contract through `schema.execute` against a real Redis, then batchUpdates
and cancelBatch against a live service with real workers (counts always adding up, the end
exactly once, nothing left running after a cancel)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from gql import Client, GraphQLRequest, gql
from gql.transport.websockets import WebsocketsTransport
from redis import Redis

from gql_service import keys, store
from gql_service.api.schema import Context, schema
from gql_service.models import JobRecord, JobStage, JobStatus, utcnow

from .clients import post
from .openai_stub import OpenAIStub
from .service import Service, wait_until

COUNTS = "counts { total queued running finished failed canceled }"
CREATE = (
    'mutation($name: String!, $key: String) { createBatch(input: {name: $name, metadata: {team: "support"}, '
    "idempotencyKey: $key}) { id status metadata counts { total queued } } }"
)
ADD = (
    "mutation($inputs: [SubmitTextInput!]!, $batch: ID) "
    "{ submitTexts(inputs: $inputs, batchId: $batch) { deduplicated job { id } } }"
)
BATCH = "query($id: ID!) { batch(id: $id) { id status version %s usage { totalTokens } } }" % COUNTS
UPDATES = "subscription($id: ID!) { batchUpdates(id: $id) { status version %s } }" % COUNTS
CLOSE = "mutation($id: ID!) { closeBatch(id: $id) { status } }"


async def run(context: Context, query: str, **variables: Any) -> Any:
    result = await schema.execute(query, variable_values=variables, context_value=context)
    return result


def inputs(n: int, prefix: str = "t") -> list[dict[str, str]]:
    return [{"text": f"Review {prefix}{i}: great food.", "idempotencyKey": f"{prefix}{i}"} for i in range(n)]


async def test_a_batch_counts_what_is_added_and_refuses_more_once_closed(context: Context, sync_redis: Redis) -> None:
    made = await run(context, CREATE, name="nightly")
    batch = made.data["createBatch"]
    assert (batch["status"], batch["metadata"]) == ("OPEN", {"team": "support"})
    assert batch["counts"] == {"total": 0, "queued": 0}
    assert batch["id"].startswith(keys.BATCH_ID_PREFIX)
    for chunk in range(3):
        added = await run(context, ADD, inputs=inputs(100, f"c{chunk}-"), batch=batch["id"])
        assert added.errors is None and len(added.data["submitTexts"]) == 100
    counts = (await run(context, BATCH, id=batch["id"])).data["batch"]["counts"]
    assert (counts["total"], counts["queued"]) == (300, 300)
    assert sync_redis.zcard(keys.batch_jobs(batch["id"])) == 300
    closed = await run(context, CLOSE, id=batch["id"])
    assert closed.data["closeBatch"]["status"] == "RUNNING"
    refused = await run(context, ADD, inputs=inputs(1, "late"), batch=batch["id"])
    assert refused.errors[0].extensions["code"] == "BAD_USER_INPUT" and "closed" in refused.errors[0].message
    # Repeats of jobs it has are answered even so (a resumed upload of a closed batch).
    again = await run(context, ADD, inputs=inputs(100, "c0-"), batch=batch["id"])
    assert again.errors is None and all(p["deduplicated"] for p in again.data["submitTexts"])
    assert (await run(context, BATCH, id=batch["id"])).data["batch"]["counts"]["total"] == 300


async def test_the_same_key_gives_back_the_same_batch_and_tenants_own_theirs(context: Context) -> None:
    first = (await run(context, CREATE, name="upload", key="file-digest")).data["createBatch"]
    second = (await run(context, CREATE, name="upload", key="file-digest")).data["createBatch"]
    assert first["id"] == second["id"]
    renamed = await run(context, CREATE, name="another upload", key="file-digest")
    assert renamed.errors[0].extensions["code"] == "IDEMPOTENCY_KEY_REUSED"
    other = Context(jobs=context.jobs, tenant="globex")
    assert (await run(other, BATCH, id=first["id"])).data["batch"] is None
    added = await run(other, ADD, inputs=inputs(1), batch=first["id"])
    assert added.errors[0].extensions["code"] == "NOT_FOUND"
    listed = await run(context, "{ batches(first: 10) { edges { node { id } } pageInfo { hasNextPage } } }")
    assert [e["node"]["id"] for e in listed.data["batches"]["edges"]] == [first["id"]]
    assert (await run(other, "{ batches { edges { node { id } } } }")).data["batches"]["edges"] == []
    node = await run(context, "query($id: ID!) { node(id: $id) { id ... on Batch { name } } }", id=first["id"])
    assert node.data["node"] == {"id": first["id"], "name": "upload"}


async def test_ended_jobs_pages_on_past_a_job_whose_record_is_gone(context: Context, sync_redis: Redis) -> None:
    # Each edge's cursor is its own position in the ended list, whatever was left out before
    # it; the CLI reads on until hasNextPage is false, not until it has `total` jobs.
    batch_id = (await run(context, CREATE, name="gaps")).data["createBatch"]["id"]
    added = (await run(context, ADD, inputs=inputs(3, "gap"), batch=batch_id)).data["submitTexts"]
    await run(context, CLOSE, id=batch_id)
    ids = [p["job"]["id"] for p in added]

    def finished(job: JobRecord) -> JobRecord:
        return job.model_copy(update={"status": JobStatus.FINISHED, "stage": JobStage.DONE, "finished_at": utcnow()})

    for job_id in ids:
        await store.update_job(context.jobs.redis, job_id, finished, ttl_s=60)
    sync_redis.delete(keys.job(ids[1]))  # expired, and no history to find it in
    query = (
        "query($id: ID!) { batch(id: $id) { status endedJobs(first: 10) "
        "{ edges { cursor node { id } } pageInfo { endCursor hasNextPage } } } }"
    )
    batch = (await run(context, query, id=batch_id)).data["batch"]
    page = batch["endedJobs"]
    assert batch["status"] == "COMPLETED" and [e["node"]["id"] for e in page["edges"]] == [ids[0], ids[2]]
    assert page["edges"][-1]["cursor"] == page["pageInfo"]["endCursor"] and not page["pageInfo"]["hasNextPage"]


async def test_concurrent_creations_with_one_key_make_one_batch(context: Context, sync_redis: Redis) -> None:
    made = await asyncio.gather(*(run(context, CREATE, name="upload", key="same-file") for _ in range(10)))
    ids = {m.data["createBatch"]["id"] for m in made}
    assert len(ids) == 1, ids
    assert sync_redis.zrange(keys.tenant_batches("public"), 0, -1) == [ids.pop().encode()]


async def test_bad_batch_input_is_refused(context: Context) -> None:
    for name, metadata in (("", None), ("x" * 201, None), ("ok", "not an object"), ("ok", {"big": "x" * 5000})):
        made = await run(
            context, "mutation($name: String!, $m: JSON) { createBatch(input: {name: $name, metadata: $m}) { id } }",
            name=name, m=metadata,
        )  # fmt: skip
        assert made.errors[0].extensions["code"] == "BAD_USER_INPUT", (name, made.errors)
    cursor = await run(context, '{ batches(after: "nope") { edges { cursor } } }')
    assert cursor.errors[0].extensions["code"] == "BAD_USER_INPUT"


# -- live ---------------------------------------------------------------------------------------
async def _frames(svc: Service, batch_id: str) -> list[tuple[float, dict[str, Any]]]:
    transport = WebsocketsTransport(url=svc.ws_url, subprotocols=[WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL])
    frames = []
    async with asyncio.timeout(120), Client(transport=transport) as session:
        async for data in session.subscribe(GraphQLRequest(gql(UPDATES), variable_values={"id": batch_id})):
            frames.append((time.monotonic(), data["batchUpdates"]))
    return frames


def _adds_up(frame: dict[str, Any]) -> bool:
    c = frame["counts"]
    return c["queued"] + c["running"] + c["finished"] + c["failed"] + c["canceled"] == c["total"]


@pytest.mark.timeout(180)
def test_batch_updates_add_up_at_every_frame_and_end_completed(e2e_redis: str) -> None:
    env = {"RQ_QUEUE": "llm-batches", "WORKER_CONCURRENCY": "32", "OFFLINE_STREAM_DELAY_MS": "2"}
    with Service(e2e_redis, workers=1, env=env) as svc:
        batch_id = post(svc, CREATE, name="live").json()["data"]["createBatch"]["id"]
        for chunk in range(4):
            assert "errors" not in post(svc, ADD, inputs=inputs(100, f"l{chunk}-"), batch=batch_id).json()
        watcher = asyncio.run(_watch_while(svc, batch_id, lambda: post(svc, CLOSE, id=batch_id)))
    frames = [f for _, f in watcher]
    assert all(_adds_up(f) for f in frames), [f["counts"] for f in frames if not _adds_up(f)]
    last = frames[-1]
    assert last["status"] == "COMPLETED" and last["counts"]["finished"] == 400 == last["counts"]["total"]
    assert [f["version"] for f in frames] == sorted({f["version"] for f in frames})  # newer each time
    span = watcher[-1][0] - watcher[0][0]
    assert len(frames) <= span * 4 + 3, (len(frames), span)  # coalesced: at most four a second


async def _watch_while(svc: Service, batch_id: str, then: Any) -> list[tuple[float, dict[str, Any]]]:
    task = asyncio.create_task(_frames(svc, batch_id))
    await asyncio.sleep(0.5)  # the subscription opens meanwhile; it reads the batch first anyway
    await asyncio.to_thread(then)
    return await task


@pytest.mark.timeout(180)
def test_cancel_batch_halfway_leaves_no_job_running(e2e_redis: str, stub: OpenAIStub) -> None:
    stub.latency_s = 0.5
    env = {"RQ_QUEUE": "llm-batch-cancel", **stub.env, "WORKER_CONCURRENCY": "8"}
    with Service(e2e_redis, workers=1, env=env) as svc:
        batch_id = post(svc, CREATE, name="to cancel").json()["data"]["createBatch"]["id"]
        for chunk in range(2):
            assert "errors" not in post(svc, ADD, inputs=inputs(100, f"x{chunk}-"), batch=batch_id).json()
        post(svc, CLOSE, id=batch_id)

        def counts() -> dict[str, int]:
            return dict(post(svc, BATCH, id=batch_id).json()["data"]["batch"]["counts"])

        wait_until(lambda: counts()["finished"] >= 16, timeout_s=60, what="some jobs to finish")
        redis = Redis.from_url(e2e_redis)
        counted_before = int(redis.hget(keys.metrics("jobs"), "CANCELED|CANCELED") or 0)
        canceled = post(svc, "mutation($id: ID!) { cancelBatch(id: $id) { status } }", id=batch_id).json()
        assert canceled["data"]["cancelBatch"]["status"] == "CANCELED", canceled
        calls_at_cancel = len(stub.requests)
        frames = asyncio.run(_frames(svc, batch_id))  # ends once every job has ended
        final = post(svc, BATCH, id=batch_id).json()["data"]["batch"]
        time.sleep(1.0)  # any job still running would call the LLM again within this
        calls_after = len(stub.requests)
        counted = int(redis.hget(keys.metrics("jobs"), "CANCELED|CANCELED") or 0) - counted_before
        ids = [j.decode() for j in redis.zrange(keys.batch_jobs(batch_id), 0, -1)]
        statuses = {store.decode(redis.hget(keys.job(j), "d")).status.value for j in ids}  # type: ignore[arg-type]
        redis.close()
    stub.latency_s = 0.0
    c = final["counts"]
    assert final["status"] == "CANCELED" and frames[-1][1]["status"] == "CANCELED"
    assert c["queued"] == c["running"] == 0 and c["finished"] + c["failed"] + c["canceled"] == c["total"] == 200
    assert c["canceled"] > 100 and c["finished"] >= 16
    assert counted == c["canceled"]  # in /metrics' gqls_jobs_finished too
    assert statuses <= {"FINISHED", "FAILED", "CANCELED"}, statuses  # every job has ended
    # The jobs running at the cancel were stopped: at most those few calls were still open.
    assert calls_after - calls_at_cancel <= 8


async def test_a_key_reused_in_another_batch_is_that_items_error_and_adds_nothing(context: Context) -> None:
    """The same idempotency key in a second batch once returned the first batch's job and
    left the second batch at total 0; now it is refused at that item, the others are added."""
    first = (await run(context, CREATE, name="first")).data["createBatch"]["id"]
    second = (await run(context, CREATE, name="second")).data["createBatch"]["id"]
    assert (await run(context, ADD, inputs=inputs(2, "k"), batch=first)).errors is None
    added = await run(
        context, ADD, inputs=[*inputs(1, "k"), {"text": "fresh", "idempotencyKey": "fresh"}], batch=second
    )
    assert [e.extensions["code"] for e in added.errors] == ["IDEMPOTENCY_KEY_REUSED"]
    assert added.errors[0].path == ["submitTexts", 0] and added.errors[0].message.startswith("inputs[0]: ")
    assert added.data["submitTexts"][0] is None and added.data["submitTexts"][1]["deduplicated"] is False
    counts = [(await run(context, BATCH, id=b)).data["batch"]["counts"]["total"] for b in (first, second)]
    assert counts == [2, 1]
