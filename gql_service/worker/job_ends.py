"""A job's writes from a worker: a transition whose end the replicas did not confirm stands
all the same, and a job failed from outside an attempt (crash handlers, the reconciler)."""

from __future__ import annotations

import logging
from typing import Any

from redis.asyncio import Redis

from gql_service import store
from gql_service.models import JobError, JobRecord, JobStage, JobStatus, utcnow
from gql_service.settings import ReplicaAck

log = logging.getLogger(__name__)


async def transition(redis: Redis, job_id: str, change: store.Change, **options: Any) -> store.Transition:
    """`store.transition`; an end that replicas did not confirm in time stands all the same.

    There is no client waiting to be told SERVICE_UNAVAILABLE: the end is on the primary,
    and should a failover lose it, the job's record is back where it was before and the
    reconciler queues the job again (gql_service.worker.reconciler)."""
    try:
        return await store.transition(redis, job_id, change, **options)
    except store.EndNotReplicated as exc:
        log.warning("job %s: its end is not confirmed by the replicas (%s)", job_id, exc)
        return exc.done


async def fail_job(
    redis: Redis,
    job_id: str,
    error: JobError,
    *,
    ttl_s: int,
    outbox_max_len: int = store.OUTBOX_MAX_LEN,
    ack: ReplicaAck | None = None,
) -> JobRecord | None:
    """End a job as FAILED from outside an attempt (crash handlers, enqueue failures)."""

    def change(job: JobRecord) -> JobRecord:
        return job.model_copy(
            update={"status": JobStatus.FAILED, "stage": JobStage.FAILED, "error": error, "finished_at": utcnow()}
        )

    done = await transition(redis, job_id, change, ttl_s=ttl_s, outbox_max_len=outbox_max_len, ack=ack)
    return done.record
