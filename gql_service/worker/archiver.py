"""Drains the archive outbox into the PostgreSQL history.

The terminal transition and its outbox entry are one Lua call (store.py); the drainer
(gql_service.worker.outbox) upserts a batch in one PostgreSQL transaction, and only then
acknowledges it. While PostgreSQL is down, the same batch is retried with backoff; a row
PostgreSQL refuses (a NUL in a text, a value out of range) is dead-lettered, alone.

Retention runs here too: at most once an hour across the cluster (a Redis lock), the rows
that ended more than ARCHIVE_RETENTION_DAYS ago are deleted.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import AsyncConnection
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from gql_service import history, keys
from gql_service.models import JobTrace
from gql_service.settings import RedisTarget, Settings
from gql_service.worker import outbox, outbox_spans

log = logging.getLogger(__name__)

RETENTION_EVERY_S = 3600
Archived = tuple[dict[str, Any], JobTrace | None]  # a job's row, and the trace its spans link to


class Archiver(outbox.Drainer[Archived]):
    outbox = keys.ARCHIVE
    # PostgreSQL away or restarting, or its schema not the one this code writes (a migration
    # not run yet): every entry would fail alike, so they wait.
    transient = (psycopg.OperationalError, psycopg.InterfaceError, psycopg.ProgrammingError)
    # What PostgreSQL refuses in the row itself, and always will.
    poison = (psycopg.DataError, psycopg.IntegrityError)

    def __init__(
        self,
        redis: Redis,
        database_url: str,
        *,
        consumer: str,
        keep_text: bool = True,
        retention_days: int = 30,
        **options: Any,
    ) -> None:
        super().__init__(redis, consumer=consumer, **options)
        self.database_url = database_url
        self.keep_text = keep_text
        self.retention_days = retention_days
        self._conn: AsyncConnection[Any] | None = None
        self._next_retention = 0.0

    def parse(self, entry_id: bytes, fields: dict[bytes, bytes]) -> Archived:
        text = fields.get(b"t", b"").decode() if self.keep_text else None
        record = outbox.record_of(fields)
        return history.row(record, text), record.trace

    async def handle(self, items: list[Archived], pipe: Pipeline) -> None:
        with outbox_spans.archive_span([(row["id"], trace) for row, trace in items]) as span:
            conn = await self._connection()
            if span.is_recording():
                outbox_spans.database(span, conn.info.host, conn.info.port)
            await history.upsert(conn, [row for row, _ in items])

    async def idle(self) -> None:
        if time.monotonic() >= self._next_retention:
            await self._retention()
            self._next_retention = time.monotonic() + RETENTION_EVERY_S

    async def _connection(self) -> AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self.database_url, connect_timeout=5)
        return self._conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            with contextlib.suppress(psycopg.Error):
                await conn.close()

    async def _retention(self) -> None:
        if not await self.redis.set(keys.ARCHIVE_RETENTION_LOCK, self.consumer, nx=True, ex=RETENTION_EVERY_S):
            return
        deleted = await history.delete_older(await self._connection(), days=self.retention_days)
        if deleted:
            log.info("archive: deleted %d job(s) older than %d days", deleted, self.retention_days)


def start_in_thread(target: RedisTarget, settings: Settings, *, consumer: str) -> Callable[[], None]:
    """The worker process's drainer of the archive outbox; returns what stops it."""
    assert settings.database_url is not None
    database_url = settings.database_url

    def make(redis: Redis) -> Archiver:
        return Archiver(
            redis, database_url, consumer=consumer, keep_text=settings.archive_text,
            retention_days=settings.archive_retention_days, **outbox.options(settings),
        )  # fmt: skip

    return outbox.start_in_thread(make, target, name="archiver")
