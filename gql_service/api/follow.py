"""Following jobs: each one's snapshot, then every newer version, with interim frames on request."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from redis.asyncio import Redis as AsyncRedis

from gql_service import keys, partials, store
from gql_service.api.calls import redis_call
from gql_service.api.errors import NotFound
from gql_service.api.ids import check_ids
from gql_service.api.subscription_spans import SubscriptionSpan
from gql_service.api.tenants import TenantSlots
from gql_service.broadcast import Broadcast, Subscription
from gql_service.models import JobRecord, JobStage, PartialExtraction

log = logging.getLogger(__name__)

ReadMany = Callable[..., Awaitable[list[JobRecord | None]]]


class Following:
    def __init__(
        self, *, redis: AsyncRedis, broadcast: Broadcast, slots: TenantSlots, get_many: ReadMany, timeout_s: float
    ) -> None:
        self.redis = redis
        self.broadcast = broadcast
        self.slots = slots
        self.get_many = get_many
        self.timeout_s = timeout_s

    async def updates(
        self, job_ids: list[str], *, tenant: str, partial: bool = False, field: str = "jobUpdates"
    ) -> AsyncGenerator[JobRecord | Interim, None]:
        """Each job's snapshot, then every newer version, ending when every job has ended;
        with `partial`, the interim frames of the calls running meanwhile too.

        Subscribed (and confirmed) before the snapshots are read: nothing can fall between.
        An unknown id (or another tenant's) ends the stream with NOT_FOUND.
        """
        check_ids(job_ids)  # before their channels are subscribed, not only when they are read
        frames = [keys.job_partials(i) for i in job_ids] if partial else []
        with SubscriptionSpan(field, tenant=tenant, ids=job_ids) as span, self.slots.watching(tenant, len(job_ids)):
            async with contextlib.AsyncExitStack() as stack:
                async with redis_call(self.timeout_s):
                    channels = [keys.job_events(i) for i in job_ids] + frames
                    events = await stack.enter_async_context(self.broadcast.subscribe(*channels, latest_only=frames))
                    if partial:  # whoever runs these jobs now: publish their frames from here on
                        await partials.ask_for_frames(self.redis, job_ids)
                # Closed with this generator (see schema.Subscription), then the subscription.
                follow = await stack.enter_async_context(
                    contextlib.aclosing(self._follow(events, job_ids, tenant=tenant, frames=set(frames)))
                )
                async for item in follow:
                    if isinstance(item, JobRecord):
                        span.seen(item)
                    yield item
                    if isinstance(item, JobRecord) and item.terminal:
                        span.delivered("job", item.id, status=item.status.value, version=item.version)

    async def _follow(
        self, events: Subscription, job_ids: list[str], *, tenant: str, frames: set[str]
    ) -> AsyncGenerator[JobRecord | Interim, None]:
        latest: dict[str, JobRecord] = {}  # the newest version sent, of the jobs still running
        frame_sent: dict[str, tuple[int, int]] = {}  # job id -> (version, seq) of its last frame sent
        pending: list[JobRecord | None] | None = await self.get_many(job_ids, tenant=tenant)
        while True:
            if pending is not None:  # fresh snapshots: the first ones, or after a RESYNC
                for job_id, record in zip(job_ids, pending, strict=True):
                    if record is None:
                        raise NotFound(f"job {job_id} not found")
                    if job_id not in latest or record.version > latest[job_id].version:
                        yield record
                    latest[job_id] = record
                    if record.terminal:
                        del latest[job_id]
                job_ids = list(latest)
                pending = None
            if not job_ids:
                return
            item = await events.get()
            if not isinstance(item, tuple):  # RESYNC: the link dropped, events may be lost; read afresh
                pending = await self.get_many(job_ids, tenant=tenant)
            elif item[0] in frames:
                interim = _interim(item[1], latest, frame_sent)
                if interim is not None:
                    yield interim
            else:
                record = store.decode(item[1])
                if record.id in latest and record.version > latest[record.id].version:
                    yield record
                    latest[record.id] = record
                    if record.terminal:
                        del latest[record.id]
                        job_ids = list(latest)


@dataclass(frozen=True)
class Interim:
    """A frame of a running call: the job as last sent, and the answer as far as it is written."""

    record: JobRecord
    partial: PartialExtraction
    seq: int


_STREAMING_STAGES = frozenset({JobStage.CALLING_LLM, JobStage.REPAIRING})


def _interim(raw: bytes, latest: dict[str, JobRecord], sent: dict[str, tuple[int, int]]) -> Interim | None:
    """The frame, if it belongs to the version the subscriber has and is newer than the last
    one it got (a frame of an earlier version arrives late after the next transition)."""
    try:
        job_id, version, seq, partial = partials.decode_frame(raw)
    except (ValueError, KeyError, TypeError):
        log.warning("an interim frame that is not one was dropped")
        return None
    record = latest.get(job_id)
    if record is None or record.version != version or record.stage not in _STREAMING_STAGES:
        return None
    if (version, seq) <= sent.get(job_id, (0, 0)):
        return None
    sent[job_id] = (version, seq)
    return Interim(record, partial, seq)
