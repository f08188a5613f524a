"""The job history in PostgreSQL (`DATABASE_URL`): ended jobs, kept for ARCHIVE_RETENTION_DAYS.

Plain SQL through psycopg 3: one table, a handful of statements, each clearer as SQL than
through an ORM. The table is created by the migrations (gql_service/migrations, Alembic).
Every function takes its connection or pool as an argument.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from gql_service.models import JobRecord, JobStatus

COLUMNS = (
    "id", "tenant", "status", "stage", "version", "created_at", "updated_at", "started_at", "finished_at",
    "attempts", "model", "result", "error", "usage", "cost_usd", "priority", "request_id", "text",
)  # fmt: skip

# Idempotent: a row written twice (a drainer that died before acknowledging) is written
# once; an older version never overwrites a newer one.
_UPSERT = f"""
INSERT INTO jobs ({", ".join(COLUMNS)})
VALUES ({", ".join(f"%({c})s" for c in COLUMNS)})
ON CONFLICT (id) DO UPDATE SET {", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS if c != "id")}
WHERE jobs.version < EXCLUDED.version
"""


def row(record: JobRecord, text: str | None) -> dict[str, Any]:
    data = record.model_dump(mode="json")
    return {
        **{c: data.get(c) for c in COLUMNS if c not in ("result", "error", "usage", "text")},
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "result": Jsonb(data["result"]) if record.result else None,
        "error": Jsonb(data["error"]) if record.error else None,
        "usage": Jsonb(data["usage"]) if record.usage else None,
        "text": text,
    }


def pool(url: str, *, timeout_s: float) -> AsyncConnectionPool[Any]:
    """A pool of connections for reading the history (not opened yet). Each connection is
    checked as it leaves the pool (an empty query: one round trip per history read): one
    that died with the server (a restart, a failover) is replaced, not handed to a read
    that would fail with it."""

    async def check(conn: AsyncConnection[Any]) -> None:
        try:
            await AsyncConnectionPool.check_connection(conn)
        except psycopg.Error:
            # The others idle beside it most likely died with it: they are all tested now.
            # Left to the checkout, they would be tried one at a time with its backoff
            # (at once, then after 1 s, then 2 s), and a third dead one outlasts the read.
            await connections.check()
            raise

    connections: AsyncConnectionPool[Any] = AsyncConnectionPool(
        url, min_size=1, max_size=4, open=False, timeout=timeout_s, check=check,
        kwargs={"connect_timeout": max(1, int(timeout_s))},
    )  # fmt: skip
    return connections


def record_of(found: dict[str, Any]) -> JobRecord:
    # A row archived before the priority column (0003) has none: unknown (None), not NORMAL.
    return JobRecord.model_validate({k: v for k, v in found.items() if k != "text"})


async def upsert(conn: AsyncConnection[Any], rows: Iterable[dict[str, Any]]) -> None:
    """Write these rows in one transaction: all of them are committed, or none."""
    async with conn.transaction(), conn.cursor() as cur:
        await cur.executemany(_UPSERT, list(rows))


_SELECT = f"SELECT {', '.join(c for c in COLUMNS if c != 'text')} FROM jobs"


async def get_many(pool: AsyncConnectionPool[Any], job_ids: list[str], *, tenant: str) -> dict[str, JobRecord]:
    async with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(f"{_SELECT} WHERE id = ANY(%s) AND tenant = %s", (job_ids, tenant))
        return {r["id"]: record_of(r) for r in await cur.fetchall()}


async def page(
    pool: AsyncConnectionPool[Any],
    *,
    tenant: str,
    before: tuple[datetime, str] | None,
    count: int,
    status: JobStatus | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
) -> list[JobRecord]:
    """Up to `count` jobs, newest first, strictly after the keyset position `before`
    (created_at, id): the index (tenant, created_at DESC, id DESC) serves every page."""
    where: list[str] = ["tenant = %s"]
    args: list[object] = [tenant]
    if before is not None:
        where.append("(created_at, id) < (%s, %s)")
        args += [before[0], before[1]]
    if status is not None:
        where.append("status = %s")
        args.append(status.value)
    if created_after is not None:
        where.append("created_at >= %s")
        args.append(created_after)
    if created_before is not None:
        where.append("created_at < %s")
        args.append(created_before)
    query = f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY created_at DESC, id DESC LIMIT %s"
    async with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, (*args, count))
        return [record_of(r) for r in await cur.fetchall()]


# Per UTC day of creation and status: jobs, tokens, cost, and jobs whose model had no price.
# The range on created_at within a tenant is the index jobs_tenant_created's.
_USAGE = """
SELECT (created_at AT TIME ZONE 'UTC')::date AS day, status, count(*) AS jobs,
       coalesce(sum((usage->>'prompt_tokens')::bigint), 0) AS prompt_tokens,
       coalesce(sum((usage->>'completion_tokens')::bigint), 0) AS completion_tokens,
       coalesce(sum((usage->>'total_tokens')::bigint), 0) AS total_tokens,
       coalesce(sum(cost_usd), 0) AS cost_usd,
       count(*) FILTER (WHERE cost_usd IS NULL) AS unpriced
FROM jobs
WHERE tenant = %s AND created_at >= %s AND created_at < %s AND NOT (id = ANY(%s))
GROUP BY 1, 2
"""


async def usage(
    pool: AsyncConnectionPool[Any], *, tenant: str, start: datetime, end: datetime, besides: list[str]
) -> list[dict[str, Any]]:
    """The tenant's jobs created in [start, end) summed by UTC day and status, leaving out the
    jobs `besides` (those counted from Redis: gql_service.api.usage)."""
    async with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_USAGE, (tenant, start, end, besides))
        return list(await cur.fetchall())


async def delete_older(conn: AsyncConnection[Any], *, days: int) -> int:
    """Remove the jobs that ended more than `days` ago; returns how many."""
    async with conn.transaction(), conn.cursor() as cur:
        await cur.execute("DELETE FROM jobs WHERE finished_at < now() - make_interval(days => %s)", (days,))
        return cur.rowcount
