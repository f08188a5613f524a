"""The API's side of batches: create, add to (through JobService.submit_many), close,
cancel, read, list, and follow. Resolvers call only this and JobService."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from gql_service import batch_store, economy_store, keys, store
from gql_service.api.calls import redis_call
from gql_service.api.errors import BadUserInput, IdempotencyKeyReused, NotFound
from gql_service.api.ids import check_ids
from gql_service.api.jobs import JobService
from gql_service.api.listing import MAX_LIST_SCAN
from gql_service.api.subscription_spans import SubscriptionSpan
from gql_service.models import BatchMode, BatchRecord, BatchStatus, JobPriority, JobRecord, JobStatus, utcnow

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 200
MAX_METADATA_BYTES = 4096
MAX_METADATA_DEPTH = 32
# batchUpdates sends at most one frame this often: counts move with every job transition,
# thousands a second on a large batch, and a subscriber needs the picture, not every step.
FRAME_INTERVAL_S = 0.25
# Without any event, a subscriber reads the batch again this often anyway (a nudge lost
# with a dropped pub/sub link must not stall a progress bar).
IDLE_REREAD_S = 5.0
CANCEL_CHUNK = 200


def _checked_metadata(metadata: object) -> dict[str, Any]:
    """A batch's metadata, if it is a JSON object of at most MAX_METADATA_DEPTH levels and
    MAX_METADATA_BYTES; BadUserInput otherwise. Walked without recursion, before anything
    serialises it: a value nested a thousand deep (orjson reads a request 1,024 deep) made
    json.dumps exhaust the stack, an INTERNAL_SERVER_ERROR."""
    if not isinstance(metadata, dict):
        raise BadUserInput("metadata must be a JSON object")
    pending: list[tuple[object, int]] = [(metadata, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, dict | list):
            if depth > MAX_METADATA_DEPTH:
                raise BadUserInput(f"metadata may nest objects and arrays at most {MAX_METADATA_DEPTH} levels deep")
            pending.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))
        elif isinstance(value, float) and not math.isfinite(value):
            # A GraphQL literal such as 1e999 is infinity, which JSON has no way to write.
            raise BadUserInput("metadata numbers must be finite")
    if len(json.dumps(metadata)) > MAX_METADATA_BYTES:
        raise BadUserInput(f"metadata must be at most {MAX_METADATA_BYTES} bytes of JSON")
    return metadata


def _same_request(made: BatchRecord, asked: BatchRecord) -> BatchRecord:
    """The batch an idempotency key made, if it was asked for as now; a key reused for a
    different batch is refused, as for jobs."""
    if (made.name, made.metadata, made.priority, made.mode) != (asked.name, asked.metadata, asked.priority, asked.mode):
        raise IdempotencyKeyReused(
            "this idempotencyKey made a batch with a different name, metadata, priority or mode; "
            "use a new key for a new batch"
        )
    return made


class BatchService:
    def __init__(self, jobs: JobService) -> None:
        self.jobs = jobs
        self.redis = jobs.redis
        self.settings = jobs.settings

    # -- creating and ending ----------------------------------------------------------------
    async def create(
        self,
        *,
        name: str,
        metadata: dict[str, Any] | None,
        idempotency_key: str | None,
        tenant: str,
        priority: JobPriority = JobPriority.NORMAL,
        mode: BatchMode = BatchMode.INTERACTIVE,
    ) -> tuple[BatchRecord, bool]:
        """A new open batch, or the one this idempotency key made before (deduplicated)."""
        if not name.strip() or len(name) > MAX_NAME_CHARS:
            raise BadUserInput(f"name must be 1 to {MAX_NAME_CHARS} characters")
        metadata = _checked_metadata(metadata or {})
        record = BatchRecord(
            id=f"{keys.BATCH_ID_PREFIX}{uuid.uuid4().hex}", tenant=tenant, name=name, metadata=metadata,
            created_at=utcnow(), priority=priority, mode=mode,
        )  # fmt: skip
        idem = keys.batch_idempotency(tenant, idempotency_key) if idempotency_key is not None else None
        if idem is not None and (existing := await self._made_by(idem, tenant)) is not None:
            return _same_request(existing, record), True
        async with redis_call(self.settings.redis_timeout_s):
            async with self.redis.pipeline(transaction=True) as pipe:
                batch_store.create_batch(pipe, record, ttl_s=self.settings.result_ttl_s)
                await pipe.execute()
            # The key is claimed only once its batch exists, so whoever finds the key finds
            # the batch: of two concurrent creations, the one that lost the claim gives way.
            if idem is None or await self.redis.set(idem, record.id, nx=True, ex=self.settings.idempotency_ttl_s):
                return record, False
        if (existing := await self._made_by(idem, tenant)) is not None:
            async with redis_call(self.settings.redis_timeout_s):
                await batch_store.discard(self.redis, record)
            return _same_request(existing, record), True
        async with redis_call(self.settings.redis_timeout_s):  # the key outlived its batch: it is ours now
            await self.redis.set(idem, record.id, ex=self.settings.idempotency_ttl_s)
        return record, False

    async def _made_by(self, idem: str, tenant: str) -> BatchRecord | None:
        async with redis_call(self.settings.redis_timeout_s):
            found: Any = await self.redis.get(idem)
        return await self.get(found.decode(), tenant=tenant) if found else None

    async def close(self, batch_id: str, *, tenant: str) -> BatchRecord:
        await self._owned(batch_id, tenant)
        async with redis_call(self.settings.redis_timeout_s):
            await batch_store.close(self.redis, batch_id, now=utcnow())
        return await self._owned(batch_id, tenant)

    async def cancel(self, batch_id: str, *, tenant: str) -> BatchRecord:
        """No more jobs, and every job not ended is CANCELED (gql_service.api.cancel, as cancelJob)."""
        batch = await self._owned(batch_id, tenant)
        if batch.status is BatchStatus.COMPLETED:
            raise BadUserInput(f"batch {batch_id} is already COMPLETED")
        async with redis_call(self.settings.redis_timeout_s):
            await batch_store.close(self.redis, batch_id, now=utcnow(), cancel=True)
            if batch.mode is BatchMode.ECONOMY:  # its waiting jobs are sent no more (its chunks see canceled_at)
                await economy_store.stop_waiting(self.redis, batch_id)
        start, unconfirmed = 0, None
        while True:  # the batch takes no more jobs now: this list only shrinks in what it leaves
            async with redis_call(self.settings.redis_timeout_s):
                job_ids = await batch_store.job_ids(self.redis, batch_id, start=start, count=CANCEL_CHUNK)
                records = [r for r in await store.get_jobs(self.redis, job_ids) if r is not None and not r.terminal]
            if not job_ids:
                break
            if records:
                outcome = await self.jobs.canceller.cancel(
                    [r.id for r in records], "canceled with its batch", seen=records
                )
                unconfirmed = unconfirmed or outcome.unconfirmed
            start += len(job_ids)
        if unconfirmed is not None:
            async with redis_call(self.settings.redis_timeout_s):
                raise unconfirmed  # SERVICE_UNAVAILABLE: every job is canceled on the primary, not yet on replicas
        return await self._owned(batch_id, tenant)

    # -- reading -----------------------------------------------------------------------------
    async def get(self, batch_id: str, *, tenant: str) -> BatchRecord | None:
        return (await self.get_many([batch_id], tenant=tenant))[0]

    async def get_many(self, batch_ids: list[str], *, tenant: str) -> list[BatchRecord | None]:
        check_ids(batch_ids)
        async with redis_call(self.settings.redis_timeout_s):
            found = await batch_store.get_batches(self.redis, batch_ids)
        return [b if b is not None and b.tenant == tenant else None for b in found]

    async def provider_batches(self, batch: BatchRecord) -> list[economy_store.Chunk]:
        """An ECONOMY batch's provider batches, in the order they were made."""
        if batch.mode is not BatchMode.ECONOMY:
            return []
        async with redis_call(self.settings.redis_timeout_s):
            return await economy_store.of_batch(self.redis, batch.id)

    async def _owned(self, batch_id: str, tenant: str) -> BatchRecord:
        batch = await self.get(batch_id, tenant=tenant)
        if batch is None:
            raise NotFound(f"batch {batch_id} not found")
        return batch

    async def check_owned(self, batch_id: str, *, tenant: str) -> BatchRecord:
        """The batch, NotFound unless the tenant has it. (Whether it still takes jobs is checked
        as they are added, atomically; repeats of jobs it has are answered even once closed.)"""
        return await self._owned(batch_id, tenant)

    async def page(
        self, *, tenant: str, first: int, after: tuple[float, str] | None
    ) -> tuple[list[tuple[BatchRecord, float]], bool]:
        """A page of the tenant's batches, newest first, and whether there are more."""
        async with redis_call(self.settings.redis_timeout_s):
            rows = await batch_store.tenant_batch_ids(self.redis, tenant, before=after, count=first + 1)
            found = await batch_store.get_batches(self.redis, [batch_id for batch_id, _ in rows[:first]])
        page = [(b, ms) for b, (_, ms) in zip(found, rows, strict=False) if b is not None]
        return page, len(rows) > first

    async def jobs_page(
        self, batch: BatchRecord, *, first: int, after: int, status: JobStatus | None
    ) -> tuple[list[tuple[JobRecord, int]], int | None]:
        """The batch's jobs in the order they were added, from position `after` on: [(record,
        position)], and where the next page starts (None at the end). A status filter looks at
        MAX_LIST_SCAN jobs at most per page, and says where it stopped."""
        page: list[tuple[JobRecord, int]] = []
        position = after
        while len(page) < first and position - after < MAX_LIST_SCAN:
            async with redis_call(self.settings.redis_timeout_s):
                ids = await batch_store.job_ids(self.redis, batch.id, start=position, count=max(first, 50))
                records = await store.get_jobs(self.redis, ids) if ids else []
            if not ids:
                return page, None
            for offset, record in enumerate(records):
                if record is not None and (status is None or record.status is status):
                    page.append((record, position + offset))
                    if len(page) == first:
                        return page, position + offset + 1
            position += len(ids)
        return page, position

    async def ended_page(
        self, batch: BatchRecord, *, first: int, after: int
    ) -> tuple[list[tuple[JobRecord, int]], int]:
        """The batch's ended jobs in the order they ended, from position `after`: each record
        with its position (Redis's, else the history's; one gone from both is left out, its
        position still counted), and the position after the last (the next page's `after`)."""
        async with redis_call(self.settings.redis_timeout_s):
            ids = await batch_store.ended_ids(self.redis, batch.id, start=after, count=first)
        records = await self.jobs.get_many(ids, tenant=batch.tenant) if ids else []
        return [(r, after + n) for n, r in enumerate(records) if r is not None], after + len(ids)

    # -- following ---------------------------------------------------------------------------
    async def updates(self, batch_id: str, *, tenant: str) -> AsyncGenerator[BatchRecord, None]:
        """The batch now, then its changes (at most one frame per FRAME_INTERVAL_S, always the
        latest), ending once it is closed and every job has ended."""
        channel = keys.batch_events(batch_id)
        with (
            SubscriptionSpan("batchUpdates", tenant=tenant, ids=[batch_id], entity="batch") as span,
            self.jobs.slots.watching(tenant, 1),
        ):
            async with contextlib.AsyncExitStack() as stack:
                # Subscribed (and confirmed) before the snapshot is read: nothing falls between.
                async with redis_call(self.settings.redis_timeout_s):
                    events = await stack.enter_async_context(
                        self.jobs.broadcast.subscribe(channel, latest_only=[channel])
                    )
                batch = await self._owned(batch_id, tenant)
                yield batch
                loop = asyncio.get_running_loop()
                while not batch.done:
                    sent_at = loop.time()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(IDLE_REREAD_S):
                            await events.get()
                    # Coalesce: whatever else happens until the next frame is due is in it.
                    await asyncio.sleep(max(0.0, sent_at + FRAME_INTERVAL_S - loop.time()))
                    latest = await self._owned(batch_id, tenant)
                    if latest.version != batch.version:
                        batch = latest
                        yield batch
                span.delivered("batch", batch_id, status=batch.status.value, version=batch.version)
