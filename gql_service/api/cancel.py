"""Cancelling jobs: the one path behind cancelJob and cancelBatch.

The record is made CANCELED first (a terminal transition, so nothing the worker writes later
can undo it), waiting for replicas like any job end (REDIS_MIN_REPLICAS_ACKED); counted in
the jobs metric; then the RQ job is stopped, which only saves the work: a running one gets
RQ's stop command, a queued one is taken off its queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import anyio.to_thread
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job as RQJob
from rq.job import JobStatus as RQJobStatus

from gql_service import keys, store
from gql_service.api.calls import redis_call
from gql_service.api.errors import ServiceUnavailable
from gql_service.models import JobError, JobErrorCode, JobRecord, JobStage, JobStatus, utcnow
from gql_service.settings import Settings


def canceling(message: str) -> store.Change:
    """The change that ends a job CANCELED (by its client, or with its batch)."""
    error = JobError(code=JobErrorCode.CANCELED, message=message)

    def to_canceled(job: JobRecord) -> JobRecord:
        update = {"status": JobStatus.CANCELED, "stage": JobStage.CANCELED, "error": error, "finished_at": utcnow()}
        return job.model_copy(update=update)

    return to_canceled


@dataclass(frozen=True)
class Canceled:
    done: list[store.Transition]  # each job's, in order: its state after, and whether this cancel ended it
    unconfirmed: store.EndNotReplicated | None  # an end the replicas did not confirm in time


class Canceller:
    def __init__(self, *, redis: AsyncRedis, acked_redis: AsyncRedis, sync_redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.acked_redis = acked_redis  # the pool of writes that wait for replicas
        self.sync_redis = sync_redis
        self.settings = settings

    async def cancel(self, job_ids: list[str], reason: str, *, seen: list[JobRecord] | None = None) -> Canceled:
        """Cancel these jobs (`seen`: their records as just read, tried first without a read).
        An end the replicas did not confirm is still an end on the primary: the work is
        stopped all the same, and the caller answers SERVICE_UNAVAILABLE."""
        change = canceling(reason)
        known = {r.id: r for r in seen or []}
        unconfirmed: list[store.EndNotReplicated] = []

        async def one(job_id: str) -> store.Transition:
            try:
                return await store.transition(
                    self.acked_redis, job_id, change, ttl_s=self.settings.result_ttl_s,
                    outbox_max_len=self.settings.outbox_max_len, ack=self.settings.replica_ack,
                    last_seen=known.get(job_id),
                )  # fmt: skip
            except store.EndNotReplicated as exc:
                unconfirmed.append(exc)
                return exc.done

        async with redis_call(self.settings.redis_timeout_s):
            done = await asyncio.gather(*(one(job_id) for job_id in job_ids))
        ended = [d.record for d in done if d.changed and d.record is not None]
        if ended:
            with contextlib.suppress(ServiceUnavailable):  # a metric is not worth failing the cancel
                async with redis_call(self.settings.redis_timeout_s):
                    await self.redis.hincrby(keys.metrics("jobs"), "CANCELED|CANCELED", len(ended))
            # RQ's API is synchronous: a thread, abandoned (and ended by its socket timeout)
            # if Redis hangs.
            async with redis_call(self.settings.redis_timeout_s):
                await anyio.to_thread.run_sync(self._stop_rq_jobs, [r.id for r in ended], abandon_on_cancel=True)
        return Canceled(done, unconfirmed[0] if unconfirmed else None)

    def _stop_rq_jobs(self, job_ids: list[str]) -> None:
        for rq_job in RQJob.fetch_many(job_ids, connection=self.sync_redis):
            if rq_job is not None:  # (None: already gone, nothing left to stop)
                self._stop_rq_job(rq_job)

    def _stop_rq_job(self, rq_job: RQJob, *, fresh: bool = False) -> None:
        with contextlib.suppress(NoSuchJobError, InvalidJobOperation):
            if rq_job.get_status(refresh=fresh) == RQJobStatus.STARTED:
                send_stop_job_command(self.sync_redis, rq_job.id)
                return
            try:
                rq_job.cancel()
            except ValueError:
                # RQ's cancel lists the job's executions and reads each: a worker that took
                # the job after it was read here, and ended an execution in between, makes
                # it raise ("Execution ... not found"). Decide again on what the job is now.
                if fresh:
                    raise
                self._stop_rq_job(rq_job, fresh=True)
