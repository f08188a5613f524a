"""The API's side of jobs: submit, read, and follow. Resolvers call only this."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline as AsyncPipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError
from rq import Queue
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job as RQJob
from rq.job import JobStatus as RQJobStatus

from gql_service import batch_store, history, keys, partials, queueing, redis_conn, store, webhooks
from gql_service.api.errors import BadUserInput, NotFound, RateLimited, ServiceUnavailable
from gql_service.broadcast import Broadcast, BroadcastUnavailable, Subscription
from gql_service.models import (
    JobError,
    JobErrorCode,
    JobRecord,
    JobStage,
    JobStatus,
    PartialExtraction,
    WebhookDelivery,
    utcnow,
)
from gql_service.redis_conn import NotReplicated
from gql_service.settings import Settings

if TYPE_CHECKING:
    from gql_service.api.batches import BatchService

log = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY_CHARS = 200
# Records one `jobs` page may look at when a status filter skips most of them; past it
# the page ends early and says there is more (hasNextPage with the scan's cursor).
MAX_LIST_SCAN = 1000
WEBHOOK_RESOLVE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class NewJob:
    record: JobRecord
    text: str
    idem: str | None  # the idempotency key's Redis key


@contextlib.asynccontextmanager
async def redis_call(timeout_s: float) -> AsyncIterator[None]:
    """One bounded piece of Redis work: an outage, a hung server (SIGSTOP) or a pool with no
    free connection is the client's SERVICE_UNAVAILABLE within `timeout_s`, never a hang
    and never a stack trace."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except NotReplicated as exc:
        # Written on the primary, not yet on enough replicas: not acknowledged, since a
        # failover now could lose it. A retry with the same idempotencyKey finds the job.
        log.warning("redis replicas did not confirm a write: %s", exc)
        raise ServiceUnavailable(
            f"the job store did not confirm the write on its replicas in time ({exc}); "
            "try again shortly (with the same idempotencyKey, if you gave one)"
        ) from None
    except (RedisConnectionError, RedisTimeoutError, BroadcastUnavailable, TimeoutError) as exc:
        log.warning("redis unavailable: %s", exc or type(exc).__name__)
        raise ServiceUnavailable("the job store is unavailable; try again shortly") from None


@contextlib.asynccontextmanager
async def history_call(timeout_s: float) -> AsyncIterator[None]:
    """One read of the PostgreSQL history, within `timeout_s`: a history that does not
    answer is the client's SERVICE_UNAVAILABLE (the job may be there), never a wrong
    NOT_FOUND or a page with a gap."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except (psycopg.Error, OSError, TimeoutError, PoolTimeout) as exc:
        log.warning("job history unavailable: %s", exc or type(exc).__name__)
        raise ServiceUnavailable("the job history is unavailable; try again shortly") from None


class TenantSlots:
    """Per-tenant bounds inside one API process: live watched jobs, and snapshot reads at once.

    The read bound keeps one client's burst of snapshot reads (a reconnect resyncing
    thousands of subscriptions, hundreds of jobsUpdates at once) from holding every
    connection of the small command pool while others wait.
    """

    def __init__(self, *, max_watched: int, max_reads: int) -> None:
        self.max_watched = max_watched
        self.watched: Counter[str] = Counter()
        # Tenants are the API_KEYS' (or "public"): a fixed set, so these are never pruned.
        self._reads: defaultdict[str, asyncio.Semaphore] = defaultdict(lambda: asyncio.Semaphore(max_reads))

    @contextlib.contextmanager
    def watching(self, tenant: str, count: int) -> Iterator[None]:
        if self.watched[tenant] + count > self.max_watched:
            raise RateLimited(
                f"at most {self.max_watched} jobs can be watched at once; {self.watched[tenant]} are already"
            )
        self.watched[tenant] += count
        try:
            yield
        finally:
            self.watched[tenant] -= count

    def reading(self, tenant: str) -> asyncio.Semaphore:
        return self._reads[tenant]


class JobService:
    def __init__(
        self,
        *,
        redis: AsyncRedis,
        sync_redis: Redis,
        broadcast: Broadcast,
        settings: Settings,
        history: AsyncConnectionPool[Any] | None = None,
        acked_redis: AsyncRedis | None = None,
    ) -> None:
        self.redis = redis
        # The writes that wait for replicas (REDIS_MIN_REPLICAS_ACKED) hold a connection for
        # up to REDIS_REPLICA_ACK_TIMEOUT_MS: a pool of their own, so reads never wait on them.
        self.acked_redis = acked_redis or redis
        # The PostgreSQL history (DATABASE_URL), read for jobs Redis no longer holds.
        self.history = history
        self.sync_redis = sync_redis
        self.broadcast = broadcast
        self.settings = settings
        self.queue = Queue(settings.rq_queue, connection=sync_redis)
        self.slots = TenantSlots(
            max_watched=settings.max_watched_jobs_per_tenant,
            # Leave a connection of the command pool to the other tenants.
            max_reads=max(1, settings.redis_max_connections - 1),
        )

    @functools.cached_property
    def batches(self) -> BatchService:
        """Batches of this service's jobs (gql_service.api.batches builds on this module)."""
        from gql_service.api.batches import BatchService

        return BatchService(self)

    def _redis_call(self) -> contextlib.AbstractAsyncContextManager[None]:
        return redis_call(self.settings.redis_timeout_s)

    def validate_text(self, text: str) -> None:
        if not text.strip():
            raise BadUserInput("text must not be empty")
        if len(text) > self.settings.max_text_chars:
            raise BadUserInput(f"text is {len(text)} characters long; the limit is {self.settings.max_text_chars}")

    async def check_webhook(self, url: str | None) -> None:
        """Whether `url` may be a job's webhook (http(s), a public address); BadUserInput if not."""
        if url is None:
            return
        if self.settings.webhook_secret is None:
            raise BadUserInput("webhooks are off on this service (WEBHOOK_SECRET is not set)")
        try:
            async with asyncio.timeout(WEBHOOK_RESOLVE_TIMEOUT_S):
                await webhooks.check(url, allow_private=self.settings.webhook_allow_private)
        except webhooks.WebhookRefused as exc:
            raise BadUserInput(str(exc)) from None
        except TimeoutError:
            raise BadUserInput("webhookUrl's host did not resolve in time") from None

    async def refused_webhooks(self, urls: set[str]) -> dict[str, BadUserInput]:
        """`check_webhook` for each URL at once (a batch may name many): why each refused one is."""

        async def refusal(url: str) -> BadUserInput | None:
            try:
                await self.check_webhook(url)
            except BadUserInput as exc:
                return exc
            return None

        ordered = list(urls)
        found = await asyncio.gather(*(refusal(url) for url in ordered))
        return {url: exc for url, exc in zip(ordered, found, strict=True) if exc is not None}

    def new_job(
        self,
        text: str,
        *,
        idempotency_key: str | None,
        tenant: str,
        request_id: str | None,
        webhook_url: str | None = None,
        batch_id: str | None = None,
    ) -> NewJob:
        """Check one submission and give it its record; raises BadUserInput. A webhook URL
        must have passed `check_webhook`."""
        self.validate_text(text)
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS:
            raise BadUserInput(f"idempotencyKey must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters")
        record = JobRecord(
            id=uuid.uuid4().hex, tenant=tenant, request_id=request_id, webhook_url=webhook_url, batch_id=batch_id
        )
        idem = keys.idempotency(tenant, idempotency_key) if idempotency_key else None
        return NewJob(record=record, text=text, idem=idem)

    async def submit(
        self,
        text: str,
        *,
        idempotency_key: str | None,
        tenant: str,
        request_id: str | None,
        webhook_url: str | None = None,
    ) -> tuple[JobRecord, bool]:
        await self.check_webhook(webhook_url)
        job = self.new_job(
            text, idempotency_key=idempotency_key, tenant=tenant, request_id=request_id, webhook_url=webhook_url
        )
        return (await self.submit_many([job]))[0]

    async def submit_many(self, jobs: list[NewJob], *, batch_id: str | None = None) -> list[tuple[JobRecord, bool]]:
        """Every job (QUEUED, v1) + its RQ job + its idempotency key in one MULTI/EXEC; with
        `batch_id` (the jobs' records name it), counted into that batch in the same MULTI.

        RQ writes its job into whatever pipeline it is given without reading anything, and an
        asyncio pipeline in MULTI mode buffers commands synchronously, so RQ's enqueue runs
        on the event loop with no thread and no extra round trip (measured: +25 % submitText
        throughput over RQ's synchronous enqueue in a thread).
        """
        async with self._redis_call():
            await queueing.prime(self.queue, self.acked_redis)
            return await self._submit_many(jobs, batch_id)

    async def _submit_many(self, jobs: list[NewJob], batch_id: str | None) -> list[tuple[JobRecord, bool]]:
        idem_keys = sorted({j.idem for j in jobs if j.idem})
        # A batch takes jobs until it is closed: its open flag is watched, so a close that
        # comes between this check and the MULTI makes the MULTI fail and the check run again.
        watched = idem_keys + ([keys.batch_open(batch_id)] if batch_id else [])
        async with redis_conn.pipeline(self.acked_redis, self.settings.replica_ack) as pipe:
            while True:
                try:
                    existing: dict[str, JobRecord] = {}
                    batch_open = True
                    if watched:
                        # Optimistic lock: of concurrent duplicates, exactly one EXEC succeeds.
                        # Reads go through the watching connection itself: with a small pool,
                        # borrowing a second one here could wait for one that never frees up.
                        await pipe.watch(*watched)
                    if batch_id:
                        batch_open = bool(await pipe.exists(keys.batch_open(batch_id)))
                    if idem_keys:
                        for key, value in zip(idem_keys, await pipe.mget(idem_keys), strict=True):
                            if value is not None:
                                found = await store.get_job(pipe, value.decode() if isinstance(value, bytes) else value)
                                if found is not None:
                                    existing[key] = found
                    pipe.multi()
                    results: list[tuple[JobRecord, bool]] = []
                    for job in jobs:
                        if job.idem and job.idem in existing:
                            results.append((existing[job.idem], True))
                            continue
                        self._queue_job(pipe, job)
                        if job.idem:
                            existing[job.idem] = job.record  # a repeat within the batch
                        results.append((job.record, False))
                    added = {r.id: created_ms(r) for r, dedup in results if not dedup}
                    if batch_id and added:
                        if not batch_open:
                            await pipe.reset()
                            raise BadUserInput(f"batch {batch_id} is closed: it takes no more jobs")  # (repeats do)
                        batch_store.add_jobs(pipe, batch_id, added, ttl_s=self.settings.result_ttl_s)
                    if self.settings.replica_ack is not None and all(dedup for _, dedup in results):
                        # Repeats answer only once the jobs they found are on the replicas
                        # too: a write of their own (the keys' TTLs, refreshed) for the WAIT
                        # to count from, as Redis counts a connection's own writes.
                        for key in idem_keys:
                            pipe.expire(key, self.settings.idempotency_ttl_s)
                    if len(pipe):
                        await pipe.execute()
                        redis_conn.check_replicated(pipe)
                    else:
                        await pipe.reset()
                    return results
                except WatchError:
                    continue

    def _queue_job(self, pipe: AsyncPipeline, job: NewJob) -> None:
        ttl_s = self.settings.result_ttl_s
        store.create_job(pipe, job.record, text=job.text, ttl_s=ttl_s)
        store.index_job(pipe, job.record, ttl_s=ttl_s)
        if job.idem:
            pipe.set(job.idem, job.record.id, ex=self.settings.idempotency_ttl_s)
        queueing.enqueue_extraction(self.queue, job.record, pipe, self.settings)

    async def list_jobs(
        self,
        *,
        tenant: str,
        first: int,
        after: tuple[float, str] | None,
        status: JobStatus | None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> tuple[list[tuple[JobRecord, float]], tuple[float, str] | None]:
        """A page of the tenant's jobs, newest first: [(record, created ms)], and where the
        next page starts (None at the end). With the history on, Redis's jobs and the
        history's are one list (a job in both is shown as Redis has it, the newer).

        A status filter never hides a match: when the scan bound is reached before the page
        is full, the page ends early and the cursor points past what was scanned.
        """
        window = _Window(status, created_after, created_before)
        live, bound = await self._list_live(tenant, first, after, window)
        if self.history is None:
            return live, bound
        archived = await self._list_archived(tenant, first, after, window)
        merged = {r.id: (r, created_ms(r)) for r in archived} | {r.id: (r, ms) for r, ms in live}
        # Redis was scanned down to `bound` (None: to its end): nothing older may be shown yet.
        candidates = sorted(
            (item for item in merged.values() if bound is None or (item[1], item[0].id) >= bound),
            key=lambda item: (item[1], item[0].id),
            reverse=True,
        )
        page = candidates[:first]
        if len(candidates) > first:
            return page, (page[-1][1], page[-1][0].id)
        return page, bound

    async def _list_live(
        self, tenant: str, first: int, after: tuple[float, str] | None, window: _Window
    ) -> tuple[list[tuple[JobRecord, float]], tuple[float, str] | None]:
        page: list[tuple[JobRecord, float]] = []
        cursor = after
        scanned = 0
        async with self._redis_call():
            while True:
                batch = await store.list_job_ids(self.redis, tenant, before=cursor, count=max(first + 1, 50))
                if not batch:
                    return page, None
                records = await store.get_jobs(self.redis, [job_id for job_id, _ in batch])
                for (job_id, score), record in zip(batch, records, strict=True):
                    if window.ended_before(score):
                        return page, None  # newest first: the rest is older still
                    if record is not None and window.holds(record):
                        if len(page) == first:
                            return page, cursor  # one more match exists: the page ends at the last one
                        page.append((record, score))
                    cursor = (score, job_id)
                    scanned += 1
                    if scanned >= MAX_LIST_SCAN:
                        return page, cursor

    async def _list_archived(
        self, tenant: str, first: int, after: tuple[float, str] | None, window: _Window
    ) -> list[JobRecord]:
        assert self.history is not None
        # The cursor's float ms back to the exact microsecond PostgreSQL keeps (a float's
        # error here is under 0.4 µs, so rounding finds it).
        before = (EPOCH + timedelta(microseconds=round(after[0] * 1000)), after[1]) if after else None
        async with history_call(self.settings.redis_timeout_s):
            return await history.page(
                self.history, tenant=tenant, before=before, count=first + 1, status=window.status,
                created_after=window.created_after, created_before=window.created_before,
            )  # fmt: skip

    async def get(self, job_id: str, *, tenant: str) -> JobRecord | None:
        async with self._redis_call():
            record = await store.get_job(self.redis, job_id)
        if record is None and self.history is not None:
            return (await self._archived([job_id], tenant)).get(job_id)
        return _owned(record, tenant)

    async def get_many(self, job_ids: list[str], *, tenant: str) -> list[JobRecord | None]:
        """Snapshots of several jobs in one round trip, within the tenant's read bound; the
        ones Redis no longer holds, from the history."""
        async with self.slots.reading(tenant), self._redis_call():
            records = [_owned(r, tenant) for r in await store.get_jobs(self.redis, job_ids)]
        missing = [job_id for job_id, r in zip(job_ids, records, strict=True) if r is None]
        if missing and self.history is not None:
            archived = await self._archived(missing, tenant)
            records = [r or archived.get(job_id) for job_id, r in zip(job_ids, records, strict=True)]
        return records

    async def deliveries(self, job_ids: list[str]) -> list[WebhookDelivery | None]:
        """How the jobs' webhooks are getting on (None once a record has expired)."""
        async with self._redis_call():
            return await store.get_deliveries(self.redis, job_ids)

    async def _archived(self, job_ids: list[str], tenant: str) -> dict[str, JobRecord]:
        assert self.history is not None
        async with history_call(self.settings.redis_timeout_s):
            return await history.get_many(self.history, job_ids, tenant=tenant)

    async def cancel(self, job_id: str, *, tenant: str) -> JobRecord:
        existing = await self.get(job_id, tenant=tenant)
        if existing is None:
            raise NotFound(f"job {job_id} not found")

        to_canceled = canceling("canceled by the client")
        unconfirmed: store.EndNotReplicated | None = None
        async with self._redis_call():
            try:
                record, changed = await store.update_job(
                    self.acked_redis, job_id, to_canceled, ttl_s=self.settings.result_ttl_s,
                    archive=self.history is not None, ack=self.settings.replica_ack,
                )  # fmt: skip
            except store.EndNotReplicated as exc:  # CANCELED on the primary: still stop the work
                unconfirmed, record, changed = exc, exc.done.record, exc.done.changed
        if record is None:  # not in Redis: an archived job (it has ended), or one gone meanwhile
            if not existing.terminal:
                raise NotFound(f"job {job_id} not found")
            record, changed = existing, False
        if not changed and record.status is not JobStatus.CANCELED:
            raise BadUserInput(f"job {job_id} is already {record.status.value}; only unfinished jobs can be canceled")
        if changed:
            with contextlib.suppress(ServiceUnavailable):  # a metric is not worth failing the cancel
                async with self._redis_call():
                    await count_canceled(self.redis, 1)
            # The record is CANCELED first, so nothing the worker writes later can undo it;
            # stopping the RQ job only saves the work. RQ's API is synchronous: a thread,
            # abandoned (and ended by its socket timeout) if Redis hangs.
            async with self._redis_call():
                await anyio.to_thread.run_sync(self._stop_rq_job, job_id, abandon_on_cancel=True)
        if unconfirmed is not None:
            async with self._redis_call():
                raise unconfirmed  # SERVICE_UNAVAILABLE: the client is not told it is canceled
        return record

    def _stop_rq_job(self, job_id: str) -> None:
        try:
            rq_job = RQJob.fetch(job_id, connection=self.sync_redis)
            if rq_job.get_status() == RQJobStatus.STARTED:
                send_stop_job_command(self.sync_redis, job_id)
            else:
                rq_job.cancel()
        except (NoSuchJobError, InvalidJobOperation):
            pass  # already gone, finished or canceled: nothing left to stop

    async def updates(
        self, job_ids: list[str], *, tenant: str, partial: bool = False
    ) -> AsyncGenerator[JobRecord | Interim, None]:
        """Each job's snapshot, then every newer version, ending when every job has ended;
        with `partial`, the interim frames of the calls running meanwhile too.

        Subscribed (and confirmed) before the snapshots are read: nothing can fall between.
        An unknown id (or another tenant's) ends the stream with NOT_FOUND.
        """
        frames = [keys.job_partials(i) for i in job_ids] if partial else []
        with self.slots.watching(tenant, len(job_ids)):
            async with contextlib.AsyncExitStack() as stack:
                async with self._redis_call():
                    channels = [keys.job_events(i) for i in job_ids] + frames
                    events = await stack.enter_async_context(self.broadcast.subscribe(*channels, latest_only=frames))
                    if partial:  # whoever runs these jobs now: publish their frames from here on
                        await partials.ask_for_frames(self.redis, job_ids)
                # Closed with this generator (see schema.Subscription), then the subscription.
                follow = await stack.enter_async_context(
                    contextlib.aclosing(self._follow(events, job_ids, tenant=tenant, frames=set(frames)))
                )
                async for item in follow:
                    yield item

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


@dataclass(frozen=True)
class _Window:
    """What a `jobs` listing asks for besides its position."""

    status: JobStatus | None
    created_after: datetime | None
    created_before: datetime | None

    def holds(self, record: JobRecord) -> bool:
        return (
            (self.status is None or record.status is self.status)
            and (self.created_after is None or record.created_at >= self.created_after)
            and (self.created_before is None or record.created_at < self.created_before)
        )

    def ended_before(self, created_ms: float) -> bool:
        return self.created_after is not None and created_ms < self.created_after.timestamp() * 1000


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def canceling(message: str) -> store.Change:
    """The change that ends a job CANCELED (by its client, or with its batch)."""
    error = JobError(code=JobErrorCode.CANCELED, message=message)

    def to_canceled(job: JobRecord) -> JobRecord:
        update = {"status": JobStatus.CANCELED, "stage": JobStage.CANCELED, "error": error, "finished_at": utcnow()}
        return job.model_copy(update=update)

    return to_canceled


async def count_canceled(redis: AsyncRedis, n: int) -> None:
    await redis.hincrby(keys.metrics("jobs"), "CANCELED|CANCELED", n)


def created_ms(record: JobRecord) -> float:
    """A job's place in listings and cursors, as `store.index_job` scores it."""
    return record.created_at.timestamp() * 1000


def _owned(record: JobRecord | None, tenant: str) -> JobRecord | None:
    # Another tenant's job is indistinguishable from a missing one.
    return record if record is not None and record.tenant == tenant else None
