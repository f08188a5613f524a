"""One Redis pub/sub connection per API process, fanned out to in-process subscribers.

Modelled on encode/broadcaster: a single listener task, a dict of channel -> set of
subscriber mailboxes, `async with` for each subscription, reference-counted SUBSCRIBE /
UNSUBSCRIBE. Differences that matter here (DESIGN decisions 3-4):

* `subscribe()` returns only once Redis has *processed* the SUBSCRIBE (a PING sent after
  it on the same connection has come back), so a snapshot read afterwards cannot miss
  an event published in between.
* Mailboxes are bounded and latest-wins per channel: events carry full state, so dropping
  an older one loses nothing but an intermediate version; the terminal event is always
  the newest. One mailbox may watch many channels (`jobsUpdates`).
* Every (re)connection is ours: redis-py's own retries are off on this connection and a
  reconnect it makes by itself (it re-subscribes silently when a read finds the socket
  closed) is caught by a connect callback and turned into a full reconnect. After any
  reconnect every subscriber gets a RESYNC marker: re-read the snapshot, no gap.
* A half-open connection is detected: when nothing has arrived for `health_check_s`, a
  PING goes out; no reply within another `health_check_s` counts as a drop.
* The listener never ends while the service runs: any error, whatever its kind, is
  logged and followed by a reconnect; `connected` is false until the link works again,
  and readiness reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Any, Final

from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gql_service import redis_conn

log = logging.getLogger(__name__)


class _Resync:
    def __repr__(self) -> str:
        return "RESYNC"


RESYNC: Final = _Resync()
"""Marker delivered after a reconnect: the subscriber must re-read its snapshots."""

KEEPALIVE_CHANNEL = "gqls:broadcast:keepalive"


class BroadcastUnavailable(Exception):
    """Redis pub/sub could not be reached in time."""


class Subscription:
    """One subscriber's mailbox over one or more channels: bounded, latest-wins per channel."""

    def __init__(self, channels: Iterable[str], per_channel: int, *, latest_only: Iterable[str] = ()) -> None:
        self.channels = tuple(dict.fromkeys(channels))
        self._items: deque[tuple[str, bytes] | _Resync] = deque()
        self._counts: dict[str, int] = {}
        self._per_channel = per_channel
        # Channels whose newest message makes the older ones worthless (interim frames).
        self._latest_only = frozenset(latest_only)
        self._ready = asyncio.Event()

    def push(self, channel: str, data: bytes) -> None:
        limit = 1 if channel in self._latest_only else self._per_channel
        if self._counts.get(channel, 0) >= limit:
            # Drop this channel's oldest event; other channels' events (their terminal
            # states among them) are never pushed out by a busy neighbour.
            for i, item in enumerate(self._items):
                if not isinstance(item, _Resync) and item[0] == channel:
                    del self._items[i]
                    break
        else:
            self._counts[channel] = self._counts.get(channel, 0) + 1
        self._items.append((channel, data))
        self._ready.set()

    def resync(self) -> None:
        # A fresh snapshot supersedes everything queued.
        self._items.clear()
        self._counts.clear()
        self._items.append(RESYNC)
        self._ready.set()

    async def get(self) -> tuple[str, bytes] | _Resync:
        if self._items:
            # A turn of the loop per event, even when one is waiting: a subscriber behind by
            # many events would otherwise render and send them all in one turn, and every
            # other request wait for it (measured: a 2.8 s /healthz behind 9 of them).
            await asyncio.sleep(0)
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if not isinstance(item, _Resync):
            self._counts[item[0]] -= 1
        return item


class Broadcast:
    def __init__(
        self,
        redis: AsyncRedis,
        *,
        queue_size: int = 8,
        timeout_s: float = 2.0,
        health_check_s: float = 5.0,
    ) -> None:
        # `redis` must not retry by itself (redis_conn.async_client(retries=0)): a retry
        # would reconnect behind our back.
        self._redis = redis
        self._queue_size = queue_size
        # Subscribing (waiting for the link, the SUBSCRIBE and its barrier) fails after this.
        self._timeout_s = timeout_s
        self._health_check_s = health_check_s
        self._subscribers: dict[str, set[Subscription]] = {}
        self._barriers: dict[str, asyncio.Future[None]] = {}
        self._tokens = itertools.count()
        self._pubsub: PubSub | None = None
        self._connected = asyncio.Event()
        self._reconnected_behind_our_back = False
        self._write_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._ever_connected = False  # then a new link resyncs what its gap may have missed
        self.reconnects = 0  # how many times the link came back (tests and logs)

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="broadcast-listener")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5.0)
        await self._close()

    @property
    def connected(self) -> bool:
        """Whether subscriptions work right now: the listener runs and its link is up."""
        return self._connected.is_set() and self._task is not None and not self._task.done()

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subscribers.values())

    # -- subscribing -----------------------------------------------------------
    @contextlib.asynccontextmanager
    async def subscribe(self, *channels: str, latest_only: Iterable[str] = ()) -> AsyncIterator[Subscription]:
        """Watch `channels` until the block ends; raises BroadcastUnavailable if Redis can't be
        reached. Of the `latest_only` ones, a slow subscriber gets only the newest message."""
        sub = Subscription(channels, self._queue_size, latest_only=latest_only)
        new = []
        for channel in sub.channels:
            subs = self._subscribers.setdefault(channel, set())
            if not subs:
                new.append(channel)
            subs.add(sub)
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that arrives as the inner wait completes, leaving a
            # subscription running after its client sent `complete`.
            async with asyncio.timeout(self._timeout_s):
                if new:
                    await self._send("SUBSCRIBE", *new)
                # Even when a channel was already subscribed, its SUBSCRIBE may still be in
                # flight for an earlier subscriber: every subscriber waits for the barrier.
                await self._barrier()
        except TimeoutError:
            self._forget(sub)
            raise BroadcastUnavailable("Redis pub/sub did not answer in time") from None
        except BaseException:
            self._forget(sub)
            raise
        try:
            yield sub
        finally:
            gone = self._forget(sub)
            # While disconnected there is nothing to undo: a reconnect subscribes only the
            # channels still in the dict.
            if gone and self._connected.is_set():
                await self._unsubscribe(gone)

    async def _unsubscribe(self, channels: list[str]) -> None:
        """Best effort, and never the leaving subscriber's concern: it may have sent its
        last frame already (a job's end), and anything raised here reached its client as
        one more frame, an error, after the end. An UNSUBSCRIBE that can't be sent leaves
        nothing behind: the link is broken, and its reconnect subscribes only the channels
        still watched (or, the link being fine after all, messages for these channels find
        no subscriber until then)."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._send("UNSUBSCRIBE", *channels)
        except (BroadcastUnavailable, TimeoutError) as exc:
            log.info("UNSUBSCRIBE of %d channel(s) not sent: %s", len(channels), exc or type(exc).__name__)
        except Exception:
            log.exception("UNSUBSCRIBE of %d channel(s) failed", len(channels))

    def _forget(self, sub: Subscription) -> list[str]:
        """Remove a subscriber; returns the channels nobody watches any more."""
        gone = []
        for channel in sub.channels:
            subs = self._subscribers.get(channel)
            if subs is None:
                continue
            subs.discard(sub)
            if not subs:
                del self._subscribers[channel]
                gone.append(channel)
        return gone

    async def _send(self, *command: str) -> None:
        await self._connected.wait()
        pubsub = self._pubsub
        assert pubsub is not None
        async with self._write_lock:
            try:
                await pubsub.execute_command(*command)
            except (RedisError, OSError, RuntimeError) as exc:
                # RuntimeError: uvloop's, writing to a socket closed under us ("unable to
                # perform operation on <TCPTransport closed=True ...>") before the listener
                # has noticed the drop. The link is gone all the same.
                raise BroadcastUnavailable(str(exc)) from exc

    async def _barrier(self) -> None:
        """Wait until Redis has processed everything sent on the pub/sub connection so far."""
        token = f"barrier:{next(self._tokens)}"
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers[token] = fut
        try:
            await self._send("PING", token)
            await fut
        finally:
            self._barriers.pop(token, None)

    # -- the listener ------------------------------------------------------------
    def _on_reconnect(self, connection: Connection) -> None:
        # redis-py reconnected this pub/sub by itself (a read found the socket closed): it
        # re-subscribed, but events published in the gap are lost. Make it a real drop.
        self._reconnected_behind_our_back = True

    async def _close(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is None:
            return
        if pubsub.connection is not None:
            pubsub.connection.deregister_connect_callback(self._on_reconnect)
        with contextlib.suppress(RedisError, OSError, RuntimeError):  # RuntimeError: uvloop's, as in _send
            async with asyncio.timeout(self._timeout_s):
                await pubsub.aclose()

    async def _connect(self) -> PubSub:
        await self._close()
        self._reconnected_behind_our_back = False
        pubsub = self._redis.pubsub()
        self._pubsub = pubsub
        async with asyncio.timeout(self._timeout_s):
            # Subscribing needs at least one channel; this one also keeps the connection
            # in subscribed mode while no job is watched.
            await pubsub.subscribe(KEEPALIVE_CHANNEL, *list(self._subscribers))
            assert pubsub.connection is not None
            pubsub.connection.register_connect_callback(self._on_reconnect)
            # Answered only after every SUBSCRIBE above. While Redis is still loading its
            # data set it answers -LOADING instead, which ends this attempt.
            await pubsub.ping("connected")
        return pubsub

    async def _run(self) -> None:
        # A session connects and listens until its link is lost; the one outage policy
        # spaces the sessions out (jittered backoff up to 2 s).
        outage = redis_conn.Outage("pub/sub listener", log, errors=(Exception,), on_failure=self._lost)
        await outage.call(self._session)

    async def _session(self) -> None:
        pubsub = await self._connect()
        await self._listen(pubsub, resync=self._ever_connected)

    def _lost(self, exc: Exception, attempt: int) -> None:
        """A session ended by `exc`: whatever ended the link, the listener carries on."""
        if self._stopping:
            return
        if self._connected.is_set():
            log.warning("pub/sub connection lost (%s: %s); reconnecting", type(exc).__name__, exc)
        elif not isinstance(exc, (RedisError, OSError, TimeoutError)):
            log.error("pub/sub listener failed; reconnecting", exc_info=exc)
        self._ever_connected = self._ever_connected or self._connected.is_set()
        self._connected.clear()
        self._fail_barriers()

    async def _listen(self, pubsub: PubSub, *, resync: bool) -> None:
        last_seen = time.monotonic()
        pinged = False
        while not self._stopping:
            message = await pubsub.get_message(timeout=self._health_check_s)
            if self._reconnected_behind_our_back:
                raise RedisConnectionError("redis-py reconnected the pub/sub connection by itself")
            now = time.monotonic()
            if message is not None:
                last_seen, pinged = now, False
                if self._dispatch(message, resync=resync):
                    resync = False
                continue
            if now - last_seen < self._health_check_s:
                continue
            if pinged:
                raise RedisConnectionError(f"no reply from Redis pub/sub in {now - last_seen:.1f} s")
            async with self._write_lock, asyncio.timeout(self._timeout_s):
                await pubsub.execute_command("PING", "health")
            pinged = True

    def _fail_barriers(self) -> None:
        for fut in self._barriers.values():
            if not fut.done():
                fut.set_exception(BroadcastUnavailable("Redis pub/sub connection lost"))

    def _dispatch(self, message: dict[str, Any], *, resync: bool) -> bool:
        """Handle one message; True once the link is (re)established."""
        kind = message["type"]
        if kind == "message":
            channel = message["channel"].decode()
            for sub in self._subscribers.get(channel, ()):
                sub.push(channel, message["data"])
        elif kind == "pong":
            token = message["data"].decode()
            if token == "connected":
                # Every SUBSCRIBE sent by _connect is now processed.
                self._connected.set()
                if resync:
                    self.reconnects += 1
                    subs = {sub for group in self._subscribers.values() for sub in group}
                    log.info("pub/sub reconnected; %d subscribers resync", len(subs))
                    for sub in subs:
                        sub.resync()
                return True
            fut = self._barriers.get(token)
            if fut is not None and not fut.done():
                fut.set_result(None)
        return False
