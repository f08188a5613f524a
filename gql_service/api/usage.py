"""A tenant's usage over a window (`Query.usage`): its jobs by status, tokens and cost, by UTC day.

A job counts in the day it was created, as `jobs(createdAfter:, createdBefore:)` windows them.
Redis's records are read first, through the tenant's index of job ids by creation time;
then the history sums the rest in one query that leaves out, by id, every job Redis
answered for. So a job in both (ended, archived, not yet expired) counts once, from Redis,
and one that expires between the two reads is not in the list left out, so the history
counts it. By ids rather than by day buckets: records expire one by one, so no day is ever
wholly in one store, and a total kept apart would be a second copy of the truth to keep right.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis as AsyncRedis

from gql_service import history, keys, store
from gql_service.api.calls import history_call, redis_call
from gql_service.api.errors import BadUserInput
from gql_service.models import JobRecord, JobStatus

MAX_WINDOW = dt.timedelta(days=366)
# Records read per round trip: bounded, so a tenant with many jobs in Redis never holds the
# connection (nor the event loop, decoding) for long at a time.
CHUNK = 500


@dataclass
class Totals:
    """Jobs by status, their tokens and cost (and how many had no price)."""

    jobs: Counter[JobStatus] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0
    unpriced: int = 0

    def add_job(self, record: JobRecord) -> None:
        self.jobs[record.status] += 1
        if record.usage is not None:
            self.prompt_tokens += record.usage.prompt_tokens
            self.completion_tokens += record.usage.completion_tokens
            self.total_tokens += record.usage.total_tokens
        if record.cost_usd is None:
            self.unpriced += 1
        else:
            self.cost_usd += record.cost_usd

    def add_row(self, row: dict[str, Any]) -> None:
        self.jobs[JobStatus(row["status"])] += int(row["jobs"])
        self.prompt_tokens += int(row["prompt_tokens"])
        self.completion_tokens += int(row["completion_tokens"])
        self.total_tokens += int(row["total_tokens"])
        self.cost_usd += float(row["cost_usd"])
        self.unpriced += int(row["unpriced"])

    def add(self, other: Totals) -> None:
        self.jobs.update(other.jobs)
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.total_tokens += other.total_tokens
        self.cost_usd += other.cost_usd
        self.unpriced += other.unpriced


@dataclass
class Report:
    total: Totals
    days: dict[dt.date, Totals]  # only the days with jobs, in order


def checked_window(start: dt.datetime, end: dt.datetime) -> None:
    if start.tzinfo is None or end.tzinfo is None:
        raise BadUserInput("from and to need a time zone offset, e.g. 2026-11-24T00:00:00Z")
    if not start < end:
        raise BadUserInput("from must be before to")
    if end - start > MAX_WINDOW:
        raise BadUserInput(f"the window may span at most {MAX_WINDOW.days} days")


class Usage:
    def __init__(self, *, redis: AsyncRedis, history: AsyncConnectionPool[Any] | None, timeout_s: float) -> None:
        self.redis = redis
        self.history = history
        self.timeout_s = timeout_s

    async def report(self, *, tenant: str, start: dt.datetime, end: dt.datetime) -> Report:
        """The tenant's jobs created in [start, end), summed."""
        checked_window(start, end)
        days: dict[dt.date, Totals] = {}
        counted = await self._from_redis(tenant, start, end, days)
        if self.history is not None:
            async with history_call(self.timeout_s):
                rows = await history.usage(self.history, tenant=tenant, start=start, end=end, besides=counted)
            for row in rows:
                days.setdefault(row["day"], Totals()).add_row(row)
        total = Totals()
        for day in days.values():
            total.add(day)
        return Report(total=total, days=dict(sorted(days.items())))

    async def _from_redis(
        self, tenant: str, start: dt.datetime, end: dt.datetime, days: dict[dt.date, Totals]
    ) -> list[str]:
        """Adds the jobs Redis holds into `days`; returns their ids (the history leaves them out)."""
        low, high = start.timestamp() * 1000, end.timestamp() * 1000
        async with redis_call(self.timeout_s):
            found: Any = await self.redis.zrangebyscore(keys.tenant_jobs(tenant), low, f"({high}")
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in found]
        counted: list[str] = []
        for at in range(0, len(ids), CHUNK):
            async with redis_call(self.timeout_s):
                records = await store.get_jobs(self.redis, ids[at : at + CHUNK])
            for record in records:
                # Gone (expired since the index was read): the history has it, if anyone does.
                if record is None or record.tenant != tenant or not start <= record.created_at < end:
                    continue
                counted.append(record.id)
                days.setdefault(record.created_at.astimezone(dt.UTC).date(), Totals()).add_job(record)
        return counted
