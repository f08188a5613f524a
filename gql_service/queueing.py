"""The RQ job that runs an extraction, queued the same way by the API (a submission) and
by the workers' reconciler (a job whose queue entry a failover lost)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline as AsyncPipeline
from rq import Callback, Queue
from rq.job import Job as RQJob
from rq.job import JobStatus as RQJobStatus
from rq.rate_limit import ACQUIRE_AND_ENQUEUE_SCRIPT, RateLimit, RateLimitRegistry
from rq.serializers import DefaultSerializer
from rq.utils import current_timestamp, now, utcformat

from gql_service import keys
from gql_service.models import JobPriority, JobRecord
from gql_service.settings import Settings

MAX_BACKOFF_S = 300
# Within one tenant's TENANT_MAX_IN_FLIGHT, held jobs go in by creation time shifted by this
# per priority step: a HIGH job goes ahead of the tenant's NORMAL jobs made up to a minute
# before it (two for LOW ones), and no held job is passed over for longer than that (aging).
HELD_AGING_S = 60.0
_HELD_SHIFT = {JobPriority.HIGH: -HELD_AGING_S, JobPriority.NORMAL: 0.0, JobPriority.LOW: HELD_AGING_S}

Queues = Mapping[JobPriority, Queue]


class _Job(RQJob):
    """RQ's job, made without re-checking RQ's default serializer against RQ's Serializer
    protocol: the queue hands it the one it resolved, and each new job checked it again, a
    slow isinstance on Python 3.11 (measured: 3 % of a submitText). None is the same default."""

    @classmethod
    def create(cls, *args: Any, **kwargs: Any) -> RQJob:
        if kwargs.get("serializer") is DefaultSerializer:
            kwargs["serializer"] = None
        return super().create(*args, **kwargs)


def llm_queues(settings: Settings, connection: Redis) -> dict[JobPriority, Queue]:
    """The RQ queue of each priority (keys.llm_queue), as the API and the reconciler queue on."""
    return {
        p: Queue(keys.llm_queue(settings.rq_queue, p.value), connection=connection, job_class=_Job) for p in JobPriority
    }


def retry_intervals(settings: Settings, retries: int) -> list[int]:
    """RQ's waits before each retry: RETRY_BACKOFF_S, doubling, at most MAX_BACKOFF_S."""
    return [min(int(settings.retry_backoff_s * 2**i), MAX_BACKOFF_S) for i in range(retries)]


async def prime(queues: Queue | Queues, redis: AsyncRedis) -> None:
    """Tell each queue the server's version from `redis`: RQ would otherwise ask for it with
    a synchronous INFO on its first enqueue, blocking the event loop (with no deadline)."""
    every = [queues] if isinstance(queues, Queue) else list(queues.values())
    if any(queue.redis_server_version is None for queue in every):
        version = str((await redis.info("server"))["redis_version"]).split(".")
        for queue in every:
            queue.redis_server_version = (int(version[0]), int(version[1]), int(version[2]))


def enqueue_extraction(
    queues: Queues, record: JobRecord, pipe: AsyncPipeline, settings: Settings, *, attempts_left: int | None = None
) -> None:
    """Queue the commands that put the job on the RQ queue of its priority onto `pipe` (a
    MULTI, usually). RQ's retries, its scheduler and the tenant cap's promotions put the job
    back on that same queue (the RQ job's `origin`).

    `attempts_left`: a job that has run before (the reconciler's) gets only what is left of
    LLM_MAX_ATTEMPTS; a new one gets its retry policy from the worker at its first attempt.
    """
    priority = record.priority or JobPriority.NORMAL
    queue = queues[priority]
    cap = settings.tenant_max_in_flight
    rq_job = queue.create_job(
        keys.TASK,
        args=(record.id,),
        job_id=record.id,
        # RQ logs this when a worker takes the job: let the request id be in that line too.
        description=f"extract {record.id} (request {record.request_id})",
        result_ttl=settings.rq_result_ttl_s,
        failure_ttl=settings.rq_result_ttl_s,
        # No timeout or retry policy here: the worker applies its own settings (workers.py, tasks.py).
        on_failure=Callback(keys.ON_FAILURE),
        rate_limit=RateLimit(keys.tenant_slots(record.tenant), cap) if cap else None,
    )
    if attempts_left is not None:
        rq_job.retries_left = max(attempts_left - 1, 0)
        rq_job.retry_intervals = retry_intervals(settings, rq_job.retries_left)
    if cap:
        _enqueue_held(queue, rq_job, pipe, cap, since=record.created_at.timestamp() + _HELD_SHIFT[priority])
    else:
        queue.enqueue_job(rq_job, pipeline=pipe)  # type: ignore[arg-type]


def _enqueue_held(queue: Queue, rq_job: RQJob, pipe: AsyncPipeline, cap: int, *, since: float) -> None:
    """Queue the commands of RQ's rate-limited enqueue (TENANT_MAX_IN_FLIGHT) on our MULTI.

    RQ's concurrency `RateLimit` is what fair tenants need: a tenant's jobs over the cap wait
    in a set of RQ's, oldest first, and RQ promotes the next one onto the queue whenever one
    of the tenant's jobs ends (workers release the slot; a retry keeps it). RQ only refuses
    to do this inside a caller's pipeline (it would run its promotion script through a
    synchronous client): these are the same writes as RQ's `_enqueue_rate_limited_job`, with
    the promotion script sent by EVAL, so the record, the idempotency key and the RQ job
    still land in one transaction. Waiting jobs are ordered by their creation time to the
    microsecond (RQ's own timestamp has whole seconds, so a batch would go in by id),
    shifted by priority (HELD_AGING_S).
    """
    registry = RateLimitRegistry.from_job(rq_job)
    rq_job.origin = queue.name
    rq_job.set_status(RQJobStatus.RATE_LIMITED, pipeline=pipe)  # type: ignore[arg-type]
    pipe.sadd(queue.redis_queues_keys, queue.key)
    registry.register(cap, pipe)  # type: ignore[arg-type]
    rq_job.save(pipeline=pipe)  # type: ignore[arg-type]
    registry.add_to_rate_limited(rq_job.id, pipe, timestamp=since)  # type: ignore[arg-type]
    pipe.eval(
        ACQUIRE_AND_ENQUEUE_SCRIPT,
        2,
        registry.allowed_key,
        registry.rate_limited_key,
        cap,
        current_timestamp(),
        utcformat(now()),
        Queue.redis_queue_namespace_prefix,
        RQJob.redis_job_namespace_prefix,
    )
