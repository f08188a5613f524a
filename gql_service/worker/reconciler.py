"""Jobs that nothing would run any more: found, and queued again (or failed), cluster-wide.

Redis replicates asynchronously: when a primary dies, the writes it had not passed on are
gone. A submission waits for its replicas when REDIS_MIN_REPLICAS_ACKED says so, but RQ's
own bookkeeping never does: the new primary may hold a job's record (QUEUED, or STARTED)
and no RQ job to run it, or an RQ job that has ended while the record's end was lost. No
worker would ever touch such a job again, and its subscribers would wait forever.

So every worker process runs a Reconciler; the one holding RECONCILE_LOCK makes a pass every
RECONCILE_INTERVAL_S over the jobs that have not ended (keys.LIVE_JOBS, kept by the record's
own writes) and have not changed for that long, and compares each with RQ:

* RQ still has it (queued, started, scheduled, deferred, held by a tenant cap): RQ's own
  machinery runs it, or retries it when its worker is lost. Nothing to do.
* It is an ECONOMY batch's job that the economy loop has not handed over yet (waiting to be
  sent, or in a provider batch: gql_service.worker.economy): the loop answers for it.
  Nothing to do. Once handed over, it is RQ's like any job.
* RQ has no job for it, or one that has ended: the job is queued again (status RETRYING,
  `WORKER_LOST`, retryable, so subscribers see why) with what is left of its attempts, or
  FAILED with `WORKER_LOST` once they are spent.

A pass looks at MAX_PER_PASS jobs at most (the longest unchanged first) and renews its lock
between batches, so two processes never revive the same job; a revive is also refused by
the record's version if anything changed the job since the pass read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from rq.job import Job as RQJob
from rq.job import JobStatus as RQJobStatus

from gql_service import economy_store, keys, queueing, redis_conn, store
from gql_service.models import JobError, JobErrorCode, JobPriority, JobRecord, JobStage, JobStatus
from gql_service.redis_conn import sync_client
from gql_service.settings import RedisTarget, Settings
from gql_service.worker import outbox
from gql_service.worker.job_ends import fail_job

log = logging.getLogger(__name__)

BATCH = 500
MAX_PER_PASS = 20_000  # a larger backlog is looked at over several passes, oldest first
# RQ is done with a job in these states; in any other it runs, retries or holds it back itself.
RQ_ENDED = {RQJobStatus.FINISHED, RQJobStatus.FAILED, RQJobStatus.STOPPED, RQJobStatus.CANCELED}

# The lock is renewed (and released) only by its holder.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# How long a revival's write-once mark is kept: far longer than redis-py's retries of it.
ONCE_TTL_S = 600


class Reconciler:
    def __init__(self, redis: Redis, queues: queueing.Queues, settings: Settings, *, consumer: str) -> None:
        self.redis = redis
        self.queues = queues  # by priority: a job goes back on its own priority's queue
        self.settings = settings
        self.consumer = consumer
        self.interval_s = settings.reconcile_interval_s
        self.lock_ttl_s = max(1, int(self.interval_s * 3))

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    await self.reconcile()
                except (RedisError, OSError) as exc:  # Redis away (a failover, say): next time
                    log.warning("reconciler: %s: %s", type(exc).__name__, exc)
                except Exception:  # a bug: logged whole, and the reconciler lives on
                    log.exception("reconciler: the pass failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval_s)
        finally:
            with contextlib.suppress(RedisError, OSError):  # another process takes over at once
                await self.redis.eval(_RELEASE_LUA, 1, keys.RECONCILE_LOCK, self.consumer)

    async def _lead(self) -> bool:
        """Whether this process makes the pass (one process does, cluster-wide)."""
        if await self.redis.set(keys.RECONCILE_LOCK, self.consumer, nx=True, ex=self.lock_ttl_s):
            return True
        return await self._still_lead()

    async def _still_lead(self) -> bool:
        renewed = await self.redis.eval(_RENEW_LUA, 1, keys.RECONCILE_LOCK, self.consumer, self.lock_ttl_s)
        return bool(renewed)

    async def reconcile(self) -> int:
        """One pass, if this process leads; how many jobs it queued again or failed."""
        if not await self._lead():
            return 0
        still_since_ms = (time.time() - self.interval_s) * 1000
        # The candidates first, then the work: what the pass changes leaves the window (or
        # the set), and paging through it meanwhile would skip jobs.
        members: Any = await self.redis.zrangebyscore(keys.LIVE_JOBS, "-inf", still_since_ms, start=0, num=MAX_PER_PASS)
        job_ids = [keys.job_id_of(member.decode()) for member in members]
        acted = 0
        for start in range(0, len(job_ids), BATCH):
            if start and not await self._still_lead():
                break  # the pass took longer than the lock: another process goes on
            acted += await self._batch(job_ids[start : start + BATCH])
        return acted

    async def _batch(self, job_ids: list[str]) -> int:
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(keys.job(job_id), "d")
                pipe.hget(RQJob.key_for(job_id), "status")
            found = await pipe.execute()
        lost: list[tuple[JobRecord, str | None]] = []
        for n, job_id in enumerate(job_ids):
            raw, rq_status = found[2 * n], found[2 * n + 1]
            record = store.decode(raw) if raw is not None else None
            if record is None or record.terminal:  # expired, or its end came since
                await self.redis.zrem(keys.LIVE_JOBS, keys.job(job_id))
                continue
            status = None if rq_status is None else rq_status.decode()
            if status is not None and status not in RQ_ENDED:
                continue  # RQ holds it (a state it runs, retries or holds back, or one unknown here)
            lost.append((record, status))
        # An ECONOMY batch's job has no RQ job either until the economy loop hands it over.
        maybe_held = [(r.id, r.batch_id) for r, status in lost if status is None and r.batch_id]
        waiting = await economy_store.held(self.redis, maybe_held) if maybe_held else []
        held = {job_id for (job_id, _), is_held in zip(maybe_held, waiting, strict=True) if is_held}
        acted = 0
        for record, status in lost:
            if record.id not in held:
                acted += await self._revive(record, status)
        return acted

    async def _revive(self, record: JobRecord, rq_status: str | None) -> int:
        settings = self.settings
        bound, ack, ttl_s = settings.outbox_max_len, settings.replica_ack, settings.result_ttl_s
        lost = "RQ has no job for it" if rq_status is None else f"RQ's job for it is {rq_status}"
        if record.attempts >= settings.llm_max_attempts:
            log.warning("job %s: %s, and no attempts are left: FAILED", record.id, lost)
            message = f"the job's queue entry was lost ({lost}; a Redis failover?) and no attempts are left"
            error = JobError(code=JobErrorCode.WORKER_LOST, message=message)
            await fail_job(self.redis, record.id, error, ttl_s=ttl_s, outbox_max_len=bound, ack=ack)
            return 1
        message = f"the job's queue entry was lost ({lost}; a Redis failover?); queued again"
        error = JobError(code=JobErrorCode.WORKER_LOST, message=message, retryable=True)

        def requeued(job: JobRecord) -> JobRecord | None:
            if job.version != record.version:
                return None  # changed since it was read: someone is at work on it
            return job.model_copy(update={"status": JobStatus.RETRYING, "stage": JobStage.QUEUED, "error": error})

        token = uuid.uuid4().hex  # this revival's: its two writes land once each, whatever the network does
        done = await store.transition(self.redis, record.id, requeued, ttl_s=ttl_s, last_seen=record, token=token)
        if not done.changed or done.record is None:
            return 0
        log.warning("job %s: %s; queued again", record.id, lost)
        attempts_left = settings.llm_max_attempts - record.attempts
        await queueing.prime(self.queues, self.redis)
        queue = self.queues[record.priority or JobPriority.NORMAL]  # where RQ's job was too
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.multi()  # RQ's enqueue starts one itself unless it is in one already
            pipe.set(keys.write_once(token), 1, ex=ONCE_TTL_S)
            if rq_status is not None:
                # RQ's ended job under the same id: gone first, with the expiry RQ gave it
                # when it ended and its place in the ended registries, so the job queued
                # again is a new one and outlives that expiry.
                pipe.delete(RQJob.key_for(record.id))
                pipe.zrem(queue.failed_job_registry.key, record.id)
                pipe.zrem(queue.finished_job_registry.key, record.id)
            queueing.enqueue_extraction(self.queues, done.record, pipe, settings, attempts_left=attempts_left)
            await redis_conn.run_once(self.redis, pipe, keys.write_once(token))  # a lost reply must not queue it twice
        return 1


def start_in_thread(target: RedisTarget, settings: Settings, *, consumer: str) -> Callable[[], None]:
    """The worker process's reconciler; returns what stops it."""
    queues = queueing.llm_queues(settings, sync_client(target))
    return outbox.start_in_thread(
        lambda redis: Reconciler(redis, queues, settings, consumer=consumer), target, name="reconciler"
    )
