"""RQ's per-job bookkeeping for many jobs at once, for the async worker (issue 31, item 2).

RQ does a job's bookkeeping one job at a time: two to three round trips to take it (an LMOVE
per queue looked at, then its hash), two pipelines to start it, and four to end it (the
heartbeat, a WATCH, a read of its dependents, the MULTI). With hundreds of jobs in flight on
one process, those round trips cost about as much CPU as the LLM calls themselves. Here the
same RQ calls (`Execution.create`, `Job.prepare_for_execution`, `Job._handle_success`,
`cleanup_execution`, ...) go onto one pipeline for every job that is ready at that moment:

* `take_many`: several takes in one script call, each looking at the queues in its own order
  (gql_service.worker.priorities) and moving the id to the queue's intermediate list as RQ's
  LMOVE does, and the hashes of the jobs taken (as `Job.fetch_many` reads them);
* `prepare_many`: what `prepare_execution` and `prepare_job_execution` write, in one MULTI,
  with each job's own first reads if the caller asks (an LLM job's record and text);
* `finish_many`: what `_finalize_success` writes for jobs that ended well, in one MULTI, under
  one WATCH of their dependents' keys as RQ's own WATCH; a job whose end RQ handles with more
  than that (a success callback, a `Retry`, dependents to release, RQ's webhooks or rate
  limits) goes through RQ's own `_finalize_success`, on the worker's bookkeeping thread.

These run on the event loop, on its own Redis client: RQ's calls only add commands to the
pipeline they are given, and a thread hop per batch made each job wait for the GIL and the
bookkeeping thread's queue as well as for Redis. `Coalescer` gathers the jobs: each call
waits for the batch it joins, and a batch is every call made while the previous one was
under way.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, Generic, TypeVar

from redis.asyncio import Redis as AsyncRedis
from redis.commands.core import AsyncScript
from redis.exceptions import WatchError
from rq import Queue
from rq.executions import Execution
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job as RQJob
from rq.job import JobStatus, Retry
from rq.logutils import blue, green
from rq.utils import as_text, now
from rq.worker import BaseWorker, WorkerStatus

I = TypeVar("I")  # noqa: E741 - an item of a batch
R = TypeVar("R")

# At most this many jobs in one take (the worker's free slots bound it too). Small takes keep
# the jobs' steps from moving in lockstep: the jobs of one take start, call and end together,
# and each of their steps waits for the others' on the one event loop. Measured with 256
# slots and a 1 s LLM (bench section 6's ceiling rows): 32 at a time 0.84x the SDK alone,
# 16 0.91x, 8 0.93x, 4 0.93x.
TAKE_AT_MOST = 8

# Take after take, each looking at the queues in its order (ARGV[5..], a string of queue
# numbers, 1-based), as RQ's LMOVE does for one queue: from the head of the queue (KEYS[i])
# to the tail of its intermediate list (KEYS[n + i]). Queue i draws on the slots of share
# ARGV[2][i] (a digit), whose free slots are ARGV[3]'s numbers: a queue whose share is full
# is passed over. An empty take ends it: so would the next ones, the script being atomic.
# Each job taken comes back with its hash (ARGV[4]: the job keys' prefix), as RQ reads it
# next: one round trip, not two. (A key not named in KEYS: fine on one Redis and under
# Sentinel, which is what the service runs on; not on Redis Cluster, as RQ itself is not.)
_TAKE_LUA = """
local n, out, free = tonumber(ARGV[1]), {}, {}
for f in string.gmatch(ARGV[3], '%d+') do free[#free + 1] = tonumber(f) end
for t = 5, #ARGV do
  local found = false
  for c in string.gmatch(ARGV[t], '%d') do
    local i = tonumber(c)
    local share = tonumber(string.sub(ARGV[2], i, i))
    if free[share] > 0 then
      local id = redis.call('LMOVE', KEYS[i], KEYS[n + i], 'LEFT', 'RIGHT')
      if id then
        free[share] = free[share] - 1
        out[#out + 1] = {i, id, redis.call('HGETALL', ARGV[4] .. id)}
        found = true
        break
      end
    end
  end
  if not found then return out end
end
return out
"""
_TAKE: list[AsyncScript] = []  # made once: redis-py hashes a script's text at each registration


async def take_many(
    worker: BaseWorker,
    redis: AsyncRedis,
    orders: Sequence[Sequence[Queue]],
    shares: Sequence[tuple[int, Collection[str]]] = (),
) -> list[tuple[RQJob, Queue]]:
    """One take per order of queues (each the order of that take), and the hashes of the jobs
    taken, in one script call. `shares`: the free slots of each set of queues that
    share them (a worker's LLM queues, its webhook queues): no more jobs are taken from a set
    than it has free; a queue in none is bounded by the number of takes alone. A job whose
    hash is gone is skipped, as RQ's dequeue skips it (its id stays in the intermediate
    list, which RQ's cleanup handles)."""
    queues = list({q.name: q for order in orders for q in order}.values())
    share_of = {name: n for n, (_, names) in enumerate(shares, 1) for name in names}
    free = [free for free, _ in shares] + [len(orders)]  # the last: the queues in no share
    if len(queues) > 9 or len(free) > 9:
        raise ValueError("take_many numbers the queues and their shares with one digit")
    number = {q.name: str(n) for n, q in enumerate(queues, 1)}
    if not _TAKE:
        _TAKE.append(redis.register_script(_TAKE_LUA))
    keys_ = [q.key for q in queues] + [IntermediateQueue.get_intermediate_queue_key(q.key) for q in queues]
    args: list[str | int] = [
        len(queues), "".join(str(share_of.get(q.name, len(free))) for q in queues), " ".join(map(str, free)),
        worker.job_class.redis_job_namespace_prefix, *("".join(number[q.name] for q in order) for order in orders),
    ]  # fmt: skip
    jobs = []
    for number_, job_id, flat in await _TAKE[0](keys=keys_, args=args, client=redis):
        if flat:  # restored as RQ's `Job.fetch_many` does; the job keeps the worker's own
            # connection, for RQ's calls about it on the bookkeeping thread
            job = worker.job_class(as_text(job_id), connection=worker.connection, serializer=worker.serializer)
            job.restore(dict(zip(flat[::2], flat[1::2], strict=True)))
            jobs.append((job, queues[int(number_) - 1]))
    return jobs


def free_shares(queues: Sequence[Queue], slots: Mapping[str, asyncio.Semaphore]) -> list[tuple[int, list[str]]]:
    """`take_many`'s shares: the queues that draw on one semaphore of slots (a worker's LLM
    queues, its webhook queues), with how many of them are free. Each bounds its own queues'
    takes: the fewest free of any (the webhook queues' 16) must not bound the others'."""
    sharing: dict[asyncio.Semaphore, list[str]] = {}
    for q in queues:
        sharing.setdefault(slots[q.name], []).append(q.name)
    # Semaphore._value: asyncio's own count of the free slots; only the worker's loop takes them.
    return [(semaphore._value, names) for semaphore, names in sharing.items()]


# What else a job's start queues on the MULTI of `prepare_many` (the job's own first reads):
# given the pipeline and the job, how to read its replies from the MULTI's (or None).
Also = Callable[[Any, RQJob], Callable[[list[Any]], Any] | None]


async def prepare_many(
    worker: BaseWorker, redis: AsyncRedis, jobs: Sequence[RQJob], also: Also | None = None
) -> list[tuple[Execution, Any]]:
    """What RQ's `prepare_execution` and `prepare_job_execution(remove_from_intermediate_queue=True)`
    write for each job, in one MULTI on the event loop's client (RQ's calls only add commands
    to the pipeline they are given): the execution and its registry entries, the job's
    heartbeat and STARTED state, the worker BUSY and heartbeaten once. With `also`, each
    job's own commands go in the same MULTI: each job's execution comes with what `also`
    read for it (None without)."""
    async with redis.pipeline(transaction=True) as pipe:
        executions: list[Execution] = []
        readers: list[Callable[[list[Any]], Any] | None] = []
        ttls = []
        for job in jobs:
            readers.append(also(pipe, job) if also is not None else None)
            ttl = worker.get_heartbeat_ttl(job)
            ttls.append(ttl)
            execution = Execution.create(job, ttl, pipeline=pipe, worker_name=worker.name)  # type: ignore[arg-type]
            executions.append(execution)
            job.heartbeat(now(), ttl, pipeline=pipe)  # type: ignore[arg-type]
            job.prepare_for_execution(worker.name, pipeline=pipe)  # type: ignore[arg-type]
            pipe.persist(job.key)
            queue_key = worker.queue_class.redis_queue_namespace_prefix + job.origin
            pipe.lrem(IntermediateQueue.get_intermediate_queue_key(queue_key), 1, job.id)
        worker.set_state(WorkerStatus.BUSY, pipeline=pipe)  # type: ignore[arg-type]
        worker.heartbeat(max(ttls), pipeline=pipe)  # type: ignore[arg-type]
        replies = await pipe.execute()
    for execution in executions:  # as prepare_execution does, once the execution is written
        worker.executions[execution.id] = execution
    return [(execution, read and read(replies)) for execution, read in zip(executions, readers, strict=True)]


Ended = tuple[RQJob, Queue, Execution, Any, contextvars.Context]


async def finish_many(
    worker: BaseWorker, redis: AsyncRedis, ended: Sequence[Ended], on_thread: Callable[..., Awaitable[Any]]
) -> list[BaseException | None]:
    """RQ's `_finalize_success` for each job (job, queue, execution, return value, the context
    of its task: RQ's log lines about it carry its request id), in one MULTI on the event
    loop's client when RQ would do no more than write its end; otherwise RQ's own, run by
    `on_thread` (its calls block). Each job's outcome: None, or what its bookkeeping raised."""
    outcomes: dict[int, BaseException | None] = {}
    plain = [n for n, (job, _, _, value, _) in enumerate(ended) if _plainly_ended(worker, job, value)]
    by_rq = [n for n in range(len(ended)) if n not in set(plain)]
    if plain:
        try:
            if not await _write_successes(worker, redis, [ended[n] for n in plain]):
                by_rq += plain  # a job has dependents to release: RQ's own path, which does it
            else:
                outcomes |= dict.fromkeys(plain)
        except Exception as exc:  # Redis gone mid-write, say: every job of the MULTI
            outcomes |= dict.fromkeys(plain, exc)
    for n in by_rq:
        job, queue, execution, value, context = ended[n]
        try:
            await on_thread(context.run, worker._finalize_success, job, queue, execution, value)
            outcomes[n] = None
        except Exception as exc:
            outcomes[n] = exc
    for n in plain:
        if n not in by_rq and outcomes[n] is None:
            job, _, _, value, context = ended[n]
            context.run(_after_success, worker, job, value)
    return [outcomes[n] for n in range(len(ended))]


async def _write_successes(worker: BaseWorker, redis: AsyncRedis, ended: Sequence[Ended]) -> bool:
    """The MULTI of every job's end; False (nothing written) if one of them has dependents."""
    dependents = [job.dependents_key for job, *_ in ended]
    async with redis.pipeline() as pipe:
        while True:
            try:
                await pipe.watch(*dependents)  # as RQ's WATCH: a dependent added meanwhile, and it is read again
                if await pipe.exists(*dependents):
                    await pipe.reset()
                    return False
                pipe.multi()
                for job, queue, execution, value, _ in ended:
                    _write_success(worker, pipe, job, queue, execution, value)
                await pipe.execute()
                return True
            except WatchError:
                continue


def _plainly_ended(worker: BaseWorker, job: RQJob, value: Any) -> bool:
    """RQ's `_finalize_success` does no more than write the job's end: no `Retry`, success
    callback, rate-limit slot, RQ webhook or repeat, and a result that is kept (a result TTL
    of 0 deletes the job, which reads its group)."""
    return (
        not isinstance(value, Retry)
        and job.success_callback is None
        and not job.has_rate_limit
        and not job.webhooks
        and job.repeats_left is None
        and job.get_result_ttl(worker.default_result_ttl) != 0
    )


def _write_success(worker: BaseWorker, pipe: Any, job: RQJob, queue: Queue, execution: Execution, value: Any) -> None:
    """RQ's `handle_execution_ended` and `handle_job_success` for a job with no dependents,
    onto `pipe` (in MULTI)."""
    job.ended_at = now()
    job.heartbeat(now(), job.success_callback_timeout, pipeline=pipe)
    job._result = value
    job._status = JobStatus.FINISHED
    worker.increment_successful_job_count(pipeline=pipe)
    worker.increment_total_working_time(job.ended_at - job.started_at, pipe)  # type: ignore[operator]
    job._handle_success(
        job.get_result_ttl(worker.default_result_ttl), pipeline=pipe, worker_name=worker.name,
        execution_id=execution.id, execution_started_at=execution.created_at, execution_ended_at=job.ended_at,
    )  # fmt: skip
    job.cleanup(job.get_result_ttl(worker.default_result_ttl), pipeline=pipe, remove_from_queue=False)
    job._status = JobStatus.FINISHED  # as RQ: an aborted immediate repeat may have left QUEUED
    worker.cleanup_execution(job, pipeline=pipe, execution=execution)


def _after_success(worker: BaseWorker, job: RQJob, value: Any) -> None:
    """What RQ's `_finalize_success` does once the end is written, for a plainly ended job:
    its log lines (no rate-limit slot to release, no webhooks to send)."""
    assert job.started_at is not None and job.ended_at is not None
    taken = job.ended_at - job.started_at
    if worker.log_job_description:
        worker.log.info("Successfully completed %s job in %ss on worker %s", job.description, taken, worker.name)
    else:
        worker.log.info("Successfully completed job %s in %ss on worker %s", job.id, taken, worker.name)
    worker.log.info("Worker %s: %s: %s (%s)", worker.name, green(job.origin), blue("Job OK"), job.id)
    if value is not None:
        worker.log.debug("Worker %s: result: %r", worker.name, value)


class Coalescer(Generic[I, R]):
    """`await run_many(items) -> results` for every item that came while the previous call
    ran: each caller awaits its own item's result, or exception (a result that is one, or
    what the whole call raised)."""

    def __init__(self, run_many: Callable[[list[I]], Awaitable[list[R]]]) -> None:
        self._run_many = run_many
        self._waiting: list[tuple[I, asyncio.Future[R]]] = []
        self._draining: asyncio.Task[None] | None = None

    async def __call__(self, item: I) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain())
        # Shielded: a job cancelled meanwhile does not take its item out of a batch under way.
        return await asyncio.shield(future)

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    results = await self._run_many([item for item, _ in batch])
                except Exception as exc:  # the whole batch's round trip failed: each caller hears it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):  # this item's own failure
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._draining = None
