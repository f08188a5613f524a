"""Batches in Redis: a hash per batch (its fields, and the counts and usage its jobs keep),
the index of its jobs, the list of its jobs in the order they ended, and its open flag.

The counts are never computed by scanning jobs: a submission adds to `total` and `queued`
in the MULTI that creates the jobs, and every job transition moves the job between the
counts in its own Lua step (store.py). Closing, and the last job's end, complete a closed
batch atomically in Lua, so "closed and every job ended" happens exactly once.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline as AsyncPipeline

from gql_service import keys, store
from gql_service.models import BatchCounts, BatchMode, BatchRecord, JobPriority, TokenUsage

_COUNTS = ("total", "queued", "running", "finished", "failed", "canceled")
_USAGE = ("prompt_tokens", "completion_tokens", "total_tokens")


def create_batch(pipe: AsyncPipeline, record: BatchRecord, *, ttl_s: int) -> None:
    """Queue the commands that store a new, open batch."""
    key = keys.batch(record.id)
    fields: dict[str, str | int] = {
        "tenant": record.tenant,
        "name": record.name,
        "metadata": json.dumps(record.metadata, separators=(",", ":")),
        "created_at": record.created_at.isoformat(),
        "priority": record.priority.value,
        "mode": record.mode.value,
        "v": 1,
        **dict.fromkeys(_COUNTS + _USAGE, 0),
    }
    pipe.hset(key, mapping=fields)  # type: ignore[arg-type]  # (redis-py wants an invariant key type)
    pipe.set(keys.batch_open(record.id), 1)
    pipe.zadd(keys.tenant_batches(record.tenant), {record.id: record.created_at.timestamp() * 1000})
    for k in (key, keys.batch_open(record.id), keys.tenant_batches(record.tenant)):
        pipe.expire(k, ttl_s)


async def discard(redis: AsyncRedis, record: BatchRecord) -> None:
    """Remove a batch that was never handed out (it lost its idempotency key's claim)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.batch(record.id), keys.batch_open(record.id))
        pipe.zrem(keys.tenant_batches(record.tenant), record.id)
        await pipe.execute()


def add_jobs(pipe: AsyncPipeline, batch_id: str, jobs: dict[str, float], *, ttl_s: int) -> None:
    """Queue the commands that count new jobs (id -> created ms) into their batch, in the
    submission's MULTI, and tell its subscribers."""
    key = keys.batch(batch_id)
    pipe.zadd(keys.batch_jobs(batch_id), jobs)
    pipe.hincrby(key, "total", len(jobs))
    pipe.hincrby(key, "queued", len(jobs))
    pipe.hincrby(key, "v", 1)
    for k in (key, keys.batch_jobs(batch_id), keys.batch_open(batch_id)):
        pipe.expire(k, ttl_s)
    pipe.publish(keys.batch_events(batch_id), "jobs")  # a nudge: subscribers read the batch again


def decode(batch_id: str, fields: dict[bytes, bytes]) -> BatchRecord | None:
    if not fields:
        return None
    f = {k.decode(): v.decode() for k, v in fields.items()}

    def when(name: str) -> datetime | None:
        return datetime.fromisoformat(f[name]) if name in f else None

    return BatchRecord(
        id=batch_id,
        tenant=f["tenant"],
        name=f["name"],
        metadata=json.loads(f.get("metadata") or "{}"),
        version=int(f.get("v", 1)),
        created_at=datetime.fromisoformat(f["created_at"]),
        closed_at=when("closed_at"),
        completed_at=when("completed_at"),
        canceled_at=when("canceled_at"),
        # A batch made before there were priorities has none stored: its jobs were NORMAL.
        priority=JobPriority(f.get("priority", JobPriority.NORMAL.value)),
        mode=BatchMode(f.get("mode", BatchMode.INTERACTIVE.value)),
        counts=BatchCounts(**{name: int(f.get(name, 0)) for name in _COUNTS}),
        usage=TokenUsage(**{name: int(f.get(name, 0)) for name in _USAGE}),
    )


async def get_batches(redis: AsyncRedis, batch_ids: list[str]) -> list[BatchRecord | None]:
    async with redis.pipeline(transaction=False) as pipe:
        for batch_id in batch_ids:
            pipe.hgetall(keys.batch(batch_id))
        found = await pipe.execute()
    return [decode(batch_id, fields) for batch_id, fields in zip(batch_ids, found, strict=True)]


# Closing (or canceling) and completing, in one step: a batch whose jobs have all ended is
# completed by whichever comes last, the close or the last job's end (store.py's script).
_CLOSE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'completed_at') then return 0 end
if ARGV[2] == '1' and not redis.call('HGET', KEYS[1], 'canceled_at') then
  redis.call('HSET', KEYS[1], 'canceled_at', ARGV[1])
elseif redis.call('HGET', KEYS[1], 'closed_at') then
  return 0
end
redis.call('DEL', KEYS[2])
if not redis.call('HGET', KEYS[1], 'closed_at') then redis.call('HSET', KEYS[1], 'closed_at', ARGV[1]) end
local c = redis.call('HMGET', KEYS[1], 'total', 'finished', 'failed', 'canceled', 'completed_at')
if not c[5] and tonumber(c[2]) + tonumber(c[3]) + tonumber(c[4]) >= tonumber(c[1]) then
  redis.call('HSET', KEYS[1], 'completed_at', ARGV[1])
end
redis.call('PUBLISH', KEYS[3], redis.call('HINCRBY', KEYS[1], 'v', 1))
return 1
"""


async def close(redis: AsyncRedis, batch_id: str, *, now: datetime, cancel: bool = False) -> int:
    """1: closed (or canceled) now; 0: it already was; -1: no such batch."""
    script_keys = [keys.batch(batch_id), keys.batch_open(batch_id), keys.batch_events(batch_id)]
    return int(await redis.eval(_CLOSE_LUA, 3, *script_keys, now.isoformat(), int(cancel)))


async def job_ids(redis: AsyncRedis, batch_id: str, *, start: int, count: int) -> list[str]:
    """The batch's job ids in creation order, from position `start`."""
    found: Any = await redis.zrange(keys.batch_jobs(batch_id), start, start + count - 1)
    return [j.decode() for j in found]


async def ended_ids(redis: AsyncRedis, batch_id: str, *, start: int, count: int) -> list[str]:
    """The ids of the batch's jobs that have ended, in the order they did, from `start`."""
    found: Any = await redis.lrange(keys.batch_ended(batch_id), start, start + count - 1)
    return [j.decode() for j in found]


async def tenant_batch_ids(
    redis: AsyncRedis, tenant: str, *, before: tuple[float, str] | None, count: int
) -> list[tuple[str, float]]:
    """Up to `count` (batch id, created ms), newest first, strictly after the cursor `before`."""
    return await store.newest_first(redis, keys.tenant_batches(tenant), before=before, count=count)
