"""Job record transitions from a test's synchronous Redis client (the store is async)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from gql_service import store
from gql_service.models import JobRecord

from .service import wait_until


def update_job(redis: Redis, job_id: str, change: store.Change, *, ttl_s: int) -> tuple[JobRecord | None, bool]:
    """`store.update_job` through a client to the same server, on a loop of its own (so it
    also serves a caller that is inside a running event loop)."""
    where = redis.connection_pool.connection_kwargs

    async def apply() -> tuple[JobRecord | None, bool]:
        client = AsyncRedis(host=where.get("host", "127.0.0.1"), port=where.get("port", 6379), db=where.get("db", 0))
        try:
            return await store.update_job(client, job_id, change, ttl_s=ttl_s)
        finally:
            await client.aclose()

    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, apply()).result()


def create_job(
    redis: Redis, job_id: str, text: str = "I loved the clinic. Dr. Rao was kind.", *, ttl_s: int = 3600
) -> JobRecord:
    """A new job record (QUEUED, version 1), as submitText stores it, without RQ."""
    record = JobRecord(id=job_id)
    with redis.pipeline() as pipe:
        store.create_job(pipe, record, text=text, ttl_s=ttl_s)
        pipe.execute()
    return record


def records(redis: Redis, job_ids: list[str]) -> list[JobRecord]:
    """The jobs' records now (every one must exist)."""
    found = [store.get_job_sync(redis, job_id) for job_id in job_ids]
    assert all(r is not None for r in found)
    return found  # type: ignore[return-value]


def until_ended(redis: Redis, job_ids: list[str], timeout_s: float = 30) -> list[JobRecord]:
    """The jobs' records once every one has ended."""
    wait_until(lambda: all(r.terminal for r in records(redis, job_ids)), timeout_s=timeout_s, what="every job to end")
    return records(redis, job_ids)
