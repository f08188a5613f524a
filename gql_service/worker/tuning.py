"""What every worker class here shares: RQ tuned to notice a lost job within
WORKER_LOST_AFTER_S, one queue dequeued at a time, and the background work beside jobs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

from redis import Redis
from rq import Queue
from rq.job import Job as RQJob

from gql_service import keys, logs, store, tracing
from gql_service.redis_conn import sync_client
from gql_service.worker import context, deliveries, economy, priorities, reconciler, trace_drops

log = logging.getLogger(__name__)


@contextlib.contextmanager
def background(name: str) -> Iterator[None]:
    """While the worker works: the reconciler (gql_service.worker.reconciler), and its drainers of
    the outboxes in use (gql_service.worker.outbox): the archive's when the history is on, the
    webhooks' when they are. And tracing (OTEL_* variables), set up in each worker process (a
    pool forks its workers, and an exporter's thread does not cross a fork), shut down when
    the worker stops (SIGTERM, Ctrl-C), sending what is queued; while it is on, the spans the
    process drops are reported to the API's /metrics (gql_service.worker.trace_drops)."""
    traced = tracing.setup(tracing.WORKER_SERVICE)
    stop_reports = trace_drops.start(context.of_process().redis_target) if traced else None
    try:
        with _drainers(name):
            yield
    finally:
        tracing.shutdown()
        if stop_reports is not None:  # after the shutdown, which can drop too
            stop_reports()


@contextlib.contextmanager
def _drainers(name: str) -> Iterator[None]:
    ctx = context.of_process()
    stops = [
        reconciler.start_in_thread(ctx.redis_target, ctx.settings, consumer=name),
        economy.start_in_thread(ctx.redis_target, ctx.settings, ctx.provider),
    ]
    if ctx.settings.database_url is not None:
        from gql_service.worker import archiver  # psycopg, only where the history is on

        stops.append(archiver.start_in_thread(ctx.redis_target, ctx.settings, consumer=name))
    if ctx.settings.webhook_secret is not None:
        stops.append(deliveries.start_relay(ctx.redis_target, ctx.settings, consumer=name))
    try:
        yield
    finally:
        for stop in stops:
            stop()


class OneQueueAtATime(Queue):
    """RQ's Queue, dequeuing as RQ does for a worker of one queue, for every worker here
    (they serve the LLM queue and the webhook queue).

    For one queue RQ moves the job id into the queue's intermediate list (LMOVE), where its
    cleanup finds a job whose worker died before registering it; for several it pops it
    (BLPOP), and a worker killed in between loses the job. So: each queue in order without
    waiting (the worker's order: gql_service.worker.priorities), then a bounded wait on
    RQ_QUEUE itself, the NORMAL queue, where most jobs and their retries arrive. A job on
    another queue (HIGH, LOW, a delivery) reaching an idle worker waits at most
    DEQUEUE_WAIT_S more; a busy worker looks at every queue at each take.
    """

    def acquire_maintenance_lock(self) -> bool:
        # RQ holds the registries' cleanup lock for 899 s: a worker killed while it cleaned
        # (every few seconds here) kept every other worker from noticing lost jobs for 15
        # minutes. Held at most WORKER_LOST_AFTER_S here, the bound on noticing a lost job.
        return bool(self.connection.set(self.registry_cleaning_key, 1, nx=True, ex=Tuning.lost_after_s))

    @classmethod
    def dequeue_any(  # type: ignore[override]
        cls, queues: Iterable[Queue], timeout: int | None, connection: Redis, **kwargs: Any
    ) -> tuple[RQJob, Queue] | None:
        ordered = list(queues)
        if len(ordered) == 1:
            return super().dequeue_any(ordered, timeout, connection, **kwargs)
        for queue in ordered:
            found = super().dequeue_any([queue], None, connection, **kwargs)
            if found is not None:
                return found
        if timeout is None:
            return None
        waits_on = [q for q in ordered if q.name == Tuning.rq_queue] or ordered[:1]
        wait = min(timeout, DEQUEUE_WAIT_S)  # a fraction of a second: RQ hints int, passes it on (test_rq_internals)
        return super().dequeue_any(waits_on, wait, connection, **kwargs)  # type: ignore[arg-type]


# Short, so that an idle worker starts a HIGH job almost at once: each wait costs an idle
# worker process a few Redis commands (one look at each other queue, then the BLMOVE),
# about 16 a second, nothing to Redis. (BLMOVE takes fractions of a second; RQ passes it on.)
DEQUEUE_WAIT_S = 0.25


def is_extraction(job: RQJob) -> bool:
    """An LLM job (the others are webhook deliveries, with settings of their own)."""
    return job.func_name == keys.TASK


class Tuning:
    """How a worker notices a crashed job within WORKER_LOST_AFTER_S.

    Stock RQ keeps a started job's registry entry alive for its heartbeat interval plus a
    fixed 60 s, and cleans registries every 10 minutes, so a job whose worker was SIGKILLed
    could sit STARTED for over ten minutes. Here the heartbeat, the registry cleanup and the
    idle wait all scale with one setting.
    """

    lost_after_s: ClassVar[int] = 60
    job_timeout_s: ClassVar[int] = 180
    # The LLM queues' base name and the priority share (PRIORITY_SHARE_EVERY): set by run_workers.
    rq_queue: ClassVar[str] = "llm"
    share_every: ClassVar[int] = 10
    _takes = 0  # jobs this worker has taken: which one is next decides the queues' order

    @classmethod
    def tuned(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # RQ's worker pool gives its children a connection of its own making (a plain pool
        # with no retries, whatever the parent had): every worker connects as the service
        # does (gql_service.redis_conn: timeouts, retries, Sentinel), its queues through it.
        if args:
            queues = [args[0]] if isinstance(args[0], (str, Queue)) else list(args[0])
            args = ([q.name if isinstance(q, Queue) else q for q in queues], *args[1:])
        kwargs["connection"] = sync_client(context.of_process().redis_target)
        third = max(1, cls.lost_after_s // 3)
        kwargs.setdefault("job_monitoring_interval", third)
        kwargs.setdefault("maintenance_interval", third)
        kwargs.setdefault("worker_ttl", third + 15)  # RQ waits worker_ttl - 15 s for work when idle
        kwargs["queue_class"] = OneQueueAtATime  # RQ's pool passes its own Queue class
        kwargs["job_class"] = context.ContextJob  # jobs run with the worker's context first
        return args, kwargs

    def reorder_queues(self, reference_queue: Queue) -> None:
        """After each take (RQ calls it; the async worker too): the order of the next one."""
        self._takes += 1
        self._ordered_queues = self.order_of_take(self._takes + 1)

    def order_of_take(self, take: int) -> list[Queue]:
        """The queues in the order take number `take` looks at them (worker/priorities.py)."""
        queues: list[Queue] = self.queues  # type: ignore[attr-defined]
        return priorities.order(
            queues, [q.name for q in queues], rq_queue=self.rq_queue, take=take, every=self.share_every
        )

    def get_heartbeat_ttl(self, job: RQJob, working_time: float = 0.0) -> int:
        return self.lost_after_s

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        # RQ also gives the worker's own key (and its executions) the job's heartbeat TTL
        # when a job starts: a few seconds here, so a worker busy that long vanished from
        # Worker.all and `rq info` while alive. The worker keeps its own lifetime; a lost
        # job is still noticed by its execution's short TTL.
        floor = self.worker_ttl + 60  # type: ignore[attr-defined]
        super().heartbeat(max(timeout or floor, floor), pipeline=pipeline)  # type: ignore[misc]

    def prepare_job_execution(self, job: RQJob, remove_from_intermediate_queue: bool = False) -> None:
        # Every dequeue here goes through the intermediate list (OneQueueAtATime): always
        # take the job out of it (LREM of an id that is not there does nothing), or RQ's
        # cleanup would later fail the finished job and run it again.
        super().prepare_job_execution(job, remove_from_intermediate_queue=True)  # type: ignore[misc]

    def work(self, *args: Any, **kwargs: Any) -> bool:
        with background(self.name):  # type: ignore[attr-defined]
            return super().work(*args, **kwargs)  # type: ignore[misc, no-any-return]

    def execute_job(self, job: RQJob, queue: Queue) -> None:
        # JOB_TIMEOUT_S is the worker's setting, not the one of the API that queued the job:
        # set before the fork, it bounds the work horse and its monitor alike.
        if is_extraction(job):
            job.timeout = self.job_timeout_s
        # RQ's own lines about the job (and the work horse, which inherits this) carry the
        # request id of the submission that created it.
        record = store.get_job_sync(self.connection, job.id)  # type: ignore[attr-defined]
        token = logs.request_id.set(record.request_id if record else None)
        try:
            super().execute_job(job, queue)  # type: ignore[misc]
        finally:
            logs.request_id.reset(token)
