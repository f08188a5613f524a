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
from redis.commands.core import AsyncScript

from gql_service import budgets, keys, redis_conn
from gql_service.models import JobRecord, TokenUsage, WebhookDelivery, utcnow
from gql_service.redis_conn import NotReplicated
from gql_service.settings import ReplicaAck, Settings

# Compare-and-set on the version: a concurrent writer makes us re-read and re-apply.
# Each logical transition carries a token (ARGV[5], kept in field `x`), made once and the
# same on every retry: when a connection drops after Redis ran the script but before its
# reply arrived, a repeat (redis-py's own, or the caller's after a re-read) finds its token
# and reports the state it wrote (outcome 2), never applying the change twice.
#
# A transition to an ended state also adds the job to the archive outbox (KEYS[4]), in the
# same step: no ended job can miss it (gql_service.worker.archiver). A job with a webhook is
# added to the webhook outbox (KEYS[5], ARGV[7] = '1') likewise (gql_service.worker.deliveries).
# Only to an outbox that exists: its consumers create the stream (with their group) when they
# start, and it stays, empty or not. So whether an outbox is written is decided by whether
# anything reads it, not by the writer's own settings (an API without DATABASE_URL beside
# workers with it, or the reverse, would lose entries or pile up unread ones). Every entry
# carries MAXLEN ~ ARGV[6] (OUTBOX_MAX_LEN): a consumer that went away for good can't fill
# Redis's memory.
#
# The jobs that have not ended are kept in a sorted set (KEYS[6]) by the time of their last
# change, for the reconciler (gql_service.worker.reconciler): a transition moves its job there, or
# out of it when the job ends (ARGV[8] = '1').
#
# A job of a batch (ARGV[10] its bucket before, ARGV[11] after, KEYS[7] the batch) moves
# between the batch's counts in the same step; when it ends, its usage is added, its id is
# appended to the batch's ended list (KEYS[9]), and a closed batch whose last job this was is
# completed. Every such change bumps the batch's version and publishes it (KEYS[8]).
#
# When a job ends, the tokens it used (ARGV[14]) and what they cost (ARGV[17], nano-dollars) are added to its
# tenant's counters of the day and the month (KEYS[10..12], expiring at ARGV[18] and ARGV[19]),
# which budgets are checked against (gql_service.budgets): in this step, so a repeat of it
# (outcome 2) never counts a job twice.
#
# ARGV[20], if given: the token the record's last write must carry (a step sent right behind
# the one before it, in the same round trip, lands only on that step: worker/job_ends.py).
#
# A transition also answers how many subscribers want the job's interim frames (KEYS[3]):
# the worker learns it with the write it makes anyway, so streaming costs no extra command
# when nobody watches (gql_service.partials).
_CAS_LUA = """
local v, x = unpack(redis.call('HMGET', KEYS[1], 'v', 'x'))
if not v then return {-1, 0} end
local watchers = redis.call('PUBSUB', 'NUMSUB', KEYS[3])[2]
if x == ARGV[5] then return {2, watchers, redis.call('HGET', KEYS[1], 'd')} end
if v ~= ARGV[1] then return {0, 0} end
if ARGV[20] and x ~= ARGV[20] then return {0, 0} end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'd', ARGV[3], 'x', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', KEYS[2], ARGV[3])
if ARGV[8] == '1' and redis.call('EXISTS', KEYS[4]) == 1 then
  local text = redis.call('HGET', KEYS[1], 't') or ''
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', 'd', ARGV[3], 't', text)
end
if ARGV[7] == '1' and redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*', 'd', ARGV[3])
end
if ARGV[8] == '1' then
  redis.call('ZREM', KEYS[6], KEYS[1])
else
  redis.call('ZADD', KEYS[6], ARGV[9], KEYS[1])
end
if ARGV[10] ~= '' and redis.call('EXISTS', KEYS[7]) == 1 then
  if ARGV[10] ~= ARGV[11] then
    redis.call('HINCRBY', KEYS[7], ARGV[10], -1)
    redis.call('HINCRBY', KEYS[7], ARGV[11], 1)
  end
  if ARGV[8] == '1' then
    redis.call('HINCRBY', KEYS[7], 'prompt_tokens', ARGV[12])
    redis.call('HINCRBY', KEYS[7], 'completion_tokens', ARGV[13])
    redis.call('HINCRBY', KEYS[7], 'total_tokens', ARGV[14])
    redis.call('RPUSH', KEYS[9], ARGV[15])
    redis.call('EXPIRE', KEYS[9], ARGV[4])
    local c = redis.call('HMGET', KEYS[7], 'total', 'finished', 'failed', 'canceled', 'closed_at', 'completed_at')
    if c[5] and not c[6] and tonumber(c[2]) + tonumber(c[3]) + tonumber(c[4]) >= tonumber(c[1]) then
      redis.call('HSET', KEYS[7], 'completed_at', ARGV[16])
    end
  end
  redis.call('PUBLISH', KEYS[8], redis.call('HINCRBY', KEYS[7], 'v', 1))
end
if ARGV[8] == '1' and (ARGV[14] ~= '0' or ARGV[17] ~= '0') then
  redis.call('INCRBY', KEYS[10], ARGV[14])
  redis.call('EXPIREAT', KEYS[10], ARGV[18])
  redis.call('INCRBY', KEYS[11], ARGV[14])
  redis.call('EXPIREAT', KEYS[11], ARGV[19])
  redis.call('INCRBY', KEYS[12], ARGV[17])
  redis.call('EXPIREAT', KEYS[12], ARGV[19])
end
return {1, watchers}
"""

# OUTBOX_MAX_LEN's default, for writers without settings (tests, tools).
OUTBOX_MAX_LEN: int = Settings.model_fields["outbox_max_len"].default

Change = Callable[[JobRecord], JobRecord | None]
"""Returns the changed record (a copy: `model_copy(update=...)`, never the one it is given,
changed in place), or None to leave the job as it is."""


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
    if record.webhook_url:
        pipe.hset(key, "w", WebhookDelivery(url=record.webhook_url).model_dump_json())
    pipe.expire(key, ttl_s)
    pipe.zadd(keys.LIVE_JOBS, {key: record.created_at.timestamp() * 1000})


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
    return await newest_first(redis, keys.tenant_jobs(tenant), before=before, count=count)


async def newest_first(
    redis: AsyncRedis, key: str, *, before: tuple[float, str] | None, count: int
) -> list[tuple[str, float]]:
    """Up to `count` (member, score) of a sorted set by creation time, newest first, strictly
    after the cursor `before`."""
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


def next_state(current: JobRecord, change: Change) -> JobRecord | None:
    # A terminal job never changes again: this is the one place that refuses it.
    if current.terminal:
        return None
    # `current` itself, not a deep copy of it (30 µs a transition): a change returns a copy.
    changed = change(current)
    if changed is current:
        raise ValueError("a change must return a changed copy of the record, not the record itself")
    if changed is None:
        return None
    return changed.model_copy(update={"version": current.version + 1, "updated_at": utcnow()})


def cas_args(
    current: JobRecord,
    new: JobRecord,
    ttl_s: int,
    token: str,
    *,
    outbox_max_len: int = OUTBOX_MAX_LEN,
    after: str | None = None,
) -> tuple[list[str], list[Any]]:
    announce = new.terminal and new.webhook_url is not None
    batch = new.batch_id or ""
    usage = new.usage or TokenUsage()
    period = budgets.Period.of(new.updated_at)  # the day and month the job ended in, when it ends
    counters = budgets.Counters.of(new.tenant, period)
    return (
        [
            keys.job(new.id),
            keys.job_events(new.id),
            keys.job_partials(new.id),
            keys.ARCHIVE_OUTBOX,
            keys.WEBHOOK_OUTBOX,
            keys.LIVE_JOBS,
            keys.batch(batch),
            keys.batch_events(batch),
            keys.batch_ended(batch),
            counters.day_tokens,
            counters.month_tokens,
            counters.month_cost,
        ],
        [
            current.version,
            new.version,
            encode(new),
            ttl_s,
            token,
            outbox_max_len,
            int(announce),
            int(new.terminal),
            int(new.updated_at.timestamp() * 1000),
            current.bucket if batch else "",
            new.bucket if batch else "",
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens,
            new.id,
            utcnow().isoformat(),
            budgets.nano_usd(new.cost_usd),
            *budgets.expiry(period),
            *([after] if after is not None else []),
        ],
    )


@dataclass(frozen=True)
class Transition:
    record: JobRecord | None  # the state after (None: the job does not exist)
    changed: bool
    partial_watchers: int = 0  # subscribers of the job's interim frames, as it was written


class EndNotReplicated(NotReplicated):
    """A job's end is written on the primary, but not confirmed by enough replicas."""

    def __init__(self, message: str, done: Transition) -> None:
        super().__init__(message)
        self.done = done


def _wrote(results: list[Any]) -> bool:
    return bool(results and results[0][0] in (1, 2))  # the CAS script's outcome: written (now or before)


async def update_job(
    redis: AsyncRedis,
    job_id: str,
    change: Change,
    *,
    ttl_s: int,
    outbox_max_len: int = OUTBOX_MAX_LEN,
    ack: ReplicaAck | None = None,
    last_seen: JobRecord | None = None,
) -> tuple[JobRecord | None, bool]:
    """Apply `change` atomically. Returns (state after, whether it changed)."""
    done = await transition(
        redis, job_id, change, ttl_s=ttl_s, outbox_max_len=outbox_max_len, ack=ack, last_seen=last_seen
    )
    return done.record, done.changed


async def transition(
    redis: AsyncRedis,
    job_id: str,
    change: Change,
    *,
    ttl_s: int,
    outbox_max_len: int = OUTBOX_MAX_LEN,
    ack: ReplicaAck | None = None,
    last_seen: JobRecord | None = None,
    token: str | None = None,
) -> Transition:
    """`update_job`, and how many want the job's interim frames.

    `token`: this logical transition's, made by the caller once and given again when it
    tries the same step again (a reply lost past redis-py's retries): a transition that
    already landed is reported as written, with the state it wrote, never applied twice.

    `outbox_max_len`: the bound on the outboxes a change that ends the job adds it to.
    `ack`: a change that ends the job waits for replicas to have it (EndNotReplicated if
    they don't in time; the change stands on the primary).
    `last_seen`: the state this writer last wrote or read, tried first without reading it
    again (a worker's own transitions, one after the other); if anyone wrote in between,
    the version check refuses it and the change is applied to a fresh read.
    """
    script = cas_script(redis)
    token = token or uuid.uuid4().hex
    while True:
        current: JobRecord | None
        if last_seen is not None:
            current, last_seen = last_seen, None
        else:
            current, landed = await _read_with_token(redis, job_id)
            if current is not None and landed == token:
                return Transition(current, True)  # this very step, written by an earlier try
        if current is None:
            return Transition(None, False)
        new = next_state(current, change)
        if new is None:
            return Transition(current, False)
        keys_, args = cas_args(current, new, ttl_s, token, outbox_max_len=outbox_max_len)
        if ack is None or not new.terminal:
            outcome, watchers, *stored = await script(keys=keys_, args=args, client=redis)
        else:
            async with redis_conn.pipeline(redis, ack, transaction=False, wait_if=_wrote) as pipe:
                await script(keys=keys_, args=args, client=pipe)
                [(outcome, watchers, *stored)] = await pipe.execute()
        if outcome == 2:
            new = decode(stored[0])
        if outcome in (1, 2):
            done = Transition(new, True, int(watchers))
            if ack is not None and new.terminal:
                try:
                    redis_conn.check_replicated(pipe)
                except NotReplicated as exc:
                    raise EndNotReplicated(str(exc), done) from None
            return done
        if outcome == -1:
            return Transition(None, False)


_CAS: list[AsyncScript] = []  # made once: redis-py hashes a script's text at each registration


def cas_script(redis: AsyncRedis) -> AsyncScript:
    """The CAS script; called with each call's own client or pipeline (its first matters not)."""
    if not _CAS:
        _CAS.append(redis.register_script(_CAS_LUA))
    return _CAS[0]


async def _read_with_token(redis: AsyncRedis, job_id: str) -> tuple[JobRecord | None, str | None]:
    """The record, and the token of the transition that wrote it last."""
    raw, token = await redis.hmget(keys.job(job_id), ["d", "x"])
    if raw is None:
        return None, None
    return decode(raw), token.decode() if isinstance(token, bytes) else token


# -- what the workers learnt about an LLM endpoint ----------------------------------------
async def json_mode_only(redis: AsyncRedis, endpoint: str) -> bool:
    return bool(await redis.exists(keys.json_mode_only(endpoint)))


async def remember_json_mode_only(redis: AsyncRedis, endpoint: str, *, ttl_s: int) -> None:
    # Expires, so an endpoint that learns JSON schemas later is asked again.
    await redis.set(keys.json_mode_only(endpoint), 1, ex=ttl_s)
