"""RQ's own worker classes, tuned: the forking `Worker` and the in-process `SimpleWorker`."""

from __future__ import annotations

import logging
from typing import Any

from rq import SimpleWorker, Worker
from rq.job import Job as RQJob

from gql_service import tracing
from gql_service.worker import deliveries, tasks, trace_drops
from gql_service.worker.tuning import Tuning, is_extraction

log = logging.getLogger(__name__)


HORSE_FLUSH_MS = 500


class ServiceWorker(Tuning, Worker):
    """RQ's forking worker: each job in its own work horse process, so a crash, a leak or a
    stop request ends that process and nothing else."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        args, kwargs = self.tuned(args, kwargs)
        super().__init__(*args, **kwargs)

    def perform_job(self, job: RQJob, queue: Any, *args: Any, **kwargs: Any) -> bool:
        try:
            return super().perform_job(job, queue, *args, **kwargs)
        finally:
            if self._is_horse:
                # The horse ends with os._exit, which skips every exit hook: its spans are
                # sent now, for at most HORSE_FLUSH_MS (the worker waits for its horse), and
                # what it dropped is reported (its worker's reports count only their own).
                tracing.flush(HORSE_FLUSH_MS)
                if tracing.active():
                    trace_drops.report(self.connection)

    def handle_work_horse_killed(self, job: RQJob, retpid: int, ret_val: int, rusage: Any) -> None:
        # The horse died under a live worker (OOM killer, SIGKILL); RQ retries it next.
        # Its retry policy was set by the horse (tasks.adopt_retry_policy): read it back.
        job.refresh()
        if is_extraction(job):
            tasks.worker_lost(job)
        else:  # a webhook delivery: RQ runs no failure callback for a dead horse, so count it here
            deliveries.on_failure(job, self.connection, None)
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)


class InlineServiceWorker(Tuning, SimpleWorker):
    """WORKER_CLASS=simple: jobs run in the worker process itself, one at a time.

    The price: a running job can't be stopped by cancelJob (its record is CANCELED at once
    all the same, and nothing the attempt writes afterwards is kept), and a crash takes the
    worker process with it (the pool starts another; the job is retried as WORKER_LOST).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        args, kwargs = self.tuned(args, kwargs)
        super().__init__(*args, **kwargs)
