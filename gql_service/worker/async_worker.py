"""The async worker class: many jobs at once on one asyncio event loop."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import logging
import signal
import sys
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeVar

import uvloop
from rq import Queue
from rq.command import parse_payload
from rq.exceptions import DequeueTimeout
from rq.executions import Execution
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job as RQJob
from rq.job import _current_job  # private: see AsyncServiceWorker's docstring
from rq.registry import BaseRegistry
from rq.timeouts import JobTimeoutException, TimerDeathPenalty
from rq.utils import now
from rq.worker import BaseWorker, WorkerStatus

from gql_service import keys
from gql_service.partials import Demand
from gql_service.redis_conn import ASYNC_OUTAGE_ERRORS, OUTAGE_ERRORS, Outage, async_client
from gql_service.worker import context, rq_batches
from gql_service.worker.tuning import Tuning, background, is_extraction

log = logging.getLogger(__name__)

T = TypeVar("T")
WEBHOOK_QUEUE_SUFFIX = keys.webhook_queue("")
FULL_QUEUE_POLL_S = 0.05


class AsyncServiceWorker(Tuning, BaseWorker):
    """WORKER_CLASS=async: up to `concurrency` jobs at once on one asyncio event loop.

    Built on RQ 3.0's executions: each running job has its own `Execution` (created as RQ's
    `prepare_execution` does, heartbeaten by `maintain_heartbeats`, ended as RQ's
    `_finalize_success` / `_finalize_failure` do), so the started-job registry, abandoned-job
    detection, `Retry`, failure callbacks and `rq info` hold for every job in flight. What
    RQ's synchronous API does (those calls, and the blocking dequeue) runs in two threads
    of its own, never on the event loop: one for bookkeeping, in order, and one that waits
    for work. The takes, the starts and the good ends go a batch at a time, with RQ's own
    calls on one pipeline (worker/rq_batches.py): RQ's round trips per job cost about as
    much CPU as the LLM call.

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
        self.context = context.of_process()  # with this loop's shared Redis client once it runs
        self._cold = False
        self._unstarted = rq_batches.Count()  # jobs taken whose start is not written yet
        self._last_take: str | None = None  # the token of the last take that answered
        # Made once, not per dequeue: Redis unreachable, the next job waits by this policy.
        self._outage = Outage(f"worker {self.name}", log, give_up_when=lambda: self._stop_requested, cap_s=5.0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._books = ThreadPoolExecutor(1, thread_name_prefix="rq-bookkeeping")
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix="rq-dequeue")
        # RQ's bookkeeping of the jobs starting, and of those that ended well, a batch at a
        # time (worker/rq_batches.py): one pipeline or MULTI for every job ready meanwhile.
        self._prepares = rq_batches.Coalescer(functools.partial(rq_batches.prepare_many, self), self._bookkeeping)
        self._finishes = rq_batches.Coalescer(functools.partial(rq_batches.finish_many, self), self._bookkeeping)

    # -- RQ's entry point ------------------------------------------------------------------
    def work(self, burst: bool = False, with_scheduler: bool = False, **kwargs: Any) -> bool:  # type: ignore[override]
        # The registries' cleanup (abandoned jobs and their failure callbacks) builds its own
        # registries with the SIGALRM default: in this process, RQ's timer-based one too.
        BaseRegistry.death_penalty_class = TimerDeathPenalty  # type: ignore[assignment]
        with background(self.name):
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
        shared = context.of_process()
        redis = async_client(shared.redis_target, name="gqls-worker", max_connections=self.concurrency + 8)
        demand = Demand(redis)
        await demand.start()
        # Every job on this loop gets the one Redis client and ear for interim frames.
        self.context = dataclasses.replace(shared, redis=redis, demand=demand)
        # Slots per kind of queue: deliveries (WEBHOOK_CONCURRENCY) never take an LLM job's
        # place; the LLM queues of every priority share the worker's `concurrency`.
        llm, hooks = asyncio.Semaphore(self.concurrency), asyncio.Semaphore(self.webhook_concurrency)
        slots = {q.name: hooks if self.is_webhook_queue(q.name) else llm for q in self.queues}
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
                taken = await self._take(burst or not every_queue, open_queues, slots)
                if not taken:
                    if every_queue and burst:
                        break
                    if not every_queue:  # poll again soon, or at once when a slot frees
                        freed.clear()
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(FULL_QUEUE_POLL_S):
                                await freed.wait()
                    continue
                for job, queue in taken:  # every one: they left their queue, a stop request or not
                    started += 1
                    self.reorder_queues(queue)  # the order of the next take (worker/priorities.py)
                    await slots[queue.name].acquire()  # free: no more were taken than were free

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
            await shared.provider.aclose()
        return started > 0

    @staticmethod
    def is_webhook_queue(queue_name: str) -> bool:
        return queue_name.endswith(WEBHOOK_QUEUE_SUFFIX)

    async def _take(
        self, no_wait: bool, queues: list[Queue], slots: dict[str, asyncio.Semaphore]
    ) -> list[tuple[RQJob, Queue]]:
        """The next jobs, as many as the free slots of `queues` allow (up to TAKE_AT_MOST), in
        one round trip; if there are none, waiting up to a second for one (so a stop request
        is seen soon), unless `no_wait`.
        Redis unreachable: the one outage policy waits for it, until a stop request; the
        jobs in flight carry on meanwhile."""
        shares = rq_batches.free_shares(queues, slots)  # each set of queues sharing slots bounds its own
        room = min(rq_batches.TAKE_AT_MOST, sum(free for free, _ in shares))
        names = {q.name for q in queues}
        # Take n looks at the queues in the order the worker would give take n one by one.
        orders = [queues] + [
            [q for q in self.order_of_take(self._takes + 1 + n) if q.name in names] for n in range(1, room)
        ]

        token = uuid.uuid4().hex  # this take's, on every try of it: it takes once (rq_batches)

        async def take() -> list[tuple[RQJob, Queue]]:
            if self.should_run_maintenance_tasks:
                # RQ's cleanup fails a job it finds in a queue's intermediate list and not
                # started: none this worker took may be between its take and its start.
                await self._unstarted.zero()
                await self._bookkeeping(self.run_maintenance_tasks)
            taken = await self._take_many(orders, token, shares)
            self._last_take = token
            if not taken and not no_wait:
                if not self._running:
                    await self._bookkeeping(self.set_state, WorkerStatus.IDLE)
                one = await self._dequeue(1, queues)
                taken = [one] if one is not None else []
            return taken

        try:
            return await self._outage.call(take)
        except ASYNC_OUTAGE_ERRORS:
            return []  # stopping

    async def _take_many(
        self, orders: list[list[Queue]], token: str, shares: list[tuple[int, list[str]]]
    ) -> list[tuple[RQJob, Queue]]:
        if self.get_redis_server_version() < (6, 2, 0) or len(self.queues) > 9:  # no LMOVE: RQ's own, one job
            one = await self._dequeue(None, orders[0])
            return [one] if one is not None else []
        assert self._loop is not None
        take_many = functools.partial(rq_batches.take_many, self, orders, token, self._last_take, shares)
        return await self._loop.run_in_executor(self._waiter, take_many)

    async def _dequeue(self, timeout: int | None, queues: list[Queue]) -> tuple[RQJob, Queue] | None:
        def dequeue() -> tuple[RQJob, Queue] | None:
            try:
                taken = self.queue_class.dequeue_any(
                    queues,
                    timeout,
                    connection=self.connection,
                    job_class=self.job_class,
                    serializer=self.serializer,
                    death_penalty_class=self.death_penalty_class,
                )
            except DequeueTimeout:
                return None
            if taken is not None:  # as the take script does (rq_batches._TAKE_LUA)
                self.connection.delete(IntermediateQueue(taken[1].key, self.connection).get_first_seen_key(taken[0].id))
            return taken

        assert self._loop is not None
        return await self._loop.run_in_executor(self._waiter, dequeue)

    def _start(self, job: RQJob, queue: Queue, release: Callable[[], None]) -> None:
        if is_extraction(job):
            job.timeout = self.job_timeout_s  # the worker's setting, as in Tuning.execute_job
        job.redis_server_version = self.get_redis_server_version()
        # RQ's line at DEBUG: the job's own lines say when it starts and how it ended.
        self.log.debug("Worker %s: %s: %s", self.name, queue.name, job.description)
        self._unstarted.add()
        free = functools.cache(release)  # frees the slot once, whichever way comes first

        async def run() -> None:
            execution: Execution | None = None
            try:
                try:
                    execution = await self._prepares(job)
                except Exception as exc:
                    await self._not_started(job, queue, exc)
                    return
                finally:
                    self._unstarted.remove()
                self._tasks[execution.id] = (asyncio.current_task(), job)  # type: ignore[assignment]
                await self._perform(job, queue, execution, free)
            finally:
                if execution is not None:
                    self._tasks.pop(execution.id, None)
                free()

        task = asyncio.create_task(run(), name=f"job {job.id}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _not_started(self, job: RQJob, queue: Queue, exc: Exception) -> None:
        """A job whose start was not written goes back to its queue, not left to RQ's cleanup."""
        if not isinstance(exc, OUTAGE_ERRORS):
            log.error("job %s: could not start; RQ's cleanup will fail it or retry it", job.id, exc_info=exc)
            return

        try:
            back = await self._outage.call(lambda: self._bookkeeping(rq_batches.give_back, self, job, queue))
        except ASYNC_OUTAGE_ERRORS:
            return  # stopping: RQ's cleanup fails it or retries it
        where = "back at the head of its queue" if back else "its start was written after all"
        log.warning("job %s: could not start (%s); %s", job.id, exc, where)

    async def _perform(self, job: RQJob, queue: Queue, execution: Execution, free: Callable[[], None]) -> None:
        """RQ's `perform_job`, with the job awaited instead of called; `free` hands its slot on
        once its work is over, not after RQ's record of its end (batched with others) too."""
        try:
            job.started_at = now()
            _current_job.set(job)  # this task's own context
            try:
                async with asyncio.timeout(job.timeout or self.queue_class.DEFAULT_TIMEOUT):
                    result = await self._call(job)
            except TimeoutError:
                raise JobTimeoutException(f"Task exceeded maximum timeout value ({job.timeout} seconds)") from None
            finally:
                free()
        except asyncio.CancelledError:
            if self._cold:
                raise  # a cold stop: left to abandoned-job detection, which retries the job
            # Stopped on request (cancelJob): RQ marks it STOPPED and does not retry it.
            stopped = job.id in self._stopping
            await self._finalize(self._finalize_failure, job, queue, execution, sys.exc_info(), stopped=stopped)
        except Exception:
            await self._finalize(self._finalize_failure, job, queue, execution, sys.exc_info())
        else:
            try:
                await self._finishes((job, queue, execution, result, contextvars.copy_context()))
            except Exception:  # as in _finalize
                log.exception("job %s: could not record how it ended", job.id)
        finally:
            # A stop request that raced the job's end (it finished first) is forgotten too.
            self._stopping.discard(job.id)

    async def _call(self, job: RQJob) -> Any:
        func = job.func
        if inspect.iscoroutinefunction(func):
            return await func(*context.arguments(func, job.args, self.context), **job.kwargs)
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
