"""A job's reads and writes from a worker: what an attempt starts with, a transition whose end
the replicas did not confirm stands all the same, two transitions in one round trip, and a
job failed from outside an attempt (crash handlers, the reconciler)."""

from __future__ import annotations

import logging
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

from gql_service import keys, store
from gql_service.models import JobError, JobRecord, JobStage, JobStatus, utcnow
from gql_service.settings import ReplicaAck

log = logging.getLogger(__name__)

ForAttempt = tuple[JobRecord | None, str, bytes | str | None]


async def get_for_attempt(redis: Redis, job_id: str) -> ForAttempt:
    """The record, its submitted text, and the answer a provider batch gave it if any
    (keys.ANSWER_FIELD), in one round trip: what a worker starts an attempt with."""
    return for_attempt(await read_for_attempt(redis, job_id))


def read_for_attempt(redis: Redis | Pipeline, job_id: str) -> Any:
    """`get_for_attempt`'s read (awaitable, or queued on a pipeline); `for_attempt` reads its reply."""
    return redis.hmget(keys.job(job_id), ["d", "t", keys.ANSWER_FIELD])


def for_attempt(reply: list[Any]) -> ForAttempt:
    raw, text, answer = reply
    if raw is None:
        return None, "", None
    return store.decode(raw), text.decode() if isinstance(text, bytes) else (text or ""), answer


async def transition(redis: Redis, job_id: str, change: store.Change, **options: Any) -> store.Transition:
    """`store.transition`; an end that replicas did not confirm in time stands all the same.

    There is no client waiting to be told SERVICE_UNAVAILABLE: the end is on the primary,
    and should a failover lose it, the job's record is back where it was before and the
    reconciler queues the job again (gql_service.worker.reconciler)."""
    try:
        return await store.transition(redis, job_id, change, **options)
    except store.EndNotReplicated as exc:
        log.warning("job %s: its end is not confirmed by the replicas (%s)", job_id, exc)
        return exc.done


async def fail_job(
    redis: Redis,
    job_id: str,
    error: JobError,
    *,
    ttl_s: int,
    outbox_max_len: int = store.OUTBOX_MAX_LEN,
    ack: ReplicaAck | None = None,
) -> JobRecord | None:
    """End a job as FAILED from outside an attempt (crash handlers, enqueue failures)."""

    def change(job: JobRecord) -> JobRecord:
        return job.model_copy(
            update={"status": JobStatus.FAILED, "stage": JobStage.FAILED, "error": error, "finished_at": utcnow()}
        )

    done = await transition(redis, job_id, change, ttl_s=ttl_s, outbox_max_len=outbox_max_len, ack=ack)
    return done.record


async def two_steps(
    redis: Redis,
    job_id: str,
    first: store.Change,
    then: store.Change,
    last_seen: JobRecord,
    *,
    ttl_s: int,
    outbox_max_len: int,
    tokens: tuple[str, str],
) -> tuple[store.Transition, store.Transition]:
    """`transition(first)` then `transition(then)`, both written and published in order, in one
    round trip: each is the CAS script's call, the second one refused unless the record's last
    write is the first (its token), so nothing written in between is overwritten. Anything
    else (a write in between, a job gone or ended) goes step by step as `transition` does,
    with the same tokens (a step that landed is never applied twice). Not for a write that
    waits for replicas (REDIS_MIN_REPLICAS_ACKED): `transition` does that."""
    options: dict[str, Any] = {"ttl_s": ttl_s, "outbox_max_len": outbox_max_len}
    middle = store.next_state(last_seen, first)
    end = store.next_state(middle, then) if middle is not None else None
    if middle is not None and end is not None:
        script = store.cas_script(redis)
        calls = [
            store.cas_args(last_seen, middle, ttl_s, tokens[0], outbox_max_len=outbox_max_len),
            store.cas_args(middle, end, ttl_s, tokens[1], outbox_max_len=outbox_max_len, after=tokens[0]),
        ]
        for _ in range(2):  # again once the script is loaded (a Redis restarted, flushed)
            async with redis.pipeline(transaction=False) as pipe:
                for keys_, args in calls:
                    pipe.evalsha(script.sha, len(keys_), *keys_, *args)
                replies = await pipe.execute(raise_on_error=False)
            if not any(isinstance(reply, NoScriptError) for reply in replies):
                break
            await redis.script_load(script.script)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        done = [_outcome(reply, new) for reply, new in zip(replies, (middle, end), strict=True)]
        if done[0] is not None and done[1] is not None:
            return done[0], done[1]
        if done[0] is not None:  # the second was refused: step by step from a fresh read
            return done[0], await transition(redis, job_id, then, token=tokens[1], **options)
    one = await transition(redis, job_id, first, last_seen=last_seen, token=tokens[0], **options)
    return one, await transition(redis, job_id, then, last_seen=one.record if one.changed else None, token=tokens[1],
                                 **options)  # fmt: skip


def _outcome(reply: list[Any], new: JobRecord) -> store.Transition | None:
    """The CAS script's reply as a transition; None if it was refused (a write in between)."""
    outcome, watchers, *stored = reply
    if outcome == 1:
        return store.Transition(new, True, int(watchers))
    if outcome == 2:
        return store.Transition(store.decode(stored[0]), True, int(watchers))
    return store.Transition(None, False) if outcome == -1 else None
