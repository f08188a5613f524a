"""Priorities at the API and in the workers' order: each priority's jobs go on its own RQ
queue, a batch's jobs have the batch's, an idempotency key stands for its priority too, and
the order a worker looks at the queues in keeps a share of its takes for NORMAL and LOW.
Against a real Redis, through the schema (tests/test_priorities_workers.py runs workers)."""

from __future__ import annotations

from typing import Any

from redis import Redis

from gql_service import keys
from gql_service.api.jobs import fingerprint
from gql_service.api.schema import Context, schema
from gql_service.models import JobPriority
from gql_service.worker import priorities

SUBMIT = """mutation($text: String!, $key: String, $priority: JobPriority! = NORMAL) {
  submitText(input: {text: $text, idempotencyKey: $key, priority: $priority}) { job { id priority } deduplicated }
}"""
SUBMIT_MANY = """mutation($inputs: [SubmitTextInput!]!, $batch: ID) {
  submitTexts(inputs: $inputs, batchId: $batch) { job { id priority } }
}"""
CREATE_BATCH = """mutation($key: String, $priority: JobPriority! = NORMAL) {
  createBatch(input: {name: "nightly", idempotencyKey: $key, priority: $priority}) { id priority }
}"""


async def run(context: Context, query: str, **variables: Any) -> Any:
    return await schema.execute(query, variable_values=variables, context_value=context)


def codes(result: Any) -> list[str | None]:
    return [e.extensions.get("code") if e.extensions else None for e in result.errors or []]


def queued(redis: Redis, priority: str) -> list[str]:
    return [i.decode() for i in redis.lrange(f"rq:queue:{keys.llm_queue('llm', priority)}", 0, -1)]


async def test_each_priority_goes_on_its_own_queue(context: Context, sync_redis: Redis) -> None:
    ids = {}
    for priority in ("HIGH", "NORMAL", "LOW"):
        result = await run(context, SUBMIT, text=f"A {priority} text.", priority=priority)
        assert result.errors is None, result.errors
        assert result.data["submitText"]["job"]["priority"] == priority
        ids[priority] = result.data["submitText"]["job"]["id"]
    default = await run(context, 'mutation { submitText(input: {text: "no priority"}) { job { id priority } } }')
    assert default.data["submitText"]["job"]["priority"] == "NORMAL"
    assert queued(sync_redis, "HIGH") == [ids["HIGH"]]
    assert queued(sync_redis, "NORMAL") == [ids["NORMAL"], default.data["submitText"]["job"]["id"]]
    assert queued(sync_redis, "LOW") == [ids["LOW"]]
    assert keys.llm_queues("llm") == ["llm-high", "llm", "llm-low"]


async def test_a_key_reused_with_another_priority_is_refused(context: Context, sync_redis: Redis) -> None:
    first = await run(context, SUBMIT, text="Same text.", key="k-1", priority="LOW")
    other = await run(context, SUBMIT, text="Same text.", key="k-1", priority="HIGH")
    assert codes(other) == ["IDEMPOTENCY_KEY_REUSED"] and "priority" in other.errors[0].message
    again = await run(context, SUBMIT, text="Same text.", key="k-1", priority="LOW")
    assert again.data["submitText"] == {"job": first.data["submitText"]["job"], "deduplicated": True}
    assert queued(sync_redis, "HIGH") == [] and len(queued(sync_redis, "LOW")) == 1


async def test_a_normal_key_written_before_priorities_still_matches(context: Context) -> None:
    """NORMAL adds nothing to the fingerprint: a key stored by the previous version (same
    text, webhook and batch) answers a NORMAL repeat, and refuses a HIGH one."""
    first = await run(context, SUBMIT, text="Older text.", key="k-2")
    assert (await run(context, SUBMIT, text="Older text.", key="k-2")).data["submitText"]["deduplicated"]
    assert fingerprint("t", None, None) == fingerprint("t", None, None, JobPriority.NORMAL)
    assert fingerprint("t", None, None) != fingerprint("t", None, None, JobPriority.HIGH)
    assert first.errors is None


async def test_a_batch_s_jobs_have_its_priority(context: Context, sync_redis: Redis) -> None:
    batch = (await run(context, CREATE_BATCH, priority="LOW")).data["createBatch"]
    assert batch["priority"] == "LOW"
    inputs = [{"text": "one"}, {"text": "two", "priority": "LOW"}, {"text": "three", "priority": "HIGH"}]
    result = await run(context, SUBMIT_MANY, inputs=inputs, batch=batch["id"])
    jobs = result.data["submitTexts"]
    assert [j["job"]["priority"] for j in jobs[:2]] == ["LOW", "LOW"] and jobs[2] is None
    assert codes(result) == ["BAD_USER_INPUT"] and "batch's jobs have its priority, LOW" in result.errors[0].message
    assert queued(sync_redis, "LOW") == [j["job"]["id"] for j in jobs[:2]] and queued(sync_redis, "NORMAL") == []
    read = await run(context, "query($id: ID!) { batch(id: $id) { priority } }", id=batch["id"])
    assert read.data["batch"]["priority"] == "LOW"


async def test_a_batch_key_reused_with_another_priority_is_refused(context: Context) -> None:
    made = await run(context, CREATE_BATCH, key="b-1", priority="HIGH")
    assert (await run(context, CREATE_BATCH, key="b-1", priority="HIGH")).data == made.data
    other = await run(context, CREATE_BATCH, key="b-1")
    assert codes(other) == ["IDEMPOTENCY_KEY_REUSED"]


def test_the_order_keeps_a_share_of_takes_for_normal_and_low() -> None:
    names = ["llm-high", "llm", "llm-low", "llm-webhooks"]
    firsts = [priorities.order(names, names, rq_queue="llm", take=n, every=10)[0] for n in range(1, 21)]
    assert firsts.count("llm-high") == 16 and firsts.count("llm") == 2 and firsts.count("llm-low") == 2
    assert firsts[4] == firsts[14] == "llm" and firsts[9] == firsts[19] == "llm-low"
    # NORMAL's turn goes to LOW when NORMAL has nothing; deliveries always come last.
    assert priorities.order(names, names, rq_queue="llm", take=5, every=10) == names[1:3] + names[:1] + names[3:]
    assert priorities.order(names, names, rq_queue="llm", take=10, every=10)[-1] == "llm-webhooks"
    # A worker on queues of its own (a test's) keeps their order.
    assert priorities.order(["a", "b"], ["a", "b"], rq_queue="llm", take=10, every=10) == ["a", "b"]
