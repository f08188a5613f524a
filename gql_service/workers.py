"""Running RQ workers: the task module and the provider are ready before any fork."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from rq import Worker
from rq.job import Job as RQJob
from rq.worker_pool import WorkerPool

from . import tasks
from .llm.factory import make_provider
from .redis_conn import sync_client
from .settings import Settings

log = logging.getLogger(__name__)


class ServiceWorker(Worker):
    """RQ's forking worker, tuned so a crashed job is noticed within WORKER_LOST_AFTER_S.

    Stock RQ keeps a started job's registry entry alive for its heartbeat interval plus a
    fixed 60 s, and cleans registries every 10 minutes, so a job whose worker was SIGKILLed
    could sit STARTED for over ten minutes. Here the heartbeat, the registry cleanup and the
    idle wait all scale with one setting.
    """

    lost_after_s: ClassVar[int] = 60

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        third = max(1, self.lost_after_s // 3)
        kwargs.setdefault("job_monitoring_interval", third)
        kwargs.setdefault("maintenance_interval", third)
        kwargs.setdefault("worker_ttl", third + 15)  # RQ waits worker_ttl - 15 s for work when idle
        super().__init__(*args, **kwargs)

    def get_heartbeat_ttl(self, job: RQJob, working_time: float = 0.0) -> int:
        return self.lost_after_s

    def handle_work_horse_killed(self, job: RQJob, retpid: int, ret_val: int, rusage: Any) -> None:
        # The horse died under a live worker (OOM killer, SIGKILL); RQ retries it next.
        tasks.worker_lost(self.connection, job)
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)


def run_workers(settings: Settings, *, redis_url: str, num_workers: int = 1, burst: bool = False) -> None:
    provider = make_provider(settings)
    warm_up = getattr(provider, "warm_up", None)
    if warm_up is not None:
        warm_up()  # load models/lexicons once; every work horse inherits them by fork
    tasks.init(tasks.WorkerContext(settings=settings, provider=provider))
    ServiceWorker.lost_after_s = settings.worker_lost_after_s
    connection = sync_client(redis_url)
    log.info(
        "worker: queue %r, provider %s (%s), %d process(es)",
        settings.rq_queue,
        settings.provider,
        provider.model,
        num_workers,
    )
    if num_workers == 1:
        ServiceWorker([settings.rq_queue], connection=connection).work(with_scheduler=True, burst=burst)
    else:
        pool = WorkerPool(
            [settings.rq_queue], connection=connection, num_workers=num_workers, worker_class=ServiceWorker
        )
        pool.start(burst=burst)
