"""The RQ job function, and what RQ's hooks do when a job's run ends otherwise.

`run_extraction(ctx, job_id)` is a coroutine function, and the one implementation every
worker class runs, with the worker's resources handed in as `ctx`
(gql_service.worker.context): the async worker awaits it on its event loop beside the other
jobs in flight; RQ's fork and simple workers run it with `asyncio.run`, a new loop per job.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, TypeVar

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline as AsyncPipeline
from redis.exceptions import RedisError
from rq import get_current_job
from rq.exceptions import AbandonedJobError
from rq.job import Job as RQJob
from rq.timeouts import JobTimeoutException

from gql_service import keys, metrics, queueing, store
from gql_service.models import JobError, JobErrorCode, JobRecord, JobStage, JobStatus
from gql_service.partials import Demand, PartialStream
from gql_service.redis_conn import async_client
from gql_service.settings import Settings
from gql_service.worker import job_ends
from gql_service.worker.context import WorkerContext, of_process, takes_context
from gql_service.worker.fallbacks import routes
from gql_service.worker.job_ends import fail_job
from gql_service.worker.llm import FallsBackToJsonMode, Provider
from gql_service.worker.pipeline import Attempt, RetryLater

log = logging.getLogger(__name__)

T = TypeVar("T")


@takes_context
async def run_extraction(ctx: WorkerContext, job_id: str) -> str | None:
    rq_job = get_current_job()
    assert rq_job is not None, "run_extraction runs inside an RQ worker"
    try:
        async with ctx.connected("gqls-worker", with_demand=True) as (redis, demand):
            return await _extract(ctx, redis, rq_job, job_id, demand)
    finally:
        if ctx.redis is None:
            for provider in (ctx.provider, *ctx.fallbacks):
                await provider.aclose()  # this job's event loop ends with it


# The attempt's own deadline comes this much before JOB_TIMEOUT_S, so that the job records
# its TIMEOUT itself; the worker's hard stop at JOB_TIMEOUT_S is the backstop (on_failure).
TIMEOUT_MARGIN_S = 1.0


async def _extract(
    ctx: WorkerContext, redis: AsyncRedis, rq_job: RQJob, job_id: str, demand: Demand | None
) -> str | None:
    providers = (ctx.provider, *ctx.fallbacks)
    learners = _learners(providers)
    # What a job starts with, in one round trip: its retry policy saved, what the endpoints
    # are known to refuse, its record and text.
    async with redis.pipeline(transaction=False) as pipe:
        adopt_retry_policy(pipe, rq_job, ctx.settings)
        if learners:
            pipe.mget([keys.json_mode_only(p.endpoint) for p in learners])
        job_ends.read_for_attempt(pipe, job_id)
        replies = await pipe.execute()
    read = replies[-1]
    known = [value is not None for value in replies[-2]] if learners else []
    ttl_s = ctx.settings.result_ttl_s
    primary, *fallbacks = routes(redis, ctx.settings, ctx.provider, ctx.fallbacks)
    partials = PartialStream(redis, job_id, interval_s=ctx.settings.partial_interval_ms / 1000, demand=demand)
    bound, ack = ctx.settings.outbox_max_len, ctx.settings.replica_ack
    attempt = Attempt(
        redis, ctx.provider, job_id, ttl_s=ttl_s, limits=primary.limits, fallbacks=fallbacks, partials=partials,
        outbox_max_len=bound, ack=ack, prices=ctx.settings.llm_prices, batch_discount=ctx.settings.llm_batch_discount,
    )  # fmt: skip
    timeout_s = rq_job.timeout or ctx.settings.job_timeout_s
    deadline_s = max(timeout_s - TIMEOUT_MARGIN_S, timeout_s / 2)
    try:
        async with partials, _json_mode_memory(redis, learners, known), asyncio.timeout(deadline_s):
            record = await attempt.run(retries_left=rq_job.retries_left or 0, read=job_ends.for_attempt(read))
    except (RetryLater, RedisError):
        # RedisError: the record can't be written now; RQ retries the job (or abandoned-job
        # detection does, once Redis answers) rather than it ending as an internal error.
        raise
    except TimeoutError:
        await fail_job(redis, job_id, _timed_out(), ttl_s=ttl_s, outbox_max_len=bound, ack=ack)
        return None
    except Exception as exc:
        # A bug mid-job: the record must not stay STARTED.
        log.exception("job %s crashed", job_id)
        error = JobError(code=JobErrorCode.INTERNAL, message=f"internal error: {type(exc).__name__}")
        await fail_job(redis, job_id, error, ttl_s=ttl_s, outbox_max_len=bound, ack=ack)
        return None
    return record.status.value if record else None


def _timed_out() -> JobError:
    return JobError(code=JobErrorCode.TIMEOUT, message="the job ran past JOB_TIMEOUT_S")


def adopt_retry_policy(pipe: AsyncPipeline, rq_job: RQJob, settings: Settings) -> None:
    """At a job's first attempt, the worker's LLM_MAX_ATTEMPTS and RETRY_BACKOFF_S become its
    RQ retry policy: they are set where jobs run, not on the API that queued them."""
    if rq_job.retries_left is not None:
        return  # decided at an earlier attempt
    retries = max(settings.llm_max_attempts - 1, 0)
    intervals = queueing.retry_intervals(settings, retries)
    rq_job.retries_left, rq_job.retry_intervals = retries, intervals
    # Saved at once (on `pipe`, sent before the attempt starts): if this process dies,
    # abandoned-job detection reads it from Redis.
    pipe.hset(rq_job.key, mapping={"retries_left": retries, "retry_intervals": json.dumps(intervals)})


JSON_MODE_MEMORY_S = 24 * 3600


# By the providers' ids; the providers are kept with their answer, so no id is reused meanwhile.
_LEARNERS: dict[tuple[int, ...], tuple[tuple[Provider, ...], list[Any]]] = {}


def _learners(providers: tuple[Provider, ...]) -> list[Any]:
    """The providers that learn JSON mode (FallsBackToJsonMode), found once per worker's set of
    providers: isinstance of a runtime Protocol costs tens of µs, at every job."""
    key = tuple(map(id, providers))
    known = _LEARNERS.get(key)
    if known is None:
        known = _LEARNERS[key] = (providers, [p for p in providers if isinstance(p, FallsBackToJsonMode)])
    return known[1]


@asynccontextmanager
async def _json_mode_memory(redis: AsyncRedis, learners: list[Any], known: list[bool]) -> AsyncIterator[None]:
    """Share "this endpoint refuses JSON schemas" with every job and worker, so each job
    doesn't pay a refused call first (a work horse's own flip dies with it); for the primary
    and each fallback that learns it (`learners`), `known` (read with the job's start, in one
    round trip)."""
    if not learners:
        yield
        return
    for provider, json_mode in zip(learners, known, strict=True):
        provider.json_schema = not json_mode
    asked = [p.json_schema for p in learners]
    try:
        yield
    finally:
        for provider, schema_asked in zip(learners, asked, strict=True):
            if schema_asked and not provider.json_schema:
                endpoint = provider.endpoint
                await store.remember_json_mode_only(redis, endpoint, ttl_s=JSON_MODE_MEMORY_S)


def _run(work: Callable[[AsyncRedis], Awaitable[T]]) -> T:
    """Run `work` from RQ's synchronous hooks (callbacks, the fork worker's monitor)."""

    async def main() -> T:
        redis = async_client(of_process().redis_target, name="gqls-worker")
        try:
            return await work(redis)
        finally:
            await redis.aclose()

    return asyncio.run(main())


def worker_lost(rq_job: RQJob) -> JobRecord | None:
    """The process running this job died (SIGKILL, OOM): say so, and whether it runs again."""
    settings = of_process().settings
    ttl_s, bound, ack = settings.result_ttl_s, settings.outbox_max_len, settings.replica_ack
    if rq_job.retries_left is None:
        # Lost before its first attempt set the retry policy (a worker killed, or a failover,
        # between taking the job and starting it): it has spent nothing, so it gets the
        # worker's policy now. RQ reads retries_left off this very object right after this
        # callback, and retries the job (it failed such a job for good before: attempts 0).
        retries = max(settings.llm_max_attempts - 1, 0)
        rq_job.retries_left, rq_job.retry_intervals = retries, queueing.retry_intervals(settings, retries)
    retries_left = rq_job.retries_left
    log.warning("job %s: its worker was lost; %d retries left", rq_job.id, retries_left)

    async def write(redis: AsyncRedis) -> JobRecord | None:
        if retries_left > 0:
            error = JobError(code=JobErrorCode.WORKER_LOST, message="the worker running this job died", retryable=True)

            def to_retrying(job: JobRecord) -> JobRecord:
                return job.model_copy(update={"status": JobStatus.RETRYING, "stage": JobStage.QUEUED, "error": error})

            record, _ = await store.update_job(redis, rq_job.id, to_retrying, ttl_s=ttl_s)
            return record
        error = JobError(code=JobErrorCode.WORKER_LOST, message="the worker running this job died, no attempts left")
        record = await fail_job(redis, rq_job.id, error, ttl_s=ttl_s, outbox_max_len=bound, ack=ack)
        lost = ("FAILED", "WORKER_LOST")
        await metrics.record_attempt(
            redis, final=lost, stage_seconds=(), llm_seconds=(), prompt_tokens=0, completion_tokens=0
        )
        return record

    return _run(write)


def on_failure(
    rq_job: RQJob,
    connection: Redis,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
    *_: Any,
) -> None:
    """RQ's failure callback. Every failure the task could see was already written to the
    record by the task itself; here come the ones it could not: its whole worker died
    (abandoned), or the worker's hard stop at JOB_TIMEOUT_S cut it off."""
    if exc_type is AbandonedJobError or isinstance(exc, AbandonedJobError):
        worker_lost(rq_job)
    elif exc_type is JobTimeoutException or isinstance(exc, JobTimeoutException):
        rq_job.retries_left = 0  # a timeout ends the job, as when the task records it itself
        settings = of_process().settings
        ttl_s, bound, ack = settings.result_ttl_s, settings.outbox_max_len, settings.replica_ack
        _run(lambda redis: fail_job(redis, rq_job.id, _timed_out(), ttl_s=ttl_s, outbox_max_len=bound, ack=ack))
