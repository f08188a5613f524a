"""The one outbox consumer: what a terminal transition queued in the same Lua step, done.

A transition that ends a job adds an entry to an outbox stream (keys.OUTBOXES) in the same
script that writes the record (store.py), so whatever happens to the process after, the
entry is there. Every worker process runs one `Drainer` per outbox in use, a consumer of the
outbox's consumer group, in a thread of its own (so it works beside any worker class). An
entry is done, and only then acknowledged and deleted, in one MULTI: a drainer killed in
between leaves it pending, and another claims it once it has been idle for `claim_after_s`.

One entry never holds up the others:
* Entries are done a batch at a time (one PostgreSQL transaction, one MULTI: the fast way),
  and when a batch fails other than transiently, one by one, so the failure is pinned on
  the entries that cause it and the rest go through.
* A poison entry goes to the outbox's dead letters (`keys.Outbox.dead`: its fields, the
  reason, its id), in the same MULTI as its acknowledgement: at once when it can't be read
  or what it holds is refused (`Poison`, `Drainer.poison`); after OUTBOX_MAX_DELIVERIES
  deliveries when it fails in a way nobody foresaw (a bug), or keeps killing the drainer
  that takes it (the count is the stream's own delivery count, from XPENDING). `gql-service
  outbox replay` puts dead letters back once the cause is fixed.
* A transient failure (Redis, the network, PostgreSQL away: `Drainer.transient`) is no
  entry's fault: the batch is held, in memory and pending under this consumer, and tried
  again with backoff. Holding re-claims it without counting a delivery (XCLAIM JUSTID), so
  no outage, however long, makes an entry poison, and no other drainer takes it meanwhile.

Subclasses say what an entry becomes (`parse`, no I/O: any failure there is the entry's)
and what a batch of them does (`handle`), and which failures mean "try again".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, ResponseError
from redis.typing import StreamIdT

from gql_service import keys, store
from gql_service.models import JobRecord
from gql_service.redis_conn import async_client
from gql_service.settings import RedisTarget, Settings

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes]]
BATCH = 200
MAX_BACKOFF_S = 10.0
READY_WAIT_S = 10.0
MAX_REASON_CHARS = 500
# A dead letter is the entry's own fields and these (no outbox entry has a field named so).
DEAD_REASON, DEAD_ID = b"dead:reason", b"dead:id"

T = TypeVar("T")


class Poison(Exception):
    """The entry can never be done as it is: it goes to the dead letters at once."""


def record_of(fields: dict[bytes, bytes]) -> JobRecord:
    """The job record an entry carries (every outbox's entries carry one in `d`)."""
    try:
        return store.decode(fields[b"d"])
    except (KeyError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise Poison(f"not a job record: {type(exc).__name__}: {exc}") from None


def reason(exc: BaseException) -> str:
    said = str(exc) if isinstance(exc, Poison) else f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
    return said[:MAX_REASON_CHARS]


class Drainer(Generic[T]):
    outbox: ClassVar[keys.Outbox]
    # Failures of what `handle` writes to that mean "away for now" (Redis's always do).
    transient: ClassVar[tuple[type[BaseException], ...]] = ()
    # Failures that mean "this entry is refused, and always will be" (`Poison` always does).
    poison: ClassVar[tuple[type[BaseException], ...]] = ()

    def __init__(
        self,
        redis: Redis,
        *,
        consumer: str,
        claim_after_s: float = 30.0,
        max_deliveries: int = 5,
        max_len: int = store.OUTBOX_MAX_LEN,
    ) -> None:
        self.redis = redis
        self.consumer = consumer
        self.claim_after_s = claim_after_s
        self.max_deliveries = max_deliveries
        self.max_len = max_len
        self.backoff = ExponentialBackoff(cap=MAX_BACKOFF_S, base=0.25)

    def parse(self, entry_id: bytes, fields: dict[bytes, bytes]) -> T:
        """What the entry asks for; raising here (anything: no I/O happens here) makes it poison."""
        raise NotImplementedError

    async def handle(self, items: list[T], pipe: Pipeline) -> None:
        """Do what the items ask. Writes to Redis go on `pipe`, to run in one MULTI with the
        entries' acknowledgement; to read first, WATCH on `pipe`, then call `pipe.multi()`."""
        raise NotImplementedError

    async def idle(self) -> None:
        """Called after every batch (or wait for one): periodic work."""

    async def close(self) -> None:
        """Drop connections to what `handle` writes to (after a failure, and at the end)."""

    async def run(self, stop: asyncio.Event) -> None:
        failures, grouped = 0, False
        held: list[Entry] = []  # met a transient failure: tried again as it is
        while not stop.is_set():
            try:
                if not grouped:
                    await self.ensure_group()
                    grouped = True
                if held:  # its deliveries were counted when it was taken
                    held, taken_before = await self._hold(held), False
                else:
                    held, taken_before = await self._next_batch()
                done = await self._drain(held, taken_before=taken_before) if held else True
                await self.idle()
                if done:
                    failures = 0
                    continue
                what = "an entry failed (above); it is taken again"
            except Exception as exc:
                if isinstance(exc, self._transient):
                    what = f"{type(exc).__name__}: {exc}; the batch waits"
                else:  # a bug outside any entry's handling: logged whole, and the drainer lives on
                    log.exception("%s: the drainer failed", self.outbox.name)
                    what, held = "the drainer failed (above)", []
                grouped = False  # made again, in case Redis lost it (a restart)
                await self.close()
            failures += 1
            # Held entries are claimed again in time: no other drainer takes them meanwhile.
            wait = min(self.backoff.compute(failures), self.claim_after_s / 2)
            log.warning("%s outbox: %s; retrying in %.1f s", self.outbox.name, what, wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
        await self.close()

    @property
    def _transient(self) -> tuple[type[BaseException], ...]:
        return (OSError, RedisError, *self.transient)

    @property
    def _poison(self) -> tuple[type[BaseException], ...]:
        return (Poison, *self.poison)

    async def _drain(self, entries: list[Entry], *, taken_before: bool) -> bool:
        """Do `entries`, removing each from the list once it is acknowledged (done or dead);
        False when some failed unexpectedly: they are left pending, to be read again, and
        counted. A transient failure propagates, with what is left in the list.

        `taken_before`: the entries may have been delivered before (their count is read)."""
        delivered = await self._deliveries(entries) if taken_before else {}
        dead: list[tuple[Entry, str]] = []
        parsed: list[tuple[Entry, T]] = []
        for entry in entries:
            times = delivered.get(entry[0], 1)
            if not entry[1]:  # pending while OUTBOX_MAX_LEN trimmed it: nothing is left of it
                dead.append((entry, ""))
            elif times > self.max_deliveries:
                dead.append((entry, f"taken {times} times, never done (OUTBOX_MAX_DELIVERIES {self.max_deliveries})"))
            else:
                try:
                    parsed.append((entry, self.parse(*entry)))
                except Exception as exc:
                    dead.append((entry, reason(exc)))
        if dead:
            await self._bury(dead)
            _remove(entries, [entry for entry, _ in dead])
        if len(parsed) > 1:
            try:
                await self._commit(parsed)
                _remove(entries, [entry for entry, _ in parsed])
                return True
            except self._transient:
                raise
            except Exception as exc:
                log.info("%s outbox: a batch of %d failed (%s); one by one", self.outbox.name, len(parsed), reason(exc))
        all_done = True
        for entry, item in parsed:
            try:
                await self._commit([(entry, item)])
            except self._transient:
                raise
            except self._poison as exc:
                await self._bury([(entry, reason(exc))])
            except Exception:
                log.exception("%s outbox: entry %s failed", self.outbox.name, entry[0].decode())
                all_done = False
            _remove(entries, [entry])
        return all_done

    async def _commit(self, parsed: list[tuple[Entry, T]]) -> None:
        ids = [entry_id for (entry_id, _), _ in parsed]
        async with self.redis.pipeline(transaction=True) as pipe:
            await self.handle([item for _, item in parsed], pipe)
            if pipe.watching and not pipe.explicit_transaction:
                pipe.multi()
            pipe.xack(self.outbox.stream, self.outbox.group, *ids)
            pipe.xdel(self.outbox.stream, *ids)
            await pipe.execute()

    async def _bury(self, dead: list[tuple[Entry, str]]) -> None:
        """Move entries to the dead letters, in one MULTI with their acknowledgement (one
        with no fields left is only acknowledged: there is nothing to replay)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for (entry_id, fields), why in dead:
                if not fields:
                    log.error(
                        "%s outbox: entry %s was trimmed (OUTBOX_MAX_LEN) before it was done", *self._at(entry_id)
                    )
                    continue
                log.error("%s outbox: entry %s is dead-lettered: %s", *self._at(entry_id), why)
                letter = {**fields, DEAD_REASON: why.encode(), DEAD_ID: entry_id}
                pipe.xadd(self.outbox.dead, letter, maxlen=self.max_len, approximate=True)  # type: ignore[arg-type]
            ids = [entry_id for (entry_id, _), _ in dead]
            pipe.xack(self.outbox.stream, self.outbox.group, *ids)
            pipe.xdel(self.outbox.stream, *ids)
            await pipe.execute()

    def _at(self, entry_id: bytes) -> tuple[str, str]:
        return self.outbox.name, entry_id.decode()

    async def ensure_group(self) -> None:
        """The stream and its group: from now on, transitions write to it (store.py)."""
        try:
            await self.redis.xgroup_create(self.outbox.stream, self.outbox.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _next_batch(self) -> tuple[list[Entry], bool]:
        """Our own pending entries first (ones that failed unexpectedly), then ones a dead
        drainer left idle, then new ones (waiting up to a second for them); and whether they
        may have been taken before."""
        stream, group = self.outbox.stream, self.outbox.group
        mine: Any = await self.redis.xreadgroup(group, self.consumer, {stream: "0"}, count=BATCH)
        if mine and mine[0][1]:
            return list(mine[0][1]), True
        idle_ms = int(self.claim_after_s * 1000)
        claimed: Any = await self.redis.xautoclaim(stream, group, self.consumer, min_idle_time=idle_ms, count=BATCH)
        # Redis 6.2 claims an entry trimmed away as (None, None): it comes back through "0".
        taken = [entry for entry in claimed[1] if entry[0] is not None]
        if taken:
            return taken, True
        new: Any = await self.redis.xreadgroup(group, self.consumer, {stream: ">"}, count=BATCH, block=1000)
        return (list(new[0][1]) if new else []), False

    async def _deliveries(self, entries: list[Entry]) -> dict[bytes, int]:
        """How many times each entry has been delivered, this time included."""
        ids = sorted(entry_id for entry_id, _ in entries)
        rows: Any = await self.redis.xpending_range(
            self.outbox.stream, self.outbox.group, min=ids[0], max=ids[-1], count=len(ids), consumername=self.consumer
        )
        return {row["message_id"]: int(row["times_delivered"]) for row in rows}

    async def _hold(self, held: list[Entry]) -> list[Entry]:
        """Keep a held batch ours (its idle time reset, no delivery counted); what another
        drainer has done meanwhile is no longer pending, and drops out."""
        ids: list[StreamIdT] = [entry_id for entry_id, _ in held]
        still: Any = await self.redis.xclaim(self.outbox.stream, self.outbox.group, self.consumer, 0, ids, justid=True)
        pending = set(still)
        return [entry for entry in held if entry[0] in pending]


def _remove(entries: list[Entry], done: list[Entry]) -> None:
    gone = {entry_id for entry_id, _ in done}
    entries[:] = [entry for entry in entries if entry[0] not in gone]


def options(settings: Settings) -> dict[str, Any]:
    """A drainer's settings: ARCHIVE_CLAIM_AFTER_S (every outbox's), OUTBOX_MAX_DELIVERIES, OUTBOX_MAX_LEN."""
    return {
        "claim_after_s": settings.archive_claim_after_s,
        "max_deliveries": settings.outbox_max_deliveries,
        "max_len": settings.outbox_max_len,
    }


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
