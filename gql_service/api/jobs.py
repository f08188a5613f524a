"""The API's side of jobs: submit, read, and follow. Resolvers call only this."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from psycopg_pool import AsyncConnectionPool
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline as AsyncPipeline
from redis.exceptions import WatchError

from gql_service import (
    batch_store,
    budgets,
    delivery_store,
    economy_store,
    history,
    keys,
    queueing,
    redis_conn,
    store,
    tracing,
    webhooks,
)
from gql_service.api.calls import history_call, redis_call
from gql_service.api.cancel import Canceller
from gql_service.api.errors import BadUserInput, ClientError, IdempotencyKeyReused, NotFound, QuotaExceeded
from gql_service.api.follow import Following
from gql_service.api.ids import check_ids
from gql_service.api.listing import Listing, created_ms
from gql_service.api.tenants import TenantSlots
from gql_service.api.usage import Usage
from gql_service.broadcast import Broadcast
from gql_service.models import JobPriority, JobRecord, JobStatus, WebhookDelivery, utcnow
from gql_service.settings import Settings

log = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY_CHARS = 200
WEBHOOK_RESOLVE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class NewJob:
    record: JobRecord
    text: str
    idem: str | None  # the idempotency key's Redis key
    # What the key stands for (text, webhook, batch): a repeat must ask for the same.
    fingerprint: str = ""


def fingerprint(
    text: str, webhook_url: str | None, batch_id: str | None, priority: JobPriority = JobPriority.NORMAL
) -> str:
    # NORMAL adds nothing, so keys written before there were priorities still match; a text
    # never holds a NUL (validate_text), so what follows it can't be confused with it.
    marked = "" if priority is JobPriority.NORMAL else f"\0{priority.value}"
    return hashlib.sha256(f"{webhook_url or ''}\0{batch_id or ''}\0{text}{marked}".encode()).hexdigest()[:32]


def _idem_value(job: NewJob) -> str:
    """What an idempotency key holds: "<job id> <fingerprint>"."""
    return f"{job.record.id} {job.fingerprint}"


def _idem_read(value: bytes | str) -> tuple[str, str | None]:
    """(job id, fingerprint) of an idempotency key; no fingerprint from a key written before
    there were any (the job id alone): it matches any request, as then."""
    job_id, _, known = (value.decode() if isinstance(value, bytes) else value).partition(" ")
    return job_id, known or None


def _reused() -> IdempotencyKeyReused:
    return IdempotencyKeyReused(
        "this idempotencyKey was used for a different request (text, webhookUrl, batch or priority); "
        "use a new key for a new request"
    )


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
        self.queues = queueing.llm_queues(settings, sync_redis)
        self.slots = TenantSlots(
            max_watched=settings.max_watched_jobs_per_tenant,
            # Leave a connection of the command pool to the other tenants.
            max_reads=max(1, settings.redis_max_connections - 1),
        )
        self.canceller = Canceller(redis=redis, acked_redis=self.acked_redis, sync_redis=sync_redis, settings=settings)
        self.listing = Listing(redis=redis, history=history, timeout_s=settings.redis_timeout_s)
        self.usage = Usage(redis=redis, history=history, timeout_s=settings.redis_timeout_s)
        self.following = Following(
            redis=redis, broadcast=broadcast, slots=self.slots, get_many=self.get_many,
            timeout_s=settings.redis_timeout_s,
        )  # fmt: skip

    def _redis_call(self) -> contextlib.AbstractAsyncContextManager[None]:
        return redis_call(self.settings.redis_timeout_s)

    def validate_text(self, text: str) -> None:
        if not text.strip():
            raise BadUserInput("text must not be empty")
        if len(text) > self.settings.max_text_chars:
            raise BadUserInput(f"text is {len(text)} characters long; the limit is {self.settings.max_text_chars}")
        if "\x00" in text:
            # PostgreSQL's text can't hold it (the history would refuse the job), and no
            # real document has one: refused here, where the client can still act on it.
            raise BadUserInput("text must not contain NUL (\\u0000) characters")

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
            reason = exc.reason
        except TimeoutError:
            reason = f"its host did not resolve within {WEBHOOK_RESOLVE_TIMEOUT_S:g} s"
        else:
            return
        # The client is told one message for every refusal (webhooks.REFUSED), operators why.
        log.info("webhookUrl %r refused: %s", url[:200], reason)
        raise BadUserInput(webhooks.REFUSED)

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
        one_of_many: bool = False,
        priority: JobPriority = JobPriority.NORMAL,
    ) -> NewJob:
        """Check one submission and give it its record; raises BadUserInput. A webhook URL
        must have passed `check_webhook`. While tracing is on, the record carries the current
        span's context: the job's spans are its children, or, `one_of_many` (submitTexts),
        start a trace of their own that links to it."""
        self.validate_text(text)
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS:
            raise BadUserInput(f"idempotencyKey must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters")
        record = JobRecord(
            id=uuid.uuid4().hex, tenant=tenant, request_id=request_id, webhook_url=webhook_url, batch_id=batch_id,
            priority=priority, trace=tracing.current_job_trace(link=one_of_many) if tracing.active() else None,
        )  # fmt: skip
        if not idempotency_key:
            return NewJob(record=record, text=text, idem=None)
        key = keys.idempotency(tenant, idempotency_key)
        return NewJob(
            record=record, text=text, idem=key, fingerprint=fingerprint(text, webhook_url, batch_id, priority)
        )

    async def submit(
        self,
        text: str,
        *,
        idempotency_key: str | None,
        tenant: str,
        request_id: str | None,
        webhook_url: str | None = None,
        priority: JobPriority = JobPriority.NORMAL,
    ) -> tuple[JobRecord, bool]:
        await self.check_webhook(webhook_url)
        job = self.new_job(
            text, idempotency_key=idempotency_key, tenant=tenant, request_id=request_id, webhook_url=webhook_url,
            priority=priority,
        )  # fmt: skip
        [outcome] = await self.submit_many([job])
        if isinstance(outcome, ClientError):
            raise outcome
        return outcome

    async def submit_many(
        self, jobs: list[NewJob], *, batch_id: str | None = None, economy: bool = False
    ) -> list[tuple[JobRecord, bool] | ClientError]:
        """Every job (QUEUED, v1) + its RQ job + its idempotency key in one round trip; with
        `batch_id` (the jobs' records name it), counted into that batch in the same one.
        A job whose idempotency key was used for another request is that job's
        IDEMPOTENCY_KEY_REUSED error, in its place in the answer. `economy`: the batch is an
        ECONOMY one; its jobs wait for a provider batch (gql_service.economy_store) instead of
        going on an RQ queue.

        Applied once: the commands run as one script guarded by the first new job's record
        (redis_conn.run_once), so a reply lost on the way back (redis-py then sends it all
        again) queues nothing twice.

        RQ writes its job into whatever pipeline it is given without reading anything, and an
        asyncio pipeline in MULTI mode buffers commands synchronously, so RQ's enqueue runs
        on the event loop with no thread and no extra round trip (measured: +25 % submitText
        throughput over RQ's synchronous enqueue in a thread).
        """
        async with self._redis_call():
            await queueing.prime(self.queues, self.acked_redis)
            return await self._submit_many(jobs, batch_id, economy)

    async def _submit_many(
        self, jobs: list[NewJob], batch_id: str | None, economy: bool
    ) -> list[tuple[JobRecord, bool] | ClientError]:
        idem_keys = sorted({j.idem for j in jobs if j.idem})
        # A batch takes jobs until it is closed: its open flag is watched, so a close that
        # comes between this check and the MULTI makes the MULTI fail and the check run again.
        watched = idem_keys + ([keys.batch_open(batch_id)] if batch_id else [])
        async with redis_conn.pipeline(self.acked_redis, self.settings.replica_ack) as pipe:
            while True:
                try:
                    existing: dict[str, tuple[JobRecord, str | None]] = {}  # idem key -> (job, fingerprint)
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
                                job_id, known = _idem_read(value)
                                found = await store.get_job(pipe, job_id)
                                if found is not None:
                                    existing[key] = (found, known)
                    pipe.multi()
                    results: list[tuple[JobRecord, bool] | ClientError] = []
                    new: list[NewJob] = []
                    for job in jobs:
                        if job.idem and job.idem in existing:
                            prior, prior_fingerprint = existing[job.idem]
                            same = prior_fingerprint in (None, job.fingerprint)
                            results.append((prior, True) if same else _reused())
                            continue
                        self._queue_job(pipe, job, held=economy)
                        new.append(job)
                        if job.idem:
                            existing[job.idem] = (job.record, job.fingerprint)  # a repeat within the batch
                        results.append((job.record, False))
                    added = {job.record.id: created_ms(job.record) for job in new}
                    if batch_id and added:
                        if not batch_open:
                            await pipe.reset()
                            raise BadUserInput(f"batch {batch_id} is closed: it takes no more jobs")  # (repeats do)
                        batch_store.add_jobs(pipe, batch_id, added, ttl_s=self.settings.result_ttl_s)
                        if economy:
                            economy_store.hold(pipe, batch_id, added, ttl_s=self.settings.result_ttl_s)
                    spendable = self._budget(new)
                    if new:
                        within = [(limit.key, limit.limit) for limit in spendable]
                        guard = keys.job(new[0].record.id)
                        replies = await redis_conn.run_once(self.acked_redis, pipe, guard, within=within)
                    elif self.settings.replica_ack is not None and idem_keys:
                        # Repeats answer only once the jobs they found are on the replicas
                        # too: a write of their own (the keys' TTLs, refreshed) for the WAIT
                        # to count from, as Redis counts a connection's own writes.
                        for key in idem_keys:
                            pipe.expire(key, self.settings.idempotency_ttl_s)
                        replies = await pipe.execute()
                    else:
                        await pipe.reset()
                        return results
                    if new and replies[0] < 0:  # a budget is spent: nothing was written
                        refused = _quota_exceeded(spendable[-replies[0] - 1])
                        written = {job.record.id for job in new}
                        return [
                            refused if not isinstance(r, ClientError) and r[0].id in written else r for r in results
                        ]
                    redis_conn.check_replicated(pipe)
                    return results
                except WatchError:
                    continue

    def _budget(self, new: list[NewJob]) -> list[budgets.Limit]:
        """The budgets new jobs of their tenant are checked against (none without TENANT_BUDGETS)."""
        if not new or not self.settings.tenant_budgets:
            return []
        tenant = new[0].record.tenant  # one request's jobs are one tenant's
        return budgets.limits(budgets.budget_for(self.settings.tenant_budgets, tenant), tenant, utcnow())

    def _queue_job(self, pipe: AsyncPipeline, job: NewJob, *, held: bool = False) -> None:
        ttl_s = self.settings.result_ttl_s
        store.create_job(pipe, job.record, text=job.text, ttl_s=ttl_s)
        store.index_job(pipe, job.record, ttl_s=ttl_s)
        if job.idem:
            pipe.set(job.idem, _idem_value(job), ex=self.settings.idempotency_ttl_s)
        if not held:
            queueing.enqueue_extraction(self.queues, job.record, pipe, self.settings)

    async def get(self, job_id: str, *, tenant: str) -> JobRecord | None:
        check_ids([job_id])
        async with self._redis_call():
            record = await store.get_job(self.redis, job_id)
        if record is None and self.history is not None:
            return (await self._archived([job_id], tenant)).get(job_id)
        return _owned(record, tenant)

    async def get_many(self, job_ids: list[str], *, tenant: str) -> list[JobRecord | None]:
        """Snapshots of several jobs in one round trip, within the tenant's read bound; the
        ones Redis no longer holds, from the history."""
        check_ids(job_ids)
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
            return await delivery_store.get_deliveries(self.redis, job_ids)

    async def _archived(self, job_ids: list[str], tenant: str) -> dict[str, JobRecord]:
        assert self.history is not None
        async with history_call(self.settings.redis_timeout_s):
            return await history.get_many(self.history, job_ids, tenant=tenant)

    async def cancel(self, job_id: str, *, tenant: str) -> JobRecord:
        existing = await self.get(job_id, tenant=tenant)
        if existing is None:
            raise NotFound(f"job {job_id} not found")
        outcome = await self.canceller.cancel([job_id], "canceled by the client")
        [done] = outcome.done
        record, changed = done.record, done.changed
        if record is None:  # not in Redis: an archived job (it has ended), or one gone meanwhile
            if not existing.terminal:
                raise NotFound(f"job {job_id} not found")
            record, changed = existing, False
        if not changed and record.status is not JobStatus.CANCELED:
            raise BadUserInput(f"job {job_id} is already {record.status.value}; only unfinished jobs can be canceled")
        if outcome.unconfirmed is not None:
            async with self._redis_call():
                raise outcome.unconfirmed  # SERVICE_UNAVAILABLE: the client is not told it is canceled
        return record


def _quota_exceeded(limit: budgets.Limit) -> QuotaExceeded:
    resets = limit.resets_at.isoformat()
    return QuotaExceeded(
        f"this tenant's {limit.name} budget ({limit.budget:g}) is spent: new jobs are refused until {resets}",
        budget=limit.name, resetsAt=resets,
    )  # fmt: skip


def _owned(record: JobRecord | None, tenant: str) -> JobRecord | None:
    # Another tenant's job is indistinguishable from a missing one.
    return record if record is not None and record.tenant == tenant else None
