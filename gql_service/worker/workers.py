"""Running RQ workers: the task module and the provider are ready before any fork.

Three worker classes, all shaped like RQ's own (a subclass with hooks):

* `AsyncServiceWorker` (WORKER_CLASS=async, the default): up to WORKER_CONCURRENCY jobs at
  once on one asyncio event loop, one RQ execution per running job.
* `ServiceWorker` (fork): RQ's forking `Worker`, a work horse process per job.
* `InlineServiceWorker` (simple): RQ's `SimpleWorker`, one job at a time in the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import gc
import inspect
import logging
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeVar

import redis.exceptions
import uvloop
from redis import Redis
from rq import Queue, SimpleWorker, Worker
from rq.command import parse_payload
from rq.exceptions import DequeueTimeout
from rq.executions import Execution
from rq.job import Job as RQJob
from rq.job import _current_job  # private: see AsyncServiceWorker's docstring
from rq.registry import BaseRegistry
from rq.timeouts import JobTimeoutException, TimerDeathPenalty
from rq.utils import now
from rq.worker import BaseWorker, WorkerStatus
from rq.worker_pool import WorkerPool

from gql_service import keys, logs, store
from gql_service.partials import Demand
from gql_service.redis_conn import async_client, sync_client
from gql_service.settings import Settings
from gql_service.worker import deliveries, reconciler, tasks
from gql_service.worker.llm.factory import make_provider

log = logging.getLogger(__name__)

T = TypeVar("T")
WEBHOOK_QUEUE_SUFFIX = keys.webhook_queue("")
FULL_QUEUE_POLL_S = 0.05


@contextlib.contextmanager
def _background(name: str) -> Iterator[None]:
    """While the worker works: the reconciler (gql_service.worker.reconciler), and its drainers of
    the outboxes in use (gql_service.worker.outbox): the archive's when the history is on, the
    webhooks' when they are."""
    ctx = tasks.context()
    stops = [reconciler.start_in_thread(ctx.redis, ctx.settings, consumer=name)]
    if ctx.settings.database_url is not None:
        from gql_service.worker import archiver  # psycopg, only where the history is on

        stops.append(archiver.start_in_thread(ctx.redis, ctx.settings, consumer=name))
    if ctx.settings.webhook_secret is not None:
        stops.append(deliveries.start_relay(ctx.redis, ctx.settings, consumer=name))
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
    waiting, then a bounded wait on the first (the LLM queue: it is the one whose latency
    counts; a delivery waits at most DEQUEUE_WAIT_S more when the worker is idle).
    """

    def acquire_maintenance_lock(self) -> bool:
        # RQ holds the registries' cleanup lock for 899 s: a worker killed while it cleaned
        # (every few seconds here) kept every other worker from noticing lost jobs for 15
        # minutes. Held at most WORKER_LOST_AFTER_S here, the bound on noticing a lost job.
        return bool(self.connection.set(self.registry_cleaning_key, 1, nx=True, ex=_Tuning.lost_after_s))

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
        return super().dequeue_any(ordered[:1], min(timeout, DEQUEUE_WAIT_S), connection, **kwargs)


DEQUEUE_WAIT_S = 1


def _extraction(job: RQJob) -> bool:
    """An LLM job (the others are webhook deliveries, with settings of their own)."""
    return job.func_name == keys.TASK


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
    def tuned(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # RQ's worker pool gives its children a connection of its own making (a plain pool
        # with no retries, whatever the parent had): every worker connects as the service
        # does (gql_service.redis_conn: timeouts, retries, Sentinel), its queues through it.
        if args:
            queues = [args[0]] if isinstance(args[0], (str, Queue)) else list(args[0])
            args = ([q.name if isinstance(q, Queue) else q for q in queues], *args[1:])
        kwargs["connection"] = sync_client(tasks.context().redis)
        third = max(1, cls.lost_after_s // 3)
        kwargs.setdefault("job_monitoring_interval", third)
        kwargs.setdefault("maintenance_interval", third)
        kwargs.setdefault("worker_ttl", third + 15)  # RQ waits worker_ttl - 15 s for work when idle
        kwargs["queue_class"] = OneQueueAtATime  # RQ's pool passes its own Queue class
        return args, kwargs

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
        with _background(self.name):  # type: ignore[attr-defined]
            return super().work(*args, **kwargs)  # type: ignore[misc, no-any-return]

    def execute_job(self, job: RQJob, queue: Queue) -> None:
        # JOB_TIMEOUT_S is the worker's setting, not the one of the API that queued the job:
        # set before the fork, it bounds the work horse and its monitor alike.
        if _extraction(job):
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
    """RQ's forking worker: each job in its own work horse process, so a crash, a leak or a
    stop request ends that process and nothing else."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        args, kwargs = self.tuned(args, kwargs)
        super().__init__(*args, **kwargs)

    def handle_work_horse_killed(self, job: RQJob, retpid: int, ret_val: int, rusage: Any) -> None:
        # The horse died under a live worker (OOM killer, SIGKILL); RQ retries it next.
        # Its retry policy was set by the horse (tasks.adopt_retry_policy): read it back.
        job.refresh()
        if _extraction(job):
            tasks.worker_lost(job)
        else:  # a webhook delivery: RQ runs no failure callback for a dead horse, so count it here
            deliveries.on_failure(job, self.connection, None)
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)


class InlineServiceWorker(_Tuning, SimpleWorker):
    """WORKER_CLASS=simple: jobs run in the worker process itself, one at a time.

    The price: a running job can't be stopped by cancelJob (its record is CANCELED at once
    all the same, and nothing the attempt writes afterwards is kept), and a crash takes the
    worker process with it (the pool starts another; the job is retried as WORKER_LOST).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        args, kwargs = self.tuned(args, kwargs)
        super().__init__(*args, **kwargs)


class AsyncServiceWorker(_Tuning, BaseWorker):
    """WORKER_CLASS=async: up to `concurrency` jobs at once on one asyncio event loop.

    Built on RQ 3.0's executions: each running job has its own `Execution` (created by
    `prepare_execution`, heartbeaten by `maintain_heartbeats`, ended by RQ's
    `_finalize_success` / `_finalize_failure`), so the started-job registry, abandoned-job
    detection, `Retry`, failure callbacks and `rq info` hold for every job in flight. What
    RQ's synchronous API does (those calls, and the blocking dequeue) runs in two threads
    of its own, never on the event loop: one for bookkeeping, in order, and one that waits
    for work.

    Where RQ's public API could not serve:
    * `Job.perform()` runs a coroutine with `asyncio.run`, which cannot nest in a running
      loop: the worker awaits `job.func` itself and sets RQ's current-job context variable
      (`rq.job._current_job`, private) in each job's task, so `get_current_job()` works.
    * RQ's `stop-job` command looks only at one current job; `handle_payload` maps it to the
      job's execution, and `request_stop_execution` cancels that job's task alone.
    * RQ's work loop runs one job at a time and its signal handlers assume a work horse:
      `work()` is this class's own loop, around RQ's bootstrap, maintenance and teardown.
    * RQ bounds callbacks with SIGALRM, which works on the main thread only; its registries'
      cleanup builds registries with that default, so this process sets RQ's timer-based
      death penalty on `BaseRegistry` too.
    """

    concurrency: ClassVar[int] = 64
    webhook_concurrency: ClassVar[int] = 16
    log_result_lifespan = False  # one log line less per job; RQ_RESULT_TTL_S says it once
    # RQ bounds callbacks with a death penalty; its default (SIGALRM) only works on the main
    # thread, and RQ's bookkeeping here runs on a thread of its own: RQ's timer-based one.
    death_penalty_class = TimerDeathPenalty

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        args, kwargs = self.tuned(args, kwargs)
        super().__init__(*args, **kwargs)
        self._running: set[asyncio.Task[None]] = set()  # every job's task, from the moment it is taken
        self._tasks: dict[str, tuple[asyncio.Task[None], RQJob]] = {}  # by execution id, once it has one
        self._stopping: set[str] = set()  # job ids stopped on request
        self._cold = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._books = ThreadPoolExecutor(1, thread_name_prefix="rq-bookkeeping")
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix="rq-dequeue")

    # -- RQ's entry point ------------------------------------------------------------------
    def work(self, burst: bool = False, with_scheduler: bool = False, **kwargs: Any) -> bool:  # type: ignore[override]
        # The registries' cleanup (abandoned jobs and their failure callbacks) builds its own
        # registries with the SIGALRM default: in this process, RQ's timer-based one too.
        BaseRegistry.death_penalty_class = TimerDeathPenalty  # type: ignore[assignment]
        with _background(self.name):
            return self._work_in_loop(burst, with_scheduler, **kwargs)

    def _work_in_loop(self, burst: bool, with_scheduler: bool, **kwargs: Any) -> bool:
        self.bootstrap(kwargs.get("logging_level"))
        if with_scheduler:
            self._start_scheduler(burst, kwargs.get("logging_level"))
        try:
            # uvloop (uvicorn's loop, already installed): less CPU per socket operation.
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(self._work(burst))
        finally:
            self.teardown()
            self._books.shutdown(wait=False)
            self._waiter.shutdown(wait=False)

    async def _work(self, burst: bool) -> bool:
        loop = self._loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        redis = async_client(tasks.context().redis, name="gqls-worker", max_connections=self.concurrency + 8)
        tasks.shared_redis.set(redis)
        demand = Demand(redis)
        await demand.start()
        tasks.shared_demand.set(demand)
        # Slots per queue: deliveries (WEBHOOK_CONCURRENCY) never take an LLM job's place.
        slots = {q.name: asyncio.Semaphore(self.slots_for(q.name)) for q in self.queues}
        freed = asyncio.Event()
        heartbeats = asyncio.create_task(self._keep_heartbeats())
        started = 0
        try:
            while not self._stop_requested:
                open_queues = [q for q in self._ordered_queues if not slots[q.name].locked()]
                if not open_queues:
                    freed.clear()
                    await freed.wait()
                    continue
                # While a queue's slots are all taken, no blocking wait on the others: a
                # blocked dequeue would not see that queue's slot free up.
                every_queue = len(open_queues) == len(self.queues)
                taken = await self._take(burst or not every_queue, open_queues)
                if taken is None:
                    if every_queue and burst:
                        break
                    if not every_queue:  # poll again soon, or at once when a slot frees
                        freed.clear()
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(FULL_QUEUE_POLL_S):
                                await freed.wait()
                    continue
                job, queue = taken
                started += 1
                await slots[queue.name].acquire()  # free: checked above, and only this loop takes

                def release(semaphore: asyncio.Semaphore = slots[queue.name]) -> None:
                    semaphore.release()
                    freed.set()

                self._start(job, queue, release)
            if self._running:
                log.info("worker %s: finishing %d job(s) in flight", self.name, len(self._running))
            while self._running and not self._cold:
                await asyncio.wait(list(self._running))
        finally:
            heartbeats.cancel()
            await demand.stop()
            await redis.aclose()
            await tasks.context().provider.aclose()
        return started > 0

    def slots_for(self, queue_name: str) -> int:
        return self.webhook_concurrency if queue_name.endswith(WEBHOOK_QUEUE_SUFFIX) else self.concurrency

    async def _take(self, no_wait: bool, queues: list[Queue]) -> tuple[RQJob, Queue] | None:
        """The next job, waiting up to a second for one (so a stop request is seen soon),
        unless `no_wait`.
        Redis unreachable: try again later; the jobs in flight carry on meanwhile."""
        try:
            if self.should_run_maintenance_tasks:
                await self._bookkeeping(self.run_maintenance_tasks)
            taken = await self._dequeue(None, queues)
            if taken is None and not no_wait:
                if not self._running:
                    await self._bookkeeping(self.set_state, WorkerStatus.IDLE)
                taken = await self._dequeue(1, queues)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            log.error("worker %s: could not reach Redis (%s); trying again in 1 s", self.name, exc)
            await asyncio.sleep(1)
            return None
        return taken

    async def _dequeue(self, timeout: int | None, queues: list[Queue]) -> tuple[RQJob, Queue] | None:
        def dequeue() -> tuple[RQJob, Queue] | None:
            try:
                return self.queue_class.dequeue_any(
                    queues,
                    timeout,
                    connection=self.connection,
                    job_class=self.job_class,
                    serializer=self.serializer,
                    death_penalty_class=self.death_penalty_class,
                )
            except DequeueTimeout:
                return None

        assert self._loop is not None
        return await self._loop.run_in_executor(self._waiter, dequeue)

    def _start(self, job: RQJob, queue: Queue, release: Callable[[], None]) -> None:
        if _extraction(job):
            job.timeout = self.job_timeout_s  # the worker's setting, as in _Tuning.execute_job
        job.redis_server_version = self.get_redis_server_version()
        self.log.info("Worker %s: %s: %s", self.name, queue.name, job.description)

        async def run() -> None:
            execution: Execution | None = None
            try:
                try:
                    execution = await self._bookkeeping(self._prepare, job)
                except Exception:
                    log.exception("job %s: could not start; abandoned-job detection will retry it", job.id)
                    return
                self._tasks[execution.id] = (asyncio.current_task(), job)  # type: ignore[assignment]
                await self._perform(job, queue, execution)
            finally:
                if execution is not None:
                    self._tasks.pop(execution.id, None)
                release()

        task = asyncio.create_task(run(), name=f"job {job.id}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _prepare(self, job: RQJob) -> Execution:
        """What RQ does before a job runs, in one trip to the bookkeeping thread."""
        execution = self.prepare_execution(job)
        self.prepare_job_execution(job, remove_from_intermediate_queue=True)
        return execution

    async def _perform(self, job: RQJob, queue: Queue, execution: Execution) -> None:
        """RQ's `perform_job`, with the job awaited instead of called."""
        try:
            job.started_at = now()
            _current_job.set(job)  # this task's own context
            try:
                async with asyncio.timeout(job.timeout or self.queue_class.DEFAULT_TIMEOUT):
                    result = await self._call(job)
            except TimeoutError:
                raise JobTimeoutException(f"Task exceeded maximum timeout value ({job.timeout} seconds)") from None
        except asyncio.CancelledError:
            if self._cold:
                raise  # a cold stop: left to abandoned-job detection, which retries the job
            # Stopped on request (cancelJob): RQ marks it STOPPED and does not retry it.
            stopped = job.id in self._stopping
            self._stopping.discard(job.id)
            await self._finalize(self._finalize_failure, job, queue, execution, sys.exc_info(), stopped=stopped)
        except Exception:
            await self._finalize(self._finalize_failure, job, queue, execution, sys.exc_info())
        else:
            await self._finalize(self._finalize_success, job, queue, execution, result)

    async def _call(self, job: RQJob) -> Any:
        func = job.func
        if inspect.iscoroutinefunction(func):
            return await func(*job.args, **job.kwargs)
        return await asyncio.to_thread(job.perform)  # a plain function must not block the loop

    async def _finalize(self, finalize: Any, *args: Any, stopped: bool = False) -> None:
        def run() -> None:
            if stopped:
                self._stopped_job_id = args[0].id  # read by RQ's handle_job_failure
            finalize(*args)

        try:
            await asyncio.shield(self._bookkeeping(run))
        except Exception:
            # Redis gone mid-write, say: the execution's heartbeats stop with it, so
            # abandoned-job detection retries the job. One job never ends the worker.
            log.exception("job %s: could not record how it ended", args[0].id)

    async def _bookkeeping(self, fn: Any, *args: Any) -> Any:
        """Run RQ's synchronous API off the loop, in order, with the caller's context (the
        job's request id in RQ's log lines)."""
        assert self._loop is not None
        context = contextvars.copy_context()
        return await self._loop.run_in_executor(self._books, functools.partial(context.run, fn, *args))

    async def _keep_heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.job_monitoring_interval)
            running = [(job, self.executions.get(eid)) for eid, (_, job) in list(self._tasks.items())]
            try:
                if not running:
                    await self._bookkeeping(self.heartbeat)
                for job, execution in running:
                    if execution is not None:
                        await self._bookkeeping(self.maintain_heartbeats, job, execution)
            except Exception as exc:  # Redis away, say: the next beat tries again
                log.error("worker %s: heartbeat failed (%s)", self.name, exc)

    # -- stopping -------------------------------------------------------------------------
    def _on_signal(self, signum: int) -> None:
        if not self._stop_requested:
            self.log.info(
                "Worker %s: warm shut down requested (%s); finishing %d job(s) in flight. Signal again to stop now.",
                self.name,
                signal.Signals(signum).name,
                len(self._running),
            )
            self._stop_requested = True
            self._shutdown_requested_date = now()
            if self.scheduler:
                self.stop_scheduler()
            return
        self.log.warning("Worker %s: cold shut down; %d job(s) left to be retried", self.name, len(self._running))
        self._cold = True
        for task in self._running:
            task.cancel()

    def handle_payload(self, message: Any) -> None:
        payload = parse_payload(message)
        if payload.get("command") == "stop-job":
            # RQ's handler knows one current job; this worker has many.
            for execution_id, (_, job) in list(self._tasks.items()):
                if job.id == payload.get("job_id"):
                    self.request_stop_execution(execution_id)
                    return
            self.log.warning("Worker %s: not working on job %s, command ignored", self.name, payload.get("job_id"))
            return
        super().handle_payload(message)

    def request_stop_execution(self, execution_id: str) -> None:
        """Stop one running job (called from RQ's pub/sub thread)."""
        running = self._tasks.get(execution_id)
        if running is None or self._loop is None:
            self.log.warning("Worker %s: not running execution %s, command ignored", self.name, execution_id)
            return
        task, job = running
        self._stopping.add(job.id)
        self._loop.call_soon_threadsafe(task.cancel)


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
    provider = make_provider(settings)
    warm_up = getattr(provider, "warm_up", None)
    if warm_up is not None:
        warm_up()  # load models/lexicons once; every work horse inherits them by fork
    tasks.init(tasks.WorkerContext(settings=settings, provider=provider, redis=settings.redis_target))
    _Tuning.lost_after_s = settings.worker_lost_after_s
    _Tuning.job_timeout_s = settings.job_timeout_s
    AsyncServiceWorker.concurrency = concurrency or settings.worker_concurrency
    AsyncServiceWorker.webhook_concurrency = settings.webhook_concurrency
    worker_class = WORKER_CLASSES[settings.worker_class]
    # The LLM queue first: a worker of one job at a time (fork, simple) takes a delivery
    # only when no LLM job waits.
    queues = [settings.rq_queue, keys.webhook_queue(settings.rq_queue)]
    # Everything loaded so far lives as long as the process: keep the collector from
    # scanning it, so forked work horses don't copy the pages it would touch (measured:
    # about 3 ms less per job).
    gc.collect()
    gc.freeze()
    per_process = f" x {AsyncServiceWorker.concurrency} jobs" if settings.worker_class == "async" else ""
    log.info(
        "worker: queue %r, provider %s (%s), %d %s process(es)%s",
        settings.rq_queue,
        settings.provider,
        provider.model,
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
