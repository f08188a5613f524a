"""Job records in Redis: create, read, and versioned, published transitions.

A record is a hash `{v: version, d: JSON state, t: submitted text}`; the text lives
beside the state so that events stay small. Every change is one Lua call that
compares the version, writes the new state, refreshes the TTL and PUBLISHes the full
state, so readers and subscribers can never see a change that was not published, nor
a publish that did not happen (DESIGN decision 2).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline as AsyncPipeline
from redis.client import Pipeline

from . import keys
from .models import JobRecord, utcnow

# Compare-and-set on the version: a concurrent writer makes us re-read and re-apply.
# Each transition carries a unique id (ARGV[5], kept in field `x`): when a connection drops
# after Redis ran the script but before its reply arrived, redis-py sends the same call
# again, and that repeat must report success, not re-apply the change (attempts counted
# twice).
#
# With the archive on (DATABASE_URL), a transition to an ended state also adds the job to
# the archive outbox (KEYS[4], ARGV[6] = '1'), in the same step: no ended job can miss it
# (gql_service.archiver).
#
# A transition also answers how many subscribers want the job's interim frames (KEYS[3]):
# the worker learns it with the write it makes anyway, so streaming costs no extra command
# when nobody watches (gql_service.partials).
_CAS_LUA = """
local v, x = unpack(redis.call('HMGET', KEYS[1], 'v', 'x'))
if not v then return {-1, 0} end
local watchers = redis.call('PUBSUB', 'NUMSUB', KEYS[3])[2]
if v == ARGV[2] and x == ARGV[5] then return {1, watchers} end
if v ~= ARGV[1] then return {0, 0} end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'd', ARGV[3], 'x', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', KEYS[2], ARGV[3])
if ARGV[6] == '1' then
  redis.call('XADD', KEYS[4], '*', 'd', ARGV[3], 't', redis.call('HGET', KEYS[1], 't') or '')
end
return {1, watchers}
"""

Change = Callable[[JobRecord], JobRecord | None]
"""Returns the changed record, or None to leave the job as it is."""


def encode(record: JobRecord) -> str:
    return record.model_dump_json()


def decode(raw: bytes | str) -> JobRecord:
    return JobRecord.model_validate_json(raw)


def create_job(pipe: Pipeline | AsyncPipeline, record: JobRecord, *, text: str, ttl_s: int) -> None:
    """Queue the commands that store a new record (version 1).

    Not published: nobody can be subscribed to an id that did not exist until now, and a
    subscriber reads this version as its snapshot.
    """
    key = keys.job(record.id)
    pipe.hset(key, mapping={"v": record.version, "d": encode(record), "t": text})
    pipe.expire(key, ttl_s)


PRUNE_EVERY = 64


def index_job(pipe: Pipeline | AsyncPipeline, record: JobRecord, *, ttl_s: int) -> None:
    """Queue the commands that list the job under its tenant.

    Entries past their TTL are dropped on about one submit in PRUNE_EVERY (on the hot path
    every command counts); listing skips the few expired ones that wait for it.
    """
    key = keys.tenant_jobs(record.tenant)
    created_ms = record.created_at.timestamp() * 1000
    pipe.zadd(key, {record.id: created_ms})
    if random.randrange(PRUNE_EVERY) == 0:
        pipe.zremrangebyscore(key, "-inf", f"({created_ms - ttl_s * 1000}")
    pipe.expire(key, ttl_s)


async def list_job_ids(
    redis: AsyncRedis, tenant: str, *, before: tuple[float, str] | None, count: int
) -> list[tuple[str, float]]:
    """Up to `count` (id, created ms) pairs, newest first, strictly after the cursor `before`."""
    key = keys.tenant_jobs(tenant)
    top: float | str = before[0] if before else "+inf"
    # Ties (same millisecond) sort by id; fetch a few extra so they can be skipped exactly.
    rows: Any = await redis.zrevrangebyscore(key, top, "-inf", start=0, num=count + 16, withscores=True)
    out = []
    for member, score in rows:
        job_id = member.decode() if isinstance(member, bytes) else str(member)
        if before and score == before[0] and job_id >= before[1]:
            continue
        out.append((job_id, float(score)))
        if len(out) == count:
            break
    return out


async def get_jobs(redis: AsyncRedis, job_ids: list[str]) -> list[JobRecord | None]:
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(keys.job(job_id), "d")
        raws = await pipe.execute()
    return [decode(raw) if raw is not None else None for raw in raws]


async def get_job(redis: AsyncRedis | AsyncPipeline, job_id: str) -> JobRecord | None:
    raw = await redis.hget(keys.job(job_id), "d")
    return decode(raw) if raw is not None else None


def get_job_sync(redis: Redis, job_id: str) -> JobRecord | None:
    raw = redis.hget(keys.job(job_id), "d")
    return decode(raw) if raw is not None else None


async def get_job_and_text(redis: AsyncRedis, job_id: str) -> tuple[JobRecord | None, str]:
    """The record and its submitted text, in one round trip (what a worker starts with)."""
    raw, text = await redis.hmget(keys.job(job_id), ["d", "t"])
    if raw is None:
        return None, ""
    return decode(raw), text.decode() if isinstance(text, bytes) else (text or "")


def _next(current: JobRecord, change: Change) -> JobRecord | None:
    # A terminal job never changes again: this is the one place that refuses it.
    if current.terminal:
        return None
    changed = change(current.model_copy(deep=True))
    if changed is None:
        return None
    return changed.model_copy(update={"version": current.version + 1, "updated_at": utcnow()})


def _cas_args(current: JobRecord, new: JobRecord, ttl_s: int, *, archive: bool = False) -> tuple[list[str], list[Any]]:
    return (
        [keys.job(new.id), keys.job_events(new.id), keys.job_partials(new.id), keys.ARCHIVE_OUTBOX],
        [current.version, new.version, encode(new), ttl_s, uuid.uuid4().hex, int(archive and new.terminal)],
    )


@dataclass(frozen=True)
class Transition:
    record: JobRecord | None  # the state after (None: the job does not exist)
    changed: bool
    partial_watchers: int = 0  # subscribers of the job's interim frames, as it was written


async def update_job(
    redis: AsyncRedis,
    job_id: str,
    change: Change,
    *,
    ttl_s: int,
    archive: bool = False,
    last_seen: JobRecord | None = None,
) -> tuple[JobRecord | None, bool]:
    """Apply `change` atomically. Returns (state after, whether it changed)."""
    done = await transition(redis, job_id, change, ttl_s=ttl_s, archive=archive, last_seen=last_seen)
    return done.record, done.changed


async def transition(
    redis: AsyncRedis,
    job_id: str,
    change: Change,
    *,
    ttl_s: int,
    archive: bool = False,
    last_seen: JobRecord | None = None,
) -> Transition:
    """`update_job`, and how many want the job's interim frames.

    `archive`: the history is on; a change that ends the job queues it for the archive.
    `last_seen`: the state this writer last wrote or read, tried first without reading it
    again (a worker's own transitions, one after the other); if anyone wrote in between,
    the version check refuses it and the change is applied to a fresh read.
    """
    script = redis.register_script(_CAS_LUA)
    while True:
        current, last_seen = last_seen or await get_job(redis, job_id), None
        if current is None:
            return Transition(None, False)
        new = _next(current, change)
        if new is None:
            return Transition(current, False)
        keys_, args = _cas_args(current, new, ttl_s, archive=archive)
        outcome, watchers = await script(keys=keys_, args=args)
        if outcome == 1:
            return Transition(new, True, int(watchers))
        if outcome == -1:
            return Transition(None, False)


# -- what the workers learnt about an LLM endpoint ----------------------------------------
async def json_mode_only(redis: AsyncRedis, endpoint: str) -> bool:
    return bool(await redis.exists(keys.json_mode_only(endpoint)))


async def remember_json_mode_only(redis: AsyncRedis, endpoint: str, *, ttl_s: int) -> None:
    # Expires, so an endpoint that learns JSON schemas later is asked again.
    await redis.set(keys.json_mode_only(endpoint), 1, ex=ttl_s)
