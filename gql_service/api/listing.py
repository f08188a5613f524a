"""A tenant's jobs, newest first, in keyset pages: Redis's and the history's as one list."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis as AsyncRedis

from gql_service import history, store
from gql_service.api.calls import history_call, redis_call
from gql_service.models import JobRecord, JobStatus

# Records one `jobs` page may look at when a status filter skips most of them; past it
# the page ends early and says there is more (hasNextPage with the scan's cursor).
MAX_LIST_SCAN = 1000


class Listing:
    def __init__(self, *, redis: AsyncRedis, history: AsyncConnectionPool[Any] | None, timeout_s: float) -> None:
        self.redis = redis
        self.history = history
        self.timeout_s = timeout_s

    async def page(
        self,
        *,
        tenant: str,
        first: int,
        after: tuple[float, str] | None,
        status: JobStatus | None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> tuple[list[tuple[JobRecord, float]], tuple[float, str] | None]:
        """A page of the tenant's jobs, newest first: [(record, created ms)], and where the
        next page starts (None at the end). With the history on, Redis's jobs and the
        history's are one list (a job in both is shown as Redis has it, the newer).

        A status filter never hides a match: when the scan bound is reached before the page
        is full, the page ends early and the cursor points past what was scanned.
        """
        window = _Window(status, created_after, created_before)
        live, bound = await self._list_live(tenant, first, after, window)
        if self.history is None:
            return live, bound
        archived = await self._list_archived(tenant, first, after, window)
        merged = {r.id: (r, created_ms(r)) for r in archived} | {r.id: (r, ms) for r, ms in live}
        # Redis was scanned down to `bound` (None: to its end): nothing older may be shown yet.
        candidates = sorted(
            (item for item in merged.values() if bound is None or (item[1], item[0].id) >= bound),
            key=lambda item: (item[1], item[0].id),
            reverse=True,
        )
        page = candidates[:first]
        if len(candidates) > first:
            return page, (page[-1][1], page[-1][0].id)
        return page, bound

    async def _list_live(
        self, tenant: str, first: int, after: tuple[float, str] | None, window: _Window
    ) -> tuple[list[tuple[JobRecord, float]], tuple[float, str] | None]:
        page: list[tuple[JobRecord, float]] = []
        cursor = after
        scanned = 0
        async with redis_call(self.timeout_s):
            while True:
                batch = await store.list_job_ids(self.redis, tenant, before=cursor, count=max(first + 1, 50))
                if not batch:
                    return page, None
                records = await store.get_jobs(self.redis, [job_id for job_id, _ in batch])
                for (job_id, score), record in zip(batch, records, strict=True):
                    if window.ended_before(score):
                        return page, None  # newest first: the rest is older still
                    if record is not None and window.holds(record):
                        if len(page) == first:
                            return page, cursor  # one more match exists: the page ends at the last one
                        page.append((record, score))
                    cursor = (score, job_id)
                    scanned += 1
                    if scanned >= MAX_LIST_SCAN:
                        return page, cursor

    async def _list_archived(
        self, tenant: str, first: int, after: tuple[float, str] | None, window: _Window
    ) -> list[JobRecord]:
        assert self.history is not None
        # The cursor's float ms back to the exact microsecond PostgreSQL keeps (a float's
        # error here is under 0.4 µs, so rounding finds it).
        before = (EPOCH + timedelta(microseconds=round(after[0] * 1000)), after[1]) if after else None
        async with history_call(self.timeout_s):
            return await history.page(
                self.history, tenant=tenant, before=before, count=first + 1, status=window.status,
                created_after=window.created_after, created_before=window.created_before,
            )  # fmt: skip


@dataclass(frozen=True)
class _Window:
    """What a `jobs` listing asks for besides its position."""

    status: JobStatus | None
    created_after: datetime | None
    created_before: datetime | None

    def holds(self, record: JobRecord) -> bool:
        return (
            (self.status is None or record.status is self.status)
            and (self.created_after is None or record.created_at >= self.created_after)
            and (self.created_before is None or record.created_at < self.created_before)
        )

    def ended_before(self, created_ms: float) -> bool:
        return self.created_after is not None and created_ms < self.created_after.timestamp() * 1000


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def created_ms(record: JobRecord) -> float:
    """A job's place in listings and cursors, as `store.index_job` scores it."""
    return record.created_at.timestamp() * 1000
