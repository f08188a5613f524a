"""Interim frames: the extraction as far as the model has written it, for the subscribers
that asked for it (`jobUpdates(id, partial: true)`).

A frame is `{"id", "version", "seq", "partial"}` on the job's own channel
(`keys.job_partials`), never in the job record: `version` is the record's version while the
call runs (a frame is not a new version) and `seq` increases within an attempt, so a client
orders frames by (version, seq). At most one frame per job per PARTIAL_INTERVAL_MS goes out,
the latest text winning.

Nobody watching costs nothing: the worker publishes only while the job's frame channel has
subscribers. It learns that from the transition that starts the call (the Lua script
answers the channel's subscriber count, see `store.transition`), from a PUBLISH that
reached nobody (everyone left: stop), and from `Demand`, which hears the API name a job that
a `partial: true` subscriber has just begun to watch (start, with the latest frame at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from gql_service import keys, redis_conn
from gql_service.models import PartialExtraction
from gql_service.partial_json import parse_partial

log = logging.getLogger(__name__)


def encode_frame(job_id: str, version: int, seq: int, partial: PartialExtraction) -> bytes:
    return orjson.dumps({"id": job_id, "version": version, "seq": seq, "partial": partial.model_dump(mode="json")})


def decode_frame(raw: bytes) -> tuple[str, int, int, PartialExtraction]:
    frame = orjson.loads(raw)
    return frame["id"], frame["version"], frame["seq"], PartialExtraction.model_validate(frame["partial"])


async def ask_for_frames(redis: Redis, job_ids: list[str]) -> None:
    """The API, once subscribed to these jobs' frame channels: whoever runs them, publish."""
    await redis.publish(keys.PARTIALS_WANTED, " ".join(job_ids))


class PartialStream:
    """One attempt's interim frames. `feed` takes the model's text as it streams in (from
    the provider, on the event loop); a task publishes what is due."""

    def __init__(self, redis: Redis, job_id: str, *, interval_s: float, demand: Demand | None = None) -> None:
        self.redis = redis
        self.job_id = job_id
        self.interval_s = interval_s
        self.demand = demand
        self.wanted = False
        self.published = 0  # frames sent (tests and benchmarks)
        self._seq = 0
        self._version = 0
        self._parts: list[str] = []
        self._dirty = asyncio.Event()
        self._last = 0.0  # time.monotonic() of the last frame
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PartialStream:
        # Heard for the whole job, not only while a call runs: a subscriber who comes after
        # the transition that starts a call counted the watchers, but before the call goes
        # out (waiting for a slot, a pause, the minute's budget), must not go unheard.
        if self.demand is not None:
            self.demand.register(self)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.end()
        if self.demand is not None:
            self.demand.unregister(self)

    def begin(self, version: int, *, watchers: int) -> None:
        """A call starts while the record is at `version`, `watchers` subscribers wanting frames
        when it was written (or someone asked since: a frame that reaches nobody says if not)."""
        self._version, self._parts = version, []
        self.wanted = self.wanted or watchers > 0
        self._dirty.clear()
        self._task = asyncio.create_task(self._publish_when_due(), name=f"partials-{self.job_id}")

    async def end(self) -> None:
        """The call is over (its result or error is the next transition): no more frames."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def feed(self, text: str) -> None:
        self._parts.append(text)
        if self.wanted:
            self._dirty.set()

    def want(self) -> None:
        """Someone has just started to watch: the latest frame goes out now."""
        self.wanted = True
        self._last = 0.0
        if self._parts:
            self._dirty.set()

    async def _publish_when_due(self) -> None:
        while True:
            await self._dirty.wait()
            due = self._last + self.interval_s - time.monotonic()
            if due > 0:
                await asyncio.sleep(due)  # latest wins: what arrives meanwhile joins this frame
            self._dirty.clear()
            text = "".join(self._parts)
            self._parts = [text]
            partial = parse_partial(text)
            if partial is None or not self.wanted:
                continue
            self._seq += 1
            frame = encode_frame(self.job_id, self._version, self._seq, partial)
            self._last = time.monotonic()
            try:
                receivers = await self.redis.publish(keys.job_partials(self.job_id), frame)
            except RedisError as exc:  # a frame is worth no failed job: the next one may go
                log.debug("job %s: interim frame not published: %s", self.job_id, exc)
                continue
            self.published += 1
            if receivers == 0:
                self.wanted = False  # everyone left; Demand says when someone comes back


class Demand:
    """One worker process's ear for "someone now watches job X's frames" (keys.PARTIALS_WANTED),
    passed on to the job's running `PartialStream`. One pub/sub connection per process, shared
    by every job on its event loop."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._streams: dict[str, PartialStream] = {}
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    def register(self, stream: PartialStream) -> None:
        self._streams[stream.job_id] = stream

    def unregister(self, stream: PartialStream) -> None:
        if self._streams.get(stream.job_id) is stream:
            del self._streams[stream.job_id]

    def heard(self, job_ids: list[str]) -> None:
        """The API names jobs a `partial: true` subscriber has just begun to watch."""
        for job_id in job_ids:
            stream = self._streams.get(job_id)
            if stream is not None:
                stream.want()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="partials-demand")
        # Not waited for long: without the link a late subscriber gets frames from the next
        # call on, and the jobs themselves never wait for it.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await self._subscribed.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen(self) -> None:
        # One session per link; the one outage policy waits out Redis between them.
        await redis_conn.Outage(
            "partials: pub/sub", log, every_attempt=True, cap_s=5.0, errors=(RedisError, OSError)
        ).call(self._session)

    async def _session(self) -> None:
        pubsub: PubSub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(keys.PARTIALS_WANTED)
            self._subscribed.set()
            while True:
                # A bounded wait, so that redis-py's health check (a PING every 30 s) runs.
                message = await pubsub.get_message(timeout=30.0)
                if message is not None:
                    self.heard(message["data"].decode().split())
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()
