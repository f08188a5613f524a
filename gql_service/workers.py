"""Running RQ workers: the task module and the provider are ready before any fork."""

from __future__ import annotations

import logging

from rq import Worker
from rq.worker_pool import WorkerPool

from . import tasks
from .llm.factory import make_provider
from .redis_conn import sync_client
from .settings import Settings

log = logging.getLogger(__name__)


def run_workers(settings: Settings, *, redis_url: str, num_workers: int = 1, burst: bool = False) -> None:
    provider = make_provider(settings)
    warm_up = getattr(provider, "warm_up", None)
    if warm_up is not None:
        warm_up()  # load models/lexicons once; every work horse inherits them by fork
    tasks.init(tasks.WorkerContext(settings=settings, provider=provider))
    connection = sync_client(redis_url)
    log.info(
        "worker: queue %r, provider %s (%s), %d process(es)",
        settings.rq_queue,
        settings.provider,
        provider.model,
        num_workers,
    )
    if num_workers == 1:
        Worker([settings.rq_queue], connection=connection).work(with_scheduler=True, burst=burst)
    else:
        WorkerPool([settings.rq_queue], connection=connection, num_workers=num_workers).start(burst=burst)
