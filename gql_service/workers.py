"""Running RQ workers: the task module and the provider are ready before any fork."""

from __future__ import annotations

import gc
import logging
from typing import Any, ClassVar

from rq import Queue, SimpleWorker, Worker
from rq.job import Job as RQJob
from rq.worker import BaseWorker
from rq.worker_pool import WorkerPool

from . import logs, store, tasks
from .llm.factory import make_provider
from .redis_conn import sync_client
from .settings import Settings

log = logging.getLogger(__name__)


class _Tuning:
    """How a worker notices a crashed job within WORKER_LOST_AFTER_S.

    Stock RQ keeps a started job's registry entry alive for its heartbeat interval plus a
    fixed 60 s, and cleans registries every 10 minutes, so a job whose worker was SIGKILLed
    could sit STARTED for over ten minutes. Here the heartbeat, the registry cleanup and the
    idle wait all scale with one setting.
    """

    lost_after_s: ClassVar[int] = 60
    job_timeout_s: ClassVar[int] = 180

    @classmethod
    def tuned(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        third = max(1, cls.lost_after_s // 3)
        kwargs.setdefault("job_monitoring_interval", third)
        kwargs.setdefault("maintenance_interval", third)
        kwargs.setdefault("worker_ttl", third + 15)  # RQ waits worker_ttl - 15 s for work when idle
        return kwargs

    def get_heartbeat_ttl(self, job: RQJob, working_time: float = 0.0) -> int:
        return self.lost_after_s

    def execute_job(self, job: RQJob, queue: Queue) -> None:
        # JOB_TIMEOUT_S is the worker's setting, not the one of the API that queued the job:
        # set before the fork, it bounds the work horse and its monitor alike.
        job.timeout = self.job_timeout_s
        # RQ's own lines about the job (and the work horse, which inherits this) carry the
        # request id of the submission that created it.
        record = store.get_job_sync(self.connection, job.id)  # type: ignore[attr-defined]
        token = logs.request_id.set(record.request_id if record else None)
        try:
            super().execute_job(job, queue)  # type: ignore[misc]
        finally:
            logs.request_id.reset(token)


class ServiceWorker(_Tuning, Worker):
    """RQ's forking worker (the default): each job in its own work horse process, so a
    crash, a leak or a stop request ends that process and nothing else."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **self.tuned(kwargs))

    def handle_work_horse_killed(self, job: RQJob, retpid: int, ret_val: int, rusage: Any) -> None:
        # The horse died under a live worker (OOM killer, SIGKILL); RQ retries it next.
        # Its retry policy was set by the horse (tasks.adopt_retry_policy): read it back.
        job.refresh()
        tasks.worker_lost(self.connection, job)
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)


class InlineServiceWorker(_Tuning, SimpleWorker):
    """WORKER_CLASS=simple: jobs run in the worker process itself, no fork per job.

    Measured in BENCHMARKS.md: about 3 ms of overhead per job instead of about 17 ms. The
    price: a running job can't be stopped by cancelJob (its record is CANCELED at once all
    the same, and nothing the attempt writes afterwards is kept), and a crash takes the
    worker process with it (the pool starts another; the job is retried as WORKER_LOST).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **self.tuned(kwargs))


def run_workers(settings: Settings, *, redis_url: str, num_workers: int = 1, burst: bool = False) -> None:
    provider = make_provider(settings)
    warm_up = getattr(provider, "warm_up", None)
    if warm_up is not None:
        warm_up()  # load models/lexicons once; every work horse inherits them by fork
    tasks.init(tasks.WorkerContext(settings=settings, provider=provider))
    _Tuning.lost_after_s = settings.worker_lost_after_s
    _Tuning.job_timeout_s = settings.job_timeout_s
    worker_class: type[BaseWorker] = InlineServiceWorker if settings.worker_class == "simple" else ServiceWorker
    connection = sync_client(redis_url)
    # Everything loaded so far lives as long as the process: keep the collector from
    # scanning it, so forked work horses don't copy the pages it would touch (measured:
    # about 3 ms less per job).
    gc.collect()
    gc.freeze()
    log.info(
        "worker: queue %r, provider %s (%s), %d %s process(es)",
        settings.rq_queue,
        settings.provider,
        provider.model,
        num_workers,
        settings.worker_class,
    )
    if num_workers == 1:
        worker_class([settings.rq_queue], connection=connection).work(with_scheduler=True, burst=burst)
    else:
        pool = WorkerPool(
            [settings.rq_queue], connection=connection, num_workers=num_workers, worker_class=worker_class
        )
        pool.start(burst=burst)
