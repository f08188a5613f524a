"""Delivering webhooks: from the outbox onto their RQ queue, and from there to the receiver.

At least once, end to end:
1. The transition that ends a job with a webhook adds it to the webhook outbox in the same
   Lua step (store.py): no crash can come between the two.
2. Every worker process's `Relay` (a drainer of that outbox, gql_service.worker.outbox) turns
   entries into RQ jobs on the webhook queue, and acknowledges them in the same MULTI, which
   also fails if a delivery's job appeared since it was checked (WATCH): an entry is queued
   exactly once, even by two relays that hold it at once.
3. `deliver` POSTs the signed event; RQ's `Retry` brings a failed attempt back after an
   interval (exponential with jitter, fixed when the delivery is queued), until
   WEBHOOK_MAX_ATTEMPTS. A worker killed mid-attempt is RQ's abandoned job, retried too.

Deliveries run on their own queue: the async worker gives them slots of their own
(WEBHOOK_CONCURRENCY), so a slow receiver never takes an LLM job's place.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, timedelta
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline
from rq import Callback, Queue, Retry, get_current_job
from rq.job import Job as RQJob

from gql_service import delivery_store, keys, metrics, queueing, webhooks
from gql_service.models import JobRecord, WebhookDelivery, WebhookStatus, utcnow
from gql_service.redis_conn import sync_client
from gql_service.settings import RedisTarget, Settings
from gql_service.worker import outbox, outbox_spans
from gql_service.worker.context import WorkerContext, takes_context

log = logging.getLogger(__name__)

GROWTH = 5  # each wait five times the last: 8 attempts from 5 s span about 17 hours (with MAX_WAIT_S)
MAX_WAIT_S = 12 * 3600
JITTER = 0.2  # each wait is ±20 %, so deliveries that failed together don't retry together


def retry_waits(settings: Settings) -> list[int]:
    """The waits before each retry, in whole seconds (RQ's scheduler keeps whole seconds)."""
    waits = []
    for attempt in range(settings.webhook_max_attempts - 1):
        # Capped after the jitter: no wait is ever longer than MAX_WAIT_S (jittered before,
        # the last ones reached 14.4 h).
        wait = settings.webhook_retry_base_s * GROWTH**attempt * random.uniform(1 - JITTER, 1 + JITTER)
        waits.append(max(1, round(min(wait, MAX_WAIT_S))))
    return waits


class Relay(outbox.Drainer[RQJob | None]):
    outbox = keys.WEBHOOKS

    def __init__(self, redis: AsyncRedis, queue: Queue, settings: Settings, *, consumer: str) -> None:
        super().__init__(redis, consumer=consumer, **outbox.options(settings))
        self.queue = queue
        self.settings = settings

    def parse(self, entry_id: bytes, fields: dict[bytes, bytes]) -> RQJob | None:
        record = outbox.record_of(fields)
        return self._delivery(record) if record.webhook_url is not None else None

    async def handle(self, deliveries: list[RQJob | None], pipe: Pipeline) -> None:
        await queueing.prime(self.queue, self.redis)
        wanted = [rq_job for rq_job in deliveries if rq_job is not None]
        if not wanted:
            return
        # Watched before they are read: a relay that stalled past the claim time may find its
        # batch taken over by another, which queues the same deliveries; whichever commits
        # second fails (WatchError, retried: then it finds them queued).
        await pipe.watch(*(rq_job.key for rq_job in wanted))
        absent = await self._not_queued(wanted)
        pipe.multi()
        for rq_job in absent:
            self.queue.enqueue_job(rq_job, pipeline=pipe)  # type: ignore[arg-type]

    async def _not_queued(self, deliveries: list[RQJob]) -> list[RQJob]:
        """Those not on the queue yet, in one round trip."""
        async with self.redis.pipeline(transaction=False) as check:
            for rq_job in deliveries:
                check.exists(rq_job.key)
            found = await check.execute()
        return [rq_job for rq_job, exists in zip(deliveries, found, strict=True) if not exists]

    def _delivery(self, record: JobRecord) -> RQJob:
        """The RQ job delivering the record's event; RQ writes it into the caller's MULTI,
        beside the entry's acknowledgement."""
        assert record.webhook_url is not None
        waits = retry_waits(self.settings)
        ended = (record.finished_at or record.updated_at).timestamp()
        return self.queue.create_job(
            keys.DELIVER_WEBHOOK,
            args=(record.id, record.webhook_url, webhooks.event_body(record), ended),
            kwargs={"job": outbox_spans.about(record)},
            job_id=keys.webhook_delivery_job(record.id),
            description=f"webhook of {record.id} (request {record.request_id})",
            timeout=int(self.settings.webhook_timeout_s) + 30,
            result_ttl=self.settings.rq_result_ttl_s,
            failure_ttl=self.settings.rq_result_ttl_s,
            retry=Retry(max=len(waits), interval=waits) if waits else None,
            on_failure=Callback(keys.WEBHOOK_LOST),
        )


def start_relay(target: RedisTarget, settings: Settings, *, consumer: str) -> Callable[[], None]:
    """The worker process's relay of the webhook outbox; returns what stops it."""
    queue = Queue(keys.webhook_queue(settings.rq_queue), connection=sync_client(target))
    return outbox.start_in_thread(
        lambda redis: Relay(redis, queue, settings, consumer=consumer), target, name="webhook-relay"
    )


class NotDeliveredYet(Exception):
    """An attempt failed and another is due: RQ's Retry schedules it."""


@takes_context
async def deliver(
    ctx: WorkerContext, job_id: str, url: str, body: str, ended_at: float, job: outbox_spans.DeliveryAbout | None = None
) -> str:
    """The RQ job: one attempt at delivering a job's event. `job` is what the attempt's span
    says of the job (None for a delivery queued by an older version)."""
    async with ctx.connected("gqls-webhooks") as (redis, _):
        return await _attempt(ctx.settings, redis, job_id, url, body, ended_at, job)


async def _attempt(
    settings: Settings,
    redis: AsyncRedis,
    job_id: str,
    url: str,
    body: str,
    ended_at: float,
    job: outbox_spans.DeliveryAbout | None,
) -> str:
    rq_job = get_current_job()
    assert rq_job is not None, "deliver runs inside an RQ worker"
    state = (await delivery_store.get_deliveries(redis, [job_id]))[0] or WebhookDelivery(url=url)
    if state.ended:
        return str(state.status.value)  # a repeat of a delivery that has ended: nothing to do
    with outbox_spans.delivery_span(job_id, url, job, attempt=state.attempts + 1) as span:
        started = time.monotonic()
        if settings.webhook_secret is None:
            outcome = webhooks.Outcome(False, error="WEBHOOK_SECRET is not set on the worker", error_type="no_secret")
        else:
            secret = settings.webhook_secret.get_secret_value()
            headers = webhooks.signed_headers(secret, webhooks.message_id(job_id), body)
            outcome = await webhooks.post(
                url, body, headers, timeout_s=settings.webhook_timeout_s, allow_private=settings.webhook_allow_private
            )
        took = time.monotonic() - started
        state = await delivery_store.update_delivery(redis, job_id, url, lambda now: _count(now, outcome, rq_job))
        outbox_spans.delivered(span, outcome, state.status)
        since_end = time.time() - ended_at if outcome.delivered else None
        await metrics.record_delivery(redis, state.status.value, attempt_s=took, since_end_s=since_end)
        if state.status is WebhookStatus.RETRYING:  # said inside the span: the log line names its trace
            due = state.next_attempt_at.astimezone(UTC).isoformat(timespec="seconds") if state.next_attempt_at else "?"
            log.warning(
                "webhook of job %s: attempt %d failed (%s); next at %s", job_id, state.attempts, outcome.error, due
            )
        if state.status is WebhookStatus.FAILED:
            log.error("webhook of job %s: not delivered after %d attempts (%s)", job_id, state.attempts, outcome.error)
    if state.status is WebhookStatus.RETRYING:  # raised outside: the span's status is the attempt's, set above
        raise NotDeliveredYet(outcome.error)
    return str(state.status.value)


def _count(state: WebhookDelivery, outcome: webhooks.Outcome, rq_job: RQJob) -> WebhookDelivery | None:
    """The attempt, in the delivery's state: RETRYING while RQ's Retry has attempts left
    (None: the delivery has ended meanwhile, an attempt at once with this one ended it)."""
    if state.ended:
        return None
    now = utcnow()
    state.attempts += 1
    state.last_status_code, state.last_error, state.next_attempt_at = outcome.status_code, outcome.error, None
    if outcome.delivered:
        state.status, state.delivered_at = WebhookStatus.DELIVERED, now
    elif rq_job.retries_left:
        state.status = WebhookStatus.RETRYING
        state.next_attempt_at = now + timedelta(seconds=rq_job.get_retry_interval())
    else:
        state.status = WebhookStatus.FAILED
    return state


def on_failure(rq_job: RQJob, connection: Redis, exc_type: type[BaseException] | None, *_: Any) -> None:
    """RQ's failure callback, for what an attempt could not record itself: its worker died
    (abandoned) or RQ's hard stop cut it off; the fork worker calls it for a dead work horse,
    for which RQ runs no callback. That attempt counts; RQ retries if any are left."""
    if exc_type is NotDeliveredYet:
        return  # recorded by the attempt
    job_id, url = rq_job.args[0], rq_job.args[1]
    reason = exc_type.__name__ if exc_type else "lost"
    lost = webhooks.Outcome(False, error=f"the attempt did not finish ({reason})")
    delivery_store.update_delivery_sync(connection, job_id, url, lambda state: _count(state, lost, rq_job))
