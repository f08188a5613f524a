"""Drains the archive outbox into the PostgreSQL history.

The terminal transition and its outbox entry are one Lua call (store.py), so an ended job
is always in the outbox, whatever happens to the process after. Every worker process runs
one drainer, a consumer of one Redis consumer group, in a thread of its own (so it works
beside any worker class). A batch is upserted in one PostgreSQL transaction, and only
then acknowledged and deleted from the stream: a drainer killed in between leaves its
entries pending, and another drainer claims them once they have been idle for
ARCHIVE_CLAIM_AFTER_S. While PostgreSQL is down, the same batch is retried with backoff.

Retention runs here too: at most once an hour across the cluster (a Redis lock), the rows
that ended more than ARCHIVE_RETENTION_DAYS ago are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any

import psycopg
from psycopg import AsyncConnection
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from . import history, keys, store
from .redis_conn import async_client
from .settings import Settings

log = logging.getLogger(__name__)

GROUP = "archivers"
BATCH = 200
RETENTION_EVERY_S = 3600
MAX_BACKOFF_S = 10.0


class Archiver:
    def __init__(
        self,
        redis: Redis,
        database_url: str,
        *,
        consumer: str,
        keep_text: bool = True,
        retention_days: int = 30,
        claim_after_s: float = 30.0,
    ) -> None:
        self.redis = redis
        self.database_url = database_url
        self.consumer = consumer
        self.keep_text = keep_text
        self.retention_days = retention_days
        self.claim_after_s = claim_after_s
        self._conn: AsyncConnection[Any] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        backoff, grouped, next_retention = 0.5, False, 0.0
        while not stop.is_set():
            try:
                if not grouped:
                    await self._ensure_group()
                    grouped = True
                entries = await self._next_batch()
                if entries:
                    await self._write(entries)
                    await self._acknowledge([entry_id for entry_id, _ in entries])
                if time.monotonic() >= next_retention:
                    await self._retention()
                    next_retention = time.monotonic() + RETENTION_EVERY_S
                backoff = 0.5
            except (psycopg.Error, OSError, RedisError) as exc:
                # PostgreSQL or Redis away: the entries stay pending, the same batch comes
                # back; the group is made again in case Redis lost it (a restart).
                log.warning("archive: %s: %s; retrying in %.1f s", type(exc).__name__, exc, backoff)
                grouped = False
                await self._close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
        await self._close()

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(keys.ARCHIVE_OUTBOX, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _next_batch(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Our own pending entries first (a batch that failed), then ones a dead drainer
        left idle, then new ones (waiting up to a second for them)."""
        outbox = keys.ARCHIVE_OUTBOX
        mine: Any = await self.redis.xreadgroup(GROUP, self.consumer, {outbox: "0"}, count=BATCH)
        if mine and mine[0][1]:
            return list(mine[0][1])
        idle_ms = int(self.claim_after_s * 1000)
        claimed: Any = await self.redis.xautoclaim(outbox, GROUP, self.consumer, min_idle_time=idle_ms, count=BATCH)
        if claimed[1]:
            return list(claimed[1])
        new: Any = await self.redis.xreadgroup(GROUP, self.consumer, {outbox: ">"}, count=BATCH, block=1000)
        return list(new[0][1]) if new else []

    async def _connection(self) -> AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self.database_url, connect_timeout=5)
        return self._conn

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            with contextlib.suppress(psycopg.Error):
                await conn.close()

    async def _write(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        rows = []
        for _, fields in entries:
            record = store.decode(fields[b"d"])
            text = fields.get(b"t", b"").decode() if self.keep_text else None
            rows.append(history.row(record, text))
        await history.upsert(await self._connection(), rows)

    async def _acknowledge(self, entry_ids: list[bytes]) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(keys.ARCHIVE_OUTBOX, GROUP, *entry_ids)
            pipe.xdel(keys.ARCHIVE_OUTBOX, *entry_ids)
            await pipe.execute()

    async def _retention(self) -> None:
        if not await self.redis.set(keys.ARCHIVE_RETENTION_LOCK, self.consumer, nx=True, ex=RETENTION_EVERY_S):
            return
        deleted = await history.delete_older(await self._connection(), days=self.retention_days)
        if deleted:
            log.info("archive: deleted %d job(s) older than %d days", deleted, self.retention_days)


def start_in_thread(redis_url: str, settings: Settings, *, consumer: str) -> tuple[threading.Thread, threading.Event]:
    """A drainer on an event loop of its own; set the event to stop it."""
    assert settings.database_url is not None
    stopping = threading.Event()
    archiver = Archiver(
        async_client(redis_url, name="gqls-archiver"), settings.database_url, consumer=consumer,
        keep_text=settings.archive_text, retention_days=settings.archive_retention_days,
        claim_after_s=settings.archive_claim_after_s,
    )  # fmt: skip

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        threading.Thread(target=lambda: (stopping.wait(), loop.call_soon_threadsafe(stop.set)), daemon=True).start()
        try:
            await archiver.run(stop)
        finally:
            await archiver.redis.aclose()

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="archiver", daemon=True)
    thread.start()
    return thread, stopping
