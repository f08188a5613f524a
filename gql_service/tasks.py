"""The RQ job function and the worker resources it runs with.

RQ calls `run_extraction(job_id)` in a forked work horse. The provider and settings are
created once in the worker process by `init()` before it starts working (arq-style
start-up resources), so each fork inherits them instead of re-importing the SDK.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from rq import get_current_job
from rq.timeouts import JobTimeoutException

from .llm import Provider
from .models import JobError, JobErrorCode
from .pipeline import Attempt, RetryLater, fail_job
from .settings import Settings, load_settings

log = logging.getLogger(__name__)

TASK = "gql_service.tasks.run_extraction"
"""Enqueued by name, so the API never imports the LLM stack."""


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
    ttl_s = ctx.settings.result_ttl_s
    attempt = Attempt(redis, ctx.provider, job_id, ttl_s=ttl_s)
    try:
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
