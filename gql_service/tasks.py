"""The RQ job function and the worker resources it runs with.

RQ calls `run_extraction(job_id)` in a forked work horse. The provider and settings are
created once in the worker process by `init()` before it starts working (arq-style
start-up resources), so each fork inherits them instead of re-importing the SDK.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from redis import Redis
from rq import get_current_job
from rq.exceptions import AbandonedJobError
from rq.job import Job as RQJob
from rq.timeouts import JobTimeoutException

from . import metrics, store
from .llm import FallsBackToJsonMode, Provider
from .models import JobError, JobErrorCode, JobRecord, JobStage, JobStatus
from .pipeline import Attempt, RetryLater, fail_job
from .provider_limits import ProviderLimits
from .settings import Settings, load_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    provider: Provider


_context: WorkerContext | None = None


def init(context: WorkerContext) -> None:
    global _context
    _context = context


def _get_context() -> WorkerContext:
    # A worker started by plain `rq worker` still works: build the context on first use.
    if _context is None:
        from .llm.factory import make_provider

        settings = load_settings()
        init(WorkerContext(settings=settings, provider=make_provider(settings)))
    assert _context is not None
    return _context


def run_extraction(job_id: str) -> str | None:
    ctx = _get_context()
    rq_job = get_current_job()
    assert rq_job is not None, "run_extraction runs inside an RQ worker"
    redis = rq_job.connection
    adopt_retry_policy(rq_job, ctx.settings)
    ttl_s = ctx.settings.result_ttl_s
    limits = ProviderLimits(
        redis,
        endpoint=ctx.provider.endpoint,
        max_in_flight=ctx.settings.llm_max_in_flight,
        call_timeout_s=ctx.settings.llm_timeout_s,
    )
    attempt = Attempt(redis, ctx.provider, job_id, ttl_s=ttl_s, limits=limits)
    try:
        with _json_mode_memory(redis, ctx.provider):
            record = attempt.run(retries_left=rq_job.retries_left or 0)
    except RetryLater:
        raise
    except JobTimeoutException:
        fail_job(
            redis, job_id, JobError(code=JobErrorCode.TIMEOUT, message="the job ran past JOB_TIMEOUT_S"), ttl_s=ttl_s
        )
        return None
    except Exception as exc:
        # A bug or an outage mid-job: the record must not stay STARTED.
        log.exception("job %s crashed", job_id)
        fail_job(
            redis,
            job_id,
            JobError(code=JobErrorCode.INTERNAL, message=f"internal error: {type(exc).__name__}"),
            ttl_s=ttl_s,
        )
        return None
    return record.status.value if record else None


def adopt_retry_policy(rq_job: RQJob, settings: Settings) -> None:
    """At a job's first attempt, the worker's LLM_MAX_ATTEMPTS and RETRY_BACKOFF_S become its
    RQ retry policy: they are set where jobs run, not on the API that queued them."""
    if rq_job.retries_left is not None:
        return  # decided at an earlier attempt
    retries = max(settings.llm_max_attempts - 1, 0)
    intervals = [min(int(settings.retry_backoff_s * 2**i), MAX_BACKOFF_S) for i in range(retries)]
    rq_job.retries_left, rq_job.retry_intervals = retries, intervals
    # Saved at once: if this process dies, abandoned-job detection reads it from Redis.
    rq_job.connection.hset(rq_job.key, mapping={"retries_left": retries, "retry_intervals": json.dumps(intervals)})


MAX_BACKOFF_S = 300
JSON_MODE_MEMORY_S = 24 * 3600


@contextmanager
def _json_mode_memory(redis: Redis, provider: Provider) -> Iterator[None]:
    """Share "this endpoint refuses JSON schemas" with every job and worker, so each job
    doesn't pay a refused call first (a work horse's own flip dies with it)."""
    if not isinstance(provider, FallsBackToJsonMode):
        yield
        return
    provider.json_schema = not store.json_mode_only(redis, provider.endpoint)
    learnt_here = provider.json_schema
    try:
        yield
    finally:
        if learnt_here and not provider.json_schema:
            store.remember_json_mode_only(redis, provider.endpoint, ttl_s=JSON_MODE_MEMORY_S)


def worker_lost(redis: Redis, rq_job: RQJob) -> JobRecord | None:
    """The process running this job died (SIGKILL, OOM): say so, and whether it runs again."""
    ttl_s = _get_context().settings.result_ttl_s
    retries_left = rq_job.retries_left or 0
    log.warning("job %s: its worker was lost; %d retries left", rq_job.id, retries_left)
    if retries_left > 0:
        error = JobError(code=JobErrorCode.WORKER_LOST, message="the worker running this job died", retryable=True)

        def to_retrying(job: JobRecord) -> JobRecord:
            return job.model_copy(update={"status": JobStatus.RETRYING, "stage": JobStage.QUEUED, "error": error})

        record, _ = store.update_job(redis, rq_job.id, to_retrying, ttl_s=ttl_s)
        return record
    error = JobError(code=JobErrorCode.WORKER_LOST, message="the worker running this job died, no attempts left")
    record = fail_job(redis, rq_job.id, error, ttl_s=ttl_s)
    metrics.record_attempt(
        redis, final=("FAILED", "WORKER_LOST"), stage_seconds=(), llm_seconds=(), prompt_tokens=0, completion_tokens=0
    )
    return record


def on_failure(
    rq_job: RQJob,
    connection: Redis,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
    *_: Any,
) -> None:
    """RQ's failure callback. Only an abandoned job (its whole worker died) needs us here:
    every other failure was already written to the record by the task itself."""
    if exc_type is AbandonedJobError or isinstance(exc, AbandonedJobError):
        worker_lost(connection, rq_job)
