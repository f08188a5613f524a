"""Draining an outbox stream: what a terminal transition queued in the same Lua step.

A transition that ends a job adds an entry to a Redis stream in the same script that
writes the record (store.py), so whatever happens to the process after, the entry is
there. Every worker process runs one `Drainer` per outbox, a consumer of one Redis
consumer group, in a thread of its own (so it works beside any worker class). A batch is
handled, and only then acknowledged and deleted: a drainer killed in between leaves its
entries pending, and another claims them once they have been idle for `claim_after_s`.
While what a batch is handed to is away, the same batch is retried with backoff.

Subclasses say what a batch becomes (`handle`) and which failures mean "try again".
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, ResponseError

from gql_service.redis_conn import async_client
from gql_service.settings import RedisTarget

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes]]
BATCH = 200
MAX_BACKOFF_S = 10.0
READY_WAIT_S = 10.0


class Drainer:
    stream: ClassVar[str]
    group: ClassVar[str]
    # Failures of what `handle` writes to that mean "away for now" (Redis's are always).
    transient: ClassVar[tuple[type[BaseException], ...]] = ()

    def __init__(self, redis: Redis, *, consumer: str, claim_after_s: float = 30.0) -> None:
        self.redis = redis
        self.consumer = consumer
        self.claim_after_s = claim_after_s

    async def handle(self, entries: list[Entry], pipe: Pipeline) -> None:
        """Do what the entries ask; commands queued on `pipe` run in one MULTI with their
        acknowledgement."""
        raise NotImplementedError

    async def idle(self) -> None:
        """Called after every batch (or wait for one): periodic work."""

    async def close(self) -> None:
        """Drop connections to what `handle` writes to (after a failure, and at the end)."""

    async def run(self, stop: asyncio.Event) -> None:
        backoff, grouped = 0.5, False
        while not stop.is_set():
            try:
                if not grouped:
                    await self.ensure_group()
                    grouped = True
                entries = await self._next_batch()
                if entries:
                    async with self.redis.pipeline(transaction=True) as pipe:
                        await self.handle(entries, pipe)
                        ids = [entry_id for entry_id, _ in entries]
                        pipe.xack(self.stream, self.group, *ids)
                        pipe.xdel(self.stream, *ids)
                        await pipe.execute()
                await self.idle()
                backoff = 0.5
            except Exception as exc:
                if isinstance(exc, (OSError, RedisError, *self.transient)):
                    # Away: the entries stay pending, the same batch comes back; the group
                    # is made again in case Redis lost it (a restart).
                    log.warning("%s: %s: %s; retrying in %.1f s", self.group, type(exc).__name__, exc, backoff)
                else:  # a bug: logged whole, and the drainer lives on
                    log.exception("%s: the batch failed; retrying in %.1f s", self.group, backoff)
                grouped = False
                await self.close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
        await self.close()

    async def ensure_group(self) -> None:
        """The stream and its group: from now on, transitions write to it (store.py)."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _next_batch(self) -> list[Entry]:
        """Our own pending entries first (a batch that failed), then ones a dead drainer
        left idle, then new ones (waiting up to a second for them)."""
        mine: Any = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: "0"}, count=BATCH)
        if mine and mine[0][1]:
            return list(mine[0][1])
        idle_ms = int(self.claim_after_s * 1000)
        claimed: Any = await self.redis.xautoclaim(
            self.stream, self.group, self.consumer, min_idle_time=idle_ms, count=BATCH
        )
        if claimed[1]:
            return list(claimed[1])
        new: Any = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=BATCH, block=1000)
        return list(new[0][1]) if new else []


class Background(Protocol):
    """What runs beside a worker's jobs: a drainer, the reconciler."""

    redis: Redis

    async def run(self, stop: asyncio.Event) -> None: ...


def start_in_thread(make: Callable[[Redis], Background], target: RedisTarget, *, name: str) -> Callable[[], None]:
    """`make(redis)` run on an event loop of its own; returns what stops it (waiting up to 10 s).

    A drainer's stream and group exist before this returns (unless Redis does not answer
    within READY_WAIT_S): a transition writes an outbox entry only if its stream exists
    (store.py), so the worker must not end a job before its drainers are there."""
    stopping, ready = threading.Event(), threading.Event()

    async def main() -> None:
        drainer = make(async_client(target, name=f"gqls-{name}"))
        try:
            if isinstance(drainer, Drainer):
                await drainer.ensure_group()
        except (OSError, RedisError) as exc:  # its run() makes it once Redis answers
            log.warning("%s: could not create its stream's group yet: %s", name, exc)
        finally:
            ready.set()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        threading.Thread(target=lambda: (stopping.wait(), loop.call_soon_threadsafe(stop.set)), daemon=True).start()
        try:
            await drainer.run(stop)
        finally:
            await drainer.redis.aclose()

    thread = threading.Thread(target=asyncio.run, args=(main(),), name=name, daemon=True)
    thread.start()
    ready.wait(READY_WAIT_S)

    def stop() -> None:
        stopping.set()
        thread.join(10)

    return stop
