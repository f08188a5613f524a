"""ECONOMY batches in Redis: the jobs that wait to be sent to the provider's Batch API, and
the chunks they are sent in (one provider batch each) with the state each has reached.

A job of an ECONOMY batch is held here instead of on an RQ queue (`hold`, in its
submission's MULTI). A worker takes the waiting jobs of a batch that is due into a new chunk
in one script (`take`): no job is in two chunks, none is left between. A chunk's state only
moves forward, by compare-and-set (`advance`):

    PREPARED -> UPLOADED -> CREATED -> RUNNING -> READING -> DONE

PREPARED: its jobs are known; UPLOADED: its input file is at the provider; CREATED: the
provider batch exists; RUNNING: its jobs are in stage PROVIDER_BATCH and it is polled;
READING: it has ended and its answers are being handed over; DONE: every job has left it.
The worker side is gql_service.worker.economy; the API reads chunks for `Batch.providerBatches`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline as AsyncPipeline

from gql_service import keys


class ChunkState(enum.Enum):
    PREPARED = "PREPARED"
    UPLOADED = "UPLOADED"
    CREATED = "CREATED"
    RUNNING = "RUNNING"
    READING = "READING"
    DONE = "DONE"


@dataclass(frozen=True)
class Chunk:
    id: str
    batch_id: str
    state: ChunkState
    provider_batch: str | None = None  # the provider's batch id, once created
    status: str = "preparing"  # the provider's word for it ("validating", "in_progress", ...)
    total: int = 0
    completed: int = 0
    failed: int = 0
    input_file: str | None = None
    output_file: str | None = None
    error_file: str | None = None
    made: int = 0  # when (epoch seconds)


def hold(pipe: AsyncPipeline, batch_id: str, jobs: dict[str, float], *, ttl_s: int) -> None:
    """Queue the commands that make new jobs (id -> created ms) wait for their batch's flush."""
    waiting = keys.economy_waiting(batch_id)
    pipe.zadd(waiting, jobs)
    pipe.expire(waiting, ttl_s)
    pipe.zadd(keys.ECONOMY_BATCHES, {batch_id: min(jobs.values())}, nx=True)


async def waiting_batches(redis: AsyncRedis) -> list[tuple[str, float, int, bool]]:
    """Each batch with jobs waiting: (id, when the oldest came in ms, how many, still open)."""
    rows: Any = await redis.zrange(keys.ECONOMY_BATCHES, 0, -1, withscores=True)
    ids = [member.decode() for member, _ in rows]
    async with redis.pipeline(transaction=False) as pipe:
        for batch_id in ids:
            pipe.zcard(keys.economy_waiting(batch_id))
            pipe.exists(keys.batch_open(batch_id))
        found = await pipe.execute()
    return [
        (b, float(score), int(found[2 * n]), bool(found[2 * n + 1]))
        for n, (b, (_, score)) in enumerate(zip(ids, rows, strict=True))
    ]


# Up to ARGV[1] of the batch's oldest waiting jobs into a new chunk, in one step; with
# ARGV[6] = '1' only a full chunk (another worker may have taken the rest meanwhile). A chunk
# that exists already is this very take, repeated after a lost reply: nothing more is taken.
# SADD in slices: Lua's unpack() of 50,000 values would overflow its stack.
_TAKE_LUA = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if ARGV[6] == '1' and redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then return 0 end
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #ids > 0 then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, #ids - 1)
  for i = 1, #ids, 1000 do
    redis.call('SADD', KEYS[4], unpack(ids, i, math.min(i + 999, #ids)))
  end
  redis.call('HSET', KEYS[3], 'batch', ARGV[2], 'state', 'PREPARED', 'total', #ids, 'made', ARGV[5])
  redis.call('SADD', KEYS[5], ARGV[3])
  redis.call('RPUSH', KEYS[6], ARGV[3])
  for _, k in ipairs({KEYS[3], KEYS[4], KEYS[6]}) do redis.call('EXPIRE', k, ARGV[4]) end
  if redis.call('EXISTS', KEYS[7]) == 1 then
    redis.call('PUBLISH', KEYS[8], redis.call('HINCRBY', KEYS[7], 'v', 1))
  end
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #first == 0 then redis.call('ZREM', KEYS[2], ARGV[2]) else redis.call('ZADD', KEYS[2], first[2], ARGV[2]) end
return #ids
"""


async def take(redis: AsyncRedis, batch_id: str, chunk_id: str, *, most: int, ttl_s: int, full: bool = False) -> int:
    """Move up to `most` of the batch's oldest waiting jobs into the new chunk `chunk_id`
    (PREPARED); how many it took. `full`: only if `most` wait."""
    script_keys = [
        keys.economy_waiting(batch_id), keys.ECONOMY_BATCHES, keys.economy_chunk(chunk_id),
        keys.economy_chunk_jobs(chunk_id), keys.ECONOMY_CHUNKS, keys.batch_chunks(batch_id),
        keys.batch(batch_id), keys.batch_events(batch_id),
    ]  # fmt: skip
    made = int(time.time())
    args = (most, batch_id, chunk_id, ttl_s, made, int(full))
    return int(await redis.eval(_TAKE_LUA, len(script_keys), *script_keys, *args))


async def active(redis: AsyncRedis) -> list[str]:
    """The chunks not yet DONE."""
    found: Any = await redis.smembers(keys.ECONOMY_CHUNKS)
    return sorted(member.decode() for member in found)


def _decode(chunk_id: str, fields: dict[bytes, bytes]) -> Chunk | None:
    if not fields:
        return None
    f = {k.decode(): v.decode() for k, v in fields.items()}
    return Chunk(
        id=chunk_id, batch_id=f["batch"], state=ChunkState(f["state"]), provider_batch=f.get("provider_batch"),
        status=f.get("status", "preparing"), total=int(f.get("total", 0)), completed=int(f.get("completed", 0)),
        failed=int(f.get("failed", 0)), input_file=f.get("input_file"), output_file=f.get("output_file") or None,
        error_file=f.get("error_file") or None, made=int(f.get("made", 0)),
    )  # fmt: skip


async def chunk(redis: AsyncRedis, chunk_id: str) -> Chunk | None:
    found: Any = await redis.hgetall(keys.economy_chunk(chunk_id))
    return _decode(chunk_id, found)


async def of_batch(redis: AsyncRedis, batch_id: str) -> list[Chunk]:
    """The batch's chunks, in the order they were made."""
    listed: Any = await redis.lrange(keys.batch_chunks(batch_id), 0, -1)
    ids = [member.decode() for member in listed]
    async with redis.pipeline(transaction=False) as pipe:
        for chunk_id in ids:
            pipe.hgetall(keys.economy_chunk(chunk_id))
        found = await pipe.execute()
    return [c for c in (_decode(i, f) for i, f in zip(ids, found, strict=True)) if c is not None]


async def job_ids(redis: AsyncRedis, chunk_id: str) -> list[str]:
    found: Any = await redis.smembers(keys.economy_chunk_jobs(chunk_id))
    return sorted(member.decode() for member in found)


# Compare-and-set of a chunk's state (ARGV[3] its id), with the fields the new state brings
# (ARGV[4..]); a DONE chunk leaves the active set.
_ADVANCE_LUA = """
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2])
if #ARGV > 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
if ARGV[2] == 'DONE' then redis.call('SREM', KEYS[2], ARGV[3]) end
return 1
"""


async def advance(redis: AsyncRedis, chunk_id: str, was: ChunkState, to: ChunkState, **fields: str) -> bool:
    """Move the chunk from `was` to `to` with `fields`; False if it was not in `was` any more
    (another worker moved it: this one's step is not to be taken again)."""
    flat = [item for pair in fields.items() for item in pair]
    script_keys = [keys.economy_chunk(chunk_id), keys.ECONOMY_CHUNKS]
    return bool(await redis.eval(_ADVANCE_LUA, 2, *script_keys, was.value, to.value, chunk_id, *flat))


# The provider's counts of a chunk, written when they moved: its batch's subscribers are told.
_COUNTS_LUA = """
local old = redis.call('HMGET', KEYS[1], 'status', 'total', 'completed', 'failed')
if old[1] == ARGV[1] and old[2] == ARGV[2] and old[3] == ARGV[3] and old[4] == ARGV[4] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'total', ARGV[2], 'completed', ARGV[3], 'failed', ARGV[4])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('PUBLISH', KEYS[3], redis.call('HINCRBY', KEYS[2], 'v', 1))
end
return 1
"""


async def note_counts(redis: AsyncRedis, chunk: Chunk, status: str, total: int, completed: int, failed: int) -> bool:
    """Keep the provider's status and request counts of a chunk; True if they moved."""
    script_keys = [keys.economy_chunk(chunk.id), keys.batch(chunk.batch_id), keys.batch_events(chunk.batch_id)]
    return bool(await redis.eval(_COUNTS_LUA, 3, *script_keys, status, total, completed, failed))


async def stop_waiting(redis: AsyncRedis, batch_id: str) -> None:
    """A canceled batch's waiting jobs wait no more. (Its chunks see the batch canceled, its
    `canceled_at`, and the worker at each cancels its provider batch.)"""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.economy_waiting(batch_id))
        pipe.zrem(keys.ECONOMY_BATCHES, batch_id)
        await pipe.execute()


async def canceled(redis: AsyncRedis, batch_id: str) -> bool:
    return bool(await redis.hexists(keys.batch(batch_id), "canceled_at"))


async def held(redis: AsyncRedis, jobs: list[tuple[str, str]]) -> list[bool]:
    """Of (job id, batch id) pairs, which jobs the economy loop answers for: an ECONOMY
    batch's, not yet handed over (to the RQ queue) by it. The reconciler leaves them."""
    async with redis.pipeline(transaction=False) as pipe:
        for job_id, batch_id in jobs:
            pipe.hget(keys.batch(batch_id), "mode")
            pipe.exists(keys.economy_handed(job_id))
        found = await pipe.execute()
    economy = b"ECONOMY"
    return [found[2 * n] == economy and not found[2 * n + 1] for n in range(len(jobs))]
