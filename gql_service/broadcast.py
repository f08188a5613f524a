"""One Redis pub/sub connection per API process, fanned out to in-process subscribers.

Modelled on encode/broadcaster: a single listener task, a dict of channel -> set of
subscriber queues, `async with` for each subscription, reference-counted SUBSCRIBE /
UNSUBSCRIBE. Differences that matter here (DESIGN decisions 3-4):

* `subscribe()` returns only once Redis has *processed* the SUBSCRIBE (a PING sent after
  it on the same connection has come back), so a snapshot read afterwards cannot miss
  an event published in between.
* Queues are bounded and latest-wins: events carry full state, so dropping an older one
  loses nothing but an intermediate version; the terminal event is always the newest.
* When the connection drops, the listener reconnects with backoff, re-subscribes every
  channel and hands each subscriber a RESYNC marker: re-read the snapshot, no gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Final

from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)


class _Resync:
    def __repr__(self) -> str:
        return "RESYNC"


RESYNC: Final = _Resync()
"""Marker delivered after a reconnect: the subscriber must re-read the snapshot."""

_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)


class BroadcastUnavailable(Exception):
    """Redis pub/sub could not be reached in time."""


class Subscription:
    """One subscriber's bounded, latest-wins mailbox."""

    def __init__(self, channel: str, maxsize: int) -> None:
        self.channel = channel
        self._items: deque[bytes | _Resync] = deque()
        self._maxsize = maxsize
        self._ready = asyncio.Event()

    def push(self, item: bytes | _Resync) -> None:
        if item is RESYNC:
            self._items.clear()  # a fresh snapshot supersedes everything queued
        elif len(self._items) >= self._maxsize:
            # Drop the oldest event, but never a pending RESYNC at the head.
            if self._items[0] is RESYNC and len(self._items) > 1:
                del self._items[1]
            else:
                self._items.popleft()
        self._items.append(item)
        self._ready.set()

    async def get(self) -> bytes | _Resync:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    def __aiter__(self) -> AsyncIterator[bytes | _Resync]:
        return self

    async def __anext__(self) -> bytes | _Resync:
        return await self.get()


class Broadcast:
    def __init__(
        self, redis: AsyncRedis, *, queue_size: int = 8, subscribe_timeout_s: float = 5.0, connect_wait_s: float = 1.0
    ) -> None:
        self._redis = redis
        self._queue_size = queue_size
        self._subscribe_timeout_s = subscribe_timeout_s
        # While Redis is down a new subscriber fails after this, instead of hanging.
        self._connect_wait_s = connect_wait_s
        self._subscribers: dict[str, set[Subscription]] = {}
        self._barriers: dict[str, asyncio.Future[None]] = {}
        self._tokens = itertools.count()
        self._pubsub: PubSub | None = None
        self._connected = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="broadcast-listener")

    async def stop(self) -> None:
        self._stopping = True
        if self._pubsub is not None and self._pubsub.connection is not None:
            # Closing the socket ends the listener's blocking read with an error it
            # handles by returning; a bare cancel can be swallowed inside redis-py's read.
            await self._pubsub.connection.disconnect(nowait=True)
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5.0)
        if self._pubsub is not None:
            with contextlib.suppress(*_REDIS_DOWN):
                await self._pubsub.aclose()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subscribers.values())

    # -- subscribing -----------------------------------------------------------
    @contextlib.asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[Subscription]:
        sub = Subscription(channel, self._queue_size)
        subs = self._subscribers.setdefault(channel, set())
        first = not subs
        subs.add(sub)
        try:
            if first:
                await self._send("SUBSCRIBE", channel)
            # Even when the channel was already subscribed, its SUBSCRIBE may still be in
            # flight for the first subscriber: every subscriber waits for the barrier.
            await self._barrier()
            yield sub
        finally:
            subs.discard(sub)
            if not subs and self._subscribers.get(channel) is subs:
                del self._subscribers[channel]
                # While disconnected there is nothing to undo: a reconnect subscribes
                # only the channels still in the dict.
                if self.connected:
                    with contextlib.suppress(*_REDIS_DOWN, BroadcastUnavailable):
                        await self._send("UNSUBSCRIBE", channel)

    async def _send(self, *command: str) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_s)
        except TimeoutError:
            raise BroadcastUnavailable("Redis pub/sub is not connected") from None
        assert self._pubsub is not None
        async with self._write_lock:
            try:
                await self._pubsub.execute_command(*command)
            except _REDIS_DOWN as exc:
                raise BroadcastUnavailable(str(exc)) from exc

    async def _barrier(self) -> None:
        """Wait until Redis has processed everything sent on the pub/sub connection so far."""
        token = f"barrier:{next(self._tokens)}"
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers[token] = fut
        try:
            await self._send("PING", token)
            await asyncio.wait_for(asyncio.shield(fut), self._subscribe_timeout_s)
        except TimeoutError:
            raise BroadcastUnavailable("Redis pub/sub did not answer in time") from None
        finally:
            self._barriers.pop(token, None)

    # -- the listener ------------------------------------------------------------
    async def _connect(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(*_REDIS_DOWN):
                await self._pubsub.aclose()
        self._pubsub = self._redis.pubsub()
        # Subscribing needs at least one channel; this one also keeps the connection
        # in subscribed mode while no job is watched.
        await self._pubsub.subscribe("gqls:broadcast:keepalive", *self._subscribers)
        await self._pubsub.ping("connected")

    async def _run(self) -> None:
        backoff = 0.05
        reconnect = False
        while not self._stopping:
            try:
                await self._connect()
                while not self._stopping:
                    message = await self._pubsub.get_message(timeout=None)  # type: ignore[union-attr]
                    if message is not None:
                        reconnect = self._dispatch(message, reconnect)
                        backoff = 0.05
            except asyncio.CancelledError:
                raise
            except _REDIS_DOWN as exc:
                if self._stopping:
                    return
                if self._connected.is_set():
                    log.warning("pub/sub connection lost (%s); reconnecting", exc)
                self._connected.clear()
                reconnect = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _dispatch(self, message: dict[str, Any], reconnect: bool) -> bool:
        kind = message["type"]
        if kind == "message":
            channel = message["channel"].decode()
            for sub in self._subscribers.get(channel, ()):
                sub.push(message["data"])
        elif kind == "pong":
            token = message["data"].decode()
            if token == "connected":
                # Every SUBSCRIBE sent by _connect is now processed.
                self._connected.set()
                if reconnect:
                    log.info("pub/sub reconnected; %d subscribers resync", self.subscriber_count)
                    for subs in self._subscribers.values():
                        for sub in subs:
                            sub.push(RESYNC)
                return False
            fut = self._barriers.get(token)
            if fut is not None and not fut.done():
                fut.set_result(None)
        return reconnect
