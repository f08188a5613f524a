"""Running RQ workers: the task module and the provider are ready before any fork.

Three worker classes, all shaped like RQ's own (a subclass with hooks):

* `AsyncServiceWorker` (WORKER_CLASS=async, the default): up to WORKER_CONCURRENCY jobs at
  once on one asyncio event loop, one RQ execution per running job.
* `ServiceWorker` (fork): RQ's forking `Worker`, a work horse process per job.
* `InlineServiceWorker` (simple): RQ's `SimpleWorker`, one job at a time in the process.
"""

from __future__ import annotations

import gc
import logging

from rq.worker import BaseWorker
from rq.worker_pool import WorkerPool

from gql_service import keys
from gql_service.redis_conn import sync_client
from gql_service.settings import Settings
from gql_service.worker import context
from gql_service.worker.async_worker import AsyncServiceWorker
from gql_service.worker.llm.factory import make_fallbacks, make_provider
from gql_service.worker.rq_workers import InlineServiceWorker, ServiceWorker
from gql_service.worker.tuning import Tuning

log = logging.getLogger(__name__)

WORKER_CLASSES: dict[str, type[BaseWorker]] = {
    "async": AsyncServiceWorker,
    "fork": ServiceWorker,
    "simple": InlineServiceWorker,
}


def run_workers(
    settings: Settings,
    *,
    num_workers: int = 1,
    concurrency: int | None = None,
    burst: bool = False,
) -> None:
    provider, fallbacks = make_provider(settings), make_fallbacks(settings)
    for each in (provider, *fallbacks):
        warm_up = getattr(each, "warm_up", None)
        if warm_up is not None:
            warm_up()  # load models/lexicons once; every work horse inherits them by fork
    context.start(
        context.WorkerContext(settings=settings, provider=provider, redis_target=settings.redis_target,
                              fallbacks=fallbacks)
    )  # fmt: skip
    Tuning.lost_after_s = settings.worker_lost_after_s
    Tuning.job_timeout_s = settings.job_timeout_s
    Tuning.rq_queue, Tuning.share_every = settings.rq_queue, settings.priority_share_every
    AsyncServiceWorker.concurrency = concurrency or settings.worker_concurrency
    AsyncServiceWorker.webhook_concurrency = settings.webhook_concurrency
    worker_class = WORKER_CLASSES[settings.worker_class]
    # The LLM queues first, HIGH to LOW (reordered after each take: worker/priorities.py): a
    # worker of one job at a time (fork, simple) takes a delivery only when no LLM job waits.
    queues = [*keys.llm_queues(settings.rq_queue), keys.webhook_queue(settings.rq_queue)]
    # Everything loaded so far lives as long as the process: keep the collector from
    # scanning it, so forked work horses don't copy the pages it would touch (measured:
    # about 3 ms less per job).
    gc.collect()
    gc.freeze()
    per_process = f" x {AsyncServiceWorker.concurrency} jobs" if settings.worker_class == "async" else ""
    log.info(
        "worker: queues %r, provider %s (%s)%s, %d %s process(es)%s",
        queues,
        settings.provider,
        provider.model,
        "".join(f", then {f.model}" for f in fallbacks),
        num_workers,
        settings.worker_class,
        per_process,
    )
    if num_workers == 1:
        worker_class(queues).work(with_scheduler=True, burst=burst)
    else:
        pool = WorkerPool(
            queues, connection=sync_client(settings.redis_target), num_workers=num_workers, worker_class=worker_class
        )
        pool.start(burst=burst)
