"""Spans a worker process dropped, where /metrics shows them.

A span that finds its process's export queue full (OTEL_BSP_MAX_QUEUE_SIZE: the collector is
slow or away) is dropped and counted in the process's `gqls_trace_spans_dropped`
(gql_service.trace_export). A worker serves no /metrics: what it drops is added to a
cluster-wide count in Redis, which the API renders as `gqls_worker_trace_spans_dropped_total`
(gql_service.metrics), as the workers' other figures are.

Never on a span's path, and never failing anything: a thread of the worker reads the local
count once every REPORT_EVERY_S (one number, no I/O) and writes to Redis only when it has
grown; a Redis that does not answer leaves the drops for the next report. A fork worker's
work horse, which ends without running the thread again, reports its own as it ends.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from redis import Redis
from redis.exceptions import RedisError

from gql_service import metrics
from gql_service.redis_conn import sync_client
from gql_service.settings import RedisTarget

log = logging.getLogger(__name__)

REPORT_EVERY_S = 1.0
REDIS_TIMEOUT_S = 2.0  # a report waits no longer for Redis (it is on a thread of its own, and at stop)
DROPPED_SAMPLE = "gqls_trace_spans_dropped_total"  # gql_service.tracing.SPANS_DROPPED, in metrics.REGISTRY

_lock = threading.Lock()
_reported = 0.0  # of this process's count, what is in Redis already


def _dropped() -> float:
    return metrics.REGISTRY.get_sample_value(DROPPED_SAMPLE) or 0.0


def _forked() -> None:
    # A forked child (a pool's worker, a work horse) inherits its parent's count: what the
    # parent dropped is the parent's to report, so the child reports only what it adds.
    global _lock, _reported
    _lock = threading.Lock()  # a lock no other thread can hold in the child
    _reported = _dropped()


os.register_at_fork(after_in_child=_forked)


def report(redis: Redis) -> None:
    """Add what this process dropped since its last report to the cluster's count."""
    global _reported
    with _lock:
        new = int(_dropped() - _reported)
        if new <= 0:
            return
        try:
            metrics.record_spans_dropped(redis, new)
        except (RedisError, OSError) as exc:
            log.debug("dropped spans not reported yet (%s: %s)", type(exc).__name__, exc)
            return
        _reported += new


def start(target: RedisTarget) -> Callable[[], None]:
    """Report every REPORT_EVERY_S from a thread of this process; returns what stops it
    (reporting a last time: call it after tracing's shutdown, which may drop more)."""
    redis = sync_client(target, timeout_s=REDIS_TIMEOUT_S, name="gqls-trace-drops", max_connections=1)
    stopping = threading.Event()

    def run() -> None:
        while not stopping.wait(REPORT_EVERY_S):
            try:
                report(redis)
            except Exception:  # a bug here must not end the reports, nor anything else
                log.exception("reporting dropped spans failed")

    thread = threading.Thread(target=run, name="trace-drops", daemon=True)
    thread.start()

    def stop() -> None:
        stopping.set()
        thread.join(REDIS_TIMEOUT_S * 3)
        report(redis)
        redis.close()

    return stop
