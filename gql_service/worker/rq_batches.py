"""RQ's per-job bookkeeping for many jobs at once, for the async worker (issue 31, item 2).

RQ does a job's bookkeeping one job at a time: two to three round trips to take it (an LMOVE
per queue looked at, then its hash), two pipelines to start it, and four to end it (the
heartbeat, a WATCH, a read of its dependents, the MULTI). With hundreds of jobs in flight on
one process, those round trips on the bookkeeping thread cost about as much CPU as the LLM
calls themselves, and their socket waits hand the GIL back and forth with the event loop.
Here the same RQ calls (`Execution.create`, `Job.prepare_for_execution`, `Job._handle_success`,
`cleanup_execution`, ...) go onto one pipeline for every job that is ready at that moment:

* `take_many`: several takes in one script call, each looking at the queues in its own order
  (gql_service.worker.priorities) and moving the id to the queue's intermediate list as RQ's
  LMOVE does, once whatever the network does, then their hashes in one pipeline
  (`Job.fetch_many`); `give_back` returns a job whose start could not be written;
* `prepare_many`: what `prepare_execution` and `prepare_job_execution` write, in one pipeline;
* `finish_many`: what `_finalize_success` writes for jobs that ended well, in one MULTI, under
  one WATCH of their dependents' keys as RQ's own WATCH; a job whose end RQ handles with more
  than that (a success callback, a `Retry`, dependents to release) goes through RQ's own
  `_finalize_success`.

`Coalescer` gathers the jobs: each call waits for the batch it joins, and a batch is every
call made while the previous one ran on the bookkeeping thread.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, Generic, TypeVar

from redis import Redis
from redis.commands.core import Script
from redis.exceptions import WatchError
from rq import Queue
from rq.executions import Execution
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job as RQJob
from rq.job import JobStatus, Retry
from rq.logutils import blue, green
from rq.rate_limit import release_slot
from rq.utils import as_text, now
from rq.worker import BaseWorker, WorkerStatus

from gql_service import keys

I = TypeVar("I")  # noqa: E741 - an item of a batch
R = TypeVar("R")

# At most this many jobs in one take: the worker's free slots bound it too, so one worker
# process does not take a long queue's head from the others in one go. 16: what takes were
# when BENCHMARKS.md's section 6 was measured (the webhook queue's 16 slots bounded them
# all). A take's jobs move in lockstep on the loop; with RQ's bookkeeping on the loop, takes
# of 32 measured 0.84x the SDK alone and takes of 16 0.91x.
TAKE_AT_MOST = 16

# Take after take, each looking at the queues in its order (ARGV[6..], a string of queue
# numbers, 1-based), as RQ's LMOVE does for one queue: from the head of the queue (KEYS[i])
# to the tail of its intermediate list (KEYS[n + i]). Queue i draws on the slots of share
# ARGV[3][i] (a digit), whose free slots are ARGV[4]'s numbers: a queue whose share is full
# is passed over. An empty take ends it: so would the next ones, the script being atomic.
# ARGV[5]: RQ's prefix of job hashes, for a job's status (see DUPLICATES).
#
# Once, whatever the network does: what a take moved is kept under its token (KEYS[2n + 1],
# for ARGV[2] seconds), and the take sent again after a lost reply (redis-py's retry, or the
# worker's after an outage) answers with it. Taken twice, the first take's jobs would sit in
# the intermediate lists, known to no worker, until RQ's cleanup fails them a minute later.
# The worker's previous take (KEYS[2n + 2]) had its reply: its record goes.
#
# The job's "first seen" mark in the intermediate list goes too: RQ's cleanup sets it and
# never removes it, and on a later take of the same job (retried, or revived by the
# reconciler) would fail it at once, mid-start, a minute after the earlier stay there: the
# job would run twice. (Keys not named in KEYS: fine on one Redis and under Sentinel, which
# is what the service runs on; not on Redis Cluster, as RQ itself is not.)
_TAKE_LUA = """
local n, out, free = tonumber(ARGV[1]), {}, {}
for f in string.gmatch(ARGV[4], '%d+') do free[#free + 1] = tonumber(f) end
local record = KEYS[2 * n + 1]
if KEYS[2 * n + 2] ~= record then redis.call('DEL', KEYS[2 * n + 2]) end
if redis.call('EXISTS', record) == 1 then return redis.call('LRANGE', record, 0, -1) end
for t = 6, #ARGV do
  local found = false
  for c in string.gmatch(ARGV[t], '%d') do
    local i = tonumber(c)
    local share = tonumber(string.sub(ARGV[3], i, i))
    while not found and free[share] > 0 do
      local id = redis.call('LMOVE', KEYS[i], KEYS[n + i], 'LEFT', 'RIGHT')
      if not id then break end
      local seen = KEYS[n + i] .. ':first_seen:' .. id
      if (#redis.call('LPOS', KEYS[n + i], id, 'COUNT', 2) > 1 and redis.call('EXISTS', seen) == 0)
          or redis.call('HGET', ARGV[5] .. id, 'status') == 'started' then
        redis.call('RPOP', KEYS[n + i])  -- a second copy: dropped (see DUPLICATES)
      else
        free[share] = free[share] - 1
        redis.call('DEL', seen)
        out[#out + 1] = i
        out[#out + 1] = id
        found = true
      end
    end
    if found then break end
  end
  if not found then break end
end
if #out > 0 then
  redis.call('RPUSH', record, unpack(out))
  redis.call('EXPIRE', record, ARGV[2])
end
return out
"""
_TAKES: list[Script] = []  # registered once: redis-py hashes a script's text at each registration

# DUPLICATES: a job can be on its queue twice. RQ's cleanup of an abandoned job retries it in
# a MULTI that redis-py sends again when its reply is lost, and the second run queues it
# again (seen: four jobs in one take, each twice, each sent to the LLM twice). A take drops a
# copy whose job is already in the intermediate list (taken, not started) or running (RQ's
# status `started`): a job queued as it should be is `queued`, and RQ's retries and our
# reconciler take it out of the started registry, or make it anew, in the same step. One
# exception: RQ's cleanup of a job stuck in an intermediate list queues it again (a retry
# with no wait) and only then removes the stuck entry, which carries its "first seen" mark
# (a take removes the mark of what it takes): a copy beside a marked entry is taken.

# How long a take's record is kept: past redis-py's retries and a short outage's.
TAKE_RECORD_TTL_S = 600

# A job taken whose start could not be written goes back to the head of its queue, unless
# its start was written after all (the MULTI ran, its reply lost): then it has left the
# intermediate list, and RQ's abandoned-job detection answers for it.
_GIVE_BACK_LUA = """
if redis.call('LREM', KEYS[2], 1, ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


def take_many(
    worker: BaseWorker,
    orders: Sequence[Sequence[Queue]],
    token: str,
    previous: str | None = None,
    shares: Sequence[tuple[int, Collection[str]]] = (),
) -> list[tuple[RQJob, Queue]]:
    """One take per order of queues (each the order of that take), in one script call; then
    the jobs' hashes in one round trip. A job whose hash is gone is skipped, as RQ's dequeue
    skips it (its id stays in the intermediate list, which RQ's cleanup handles).

    `token`: this take's, the same when it is sent again (its reply lost): it then answers
    with what it took the first time. `previous`: the token of this worker's take before.
    `shares`: the free slots of each set of queues that share them (a worker's LLM queues,
    its webhook queues): no more jobs are taken from a set than it has free; a queue in none
    is bounded by the number of takes alone."""
    queues = list({q.name: q for order in orders for q in order}.values())
    share_of = {name: n for n, (_, names) in enumerate(shares, 1) for name in names}
    free = [free for free, _ in shares] + [len(orders)]  # the last: the queues in no share
    if len(queues) > 9 or len(free) > 9:
        raise ValueError("take_many numbers the queues and their shares with one digit")
    number = {q.name: str(n) for n, q in enumerate(queues, 1)}
    connection: Redis = worker.connection
    if not _TAKES:
        _TAKES.append(connection.register_script(_TAKE_LUA))
    keys_ = [q.key for q in queues] + [IntermediateQueue.get_intermediate_queue_key(q.key) for q in queues]
    keys_ += [keys.take(token), keys.take(previous or token)]
    orders_ = ("".join(number[q.name] for q in order) for order in orders)
    share_digits = "".join(str(share_of.get(q.name, len(free))) for q in queues)
    args: list[str | int] = [len(queues), TAKE_RECORD_TTL_S, share_digits, " ".join(map(str, free))]
    args += [worker.job_class.redis_job_namespace_prefix, *orders_]
    found = _TAKES[0](keys=keys_, args=args, client=connection)
    taken = [(queues[int(found[i]) - 1], as_text(found[i + 1])) for i in range(0, len(found), 2)]
    if not taken:
        return []
    jobs = worker.job_class.fetch_many(
        [job_id for _, job_id in taken], connection=connection, serializer=worker.serializer
    )
    return [(job, queue) for job, (queue, _) in zip(jobs, taken, strict=True) if job is not None]


def free_shares(queues: Sequence[Queue], slots: Mapping[str, asyncio.Semaphore]) -> list[tuple[int, list[str]]]:
    """`take_many`'s shares: the queues that draw on one semaphore of slots (a worker's LLM
    queues, its webhook queues), with how many of them are free. Each bounds its own queues'
    takes: the fewest free of any (the webhook queues' 16) must not bound the others'."""
    sharing: dict[asyncio.Semaphore, list[str]] = {}
    for q in queues:
        sharing.setdefault(slots[q.name], []).append(q.name)
    # Semaphore._value: asyncio's own count of the free slots; only the worker's loop takes them.
    return [(semaphore._value, names) for semaphore, names in sharing.items()]


def give_back(worker: BaseWorker, job: RQJob, queue: Queue) -> bool:
    """Put a job taken whose start could not be written back at the head of its queue (see
    _GIVE_BACK_LUA); whether it was."""
    intermediate = IntermediateQueue.get_intermediate_queue_key(queue.key)
    return bool(worker.connection.eval(_GIVE_BACK_LUA, 2, queue.key, intermediate, job.id))


def prepare_many(worker: BaseWorker, jobs: Sequence[RQJob]) -> list[Execution]:
    """What RQ's `prepare_execution` and `prepare_job_execution(remove_from_intermediate_queue=True)`
    write for each job, in one pipeline: the execution and its registry entries, the job's
    heartbeat and STARTED state, the worker BUSY and heartbeaten once."""
    with worker.connection.pipeline() as pipe:
        executions: list[Execution] = []
        ttls = []
        for job in jobs:
            ttl = worker.get_heartbeat_ttl(job)
            ttls.append(ttl)
            execution = Execution.create(job, ttl, pipeline=pipe, worker_name=worker.name)
            executions.append(execution)
            job.heartbeat(now(), ttl, pipeline=pipe)
            job.prepare_for_execution(worker.name, pipeline=pipe)
            pipe.persist(job.key)
            queue_key = Queue(job.origin, connection=worker.connection).key
            pipe.lrem(IntermediateQueue.get_intermediate_queue_key(queue_key), 1, job.id)
        worker.set_state(WorkerStatus.BUSY, pipeline=pipe)
        worker.heartbeat(max(ttls), pipeline=pipe)
        pipe.execute()
    for execution in executions:  # as prepare_execution does, once the execution is written
        worker.executions[execution.id] = execution
    return executions


Ended = tuple[RQJob, Queue, Execution, Any, contextvars.Context]


def finish_many(worker: BaseWorker, ended: Sequence[Ended]) -> list[BaseException | None]:
    """RQ's `_finalize_success` for each job (job, queue, execution, return value, the context
    of its task: RQ's log lines about it carry its request id), in one MULTI when RQ would do
    no more than write its end. Each job's outcome: None, or what its bookkeeping raised."""
    outcomes: dict[int, BaseException | None] = {}
    plain = [n for n, (job, _, _, value, _) in enumerate(ended) if _plainly_ended(job, value)]
    by_rq = [n for n in range(len(ended)) if n not in set(plain)]
    if plain:
        try:
            if not _write_successes(worker, [ended[n] for n in plain]):
                by_rq += plain  # a job has dependents to release: RQ's own path, which does it
            else:
                outcomes |= dict.fromkeys(plain)
        except Exception as exc:  # Redis gone mid-write, say: every job of the MULTI
            outcomes |= dict.fromkeys(plain, exc)
    for n in by_rq:
        job, queue, execution, value, context = ended[n]
        try:
            context.run(worker._finalize_success, job, queue, execution, value)
            outcomes[n] = None
        except Exception as exc:
            outcomes[n] = exc
    for n in plain:
        if n not in by_rq and outcomes[n] is None:
            job, _, _, value, context = ended[n]
            context.run(_after_success, worker, job, value)
    return [outcomes[n] for n in range(len(ended))]


def _write_successes(worker: BaseWorker, ended: Sequence[Ended]) -> bool:
    """The MULTI of every job's end; False (nothing written) if one of them has dependents."""
    dependents = [job.dependents_key for job, *_ in ended]
    with worker.connection.pipeline() as pipe:
        while True:
            try:
                pipe.watch(*dependents)  # as RQ's WATCH: a dependent added meanwhile, and it is read again
                if pipe.exists(*dependents):
                    pipe.reset()
                    return False
                pipe.multi()
                for job, queue, execution, value, _ in ended:
                    _write_success(worker, pipe, job, queue, execution, value)
                pipe.execute()
                return True
            except WatchError:
                continue


def _plainly_ended(job: RQJob, value: Any) -> bool:
    # What RQ's _finalize_success does beyond writing the end: a Retry, a success callback.
    return not isinstance(value, Retry) and job.success_callback is None


def _write_success(worker: BaseWorker, pipe: Any, job: RQJob, queue: Queue, execution: Execution, value: Any) -> None:
    """RQ's `handle_execution_ended` and `handle_job_success` for a job with no dependents,
    onto `pipe` (in MULTI)."""
    job.ended_at = now()
    job.heartbeat(now(), job.success_callback_timeout, pipeline=pipe)
    job._result = value
    job._status = JobStatus.FINISHED
    worker.increment_successful_job_count(pipeline=pipe)
    worker.increment_total_working_time(job.ended_at - job.started_at, pipe)  # type: ignore[operator]
    result_ttl = job.get_result_ttl(worker.default_result_ttl)
    if result_ttl != 0:
        job._handle_success(
            result_ttl, pipeline=pipe, worker_name=worker.name, execution_id=execution.id,
            execution_started_at=execution.created_at, execution_ended_at=job.ended_at,
        )  # fmt: skip
    if job.repeats_left is not None and job.repeats_left > 0:
        from rq.repeat import Repeat

        Repeat.schedule(job, queue, pipeline=pipe)
    else:
        job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
        job._status = JobStatus.FINISHED  # as RQ: an aborted immediate repeat may have left QUEUED
    worker.cleanup_execution(job, pipeline=pipe, execution=execution)


def _after_success(worker: BaseWorker, job: RQJob, value: Any) -> None:
    """What RQ's `_finalize_success` does once the end is written: the job's rate-limit slot,
    its log lines, its webhooks."""
    release_slot(job)
    assert job.started_at is not None and job.ended_at is not None
    taken = job.ended_at - job.started_at
    # RQ's lines at DEBUG: the job's own (gql_service.worker.pipeline) says how it ended.
    if worker.log_job_description:
        worker.log.debug("Successfully completed %s job in %ss on worker %s", job.description, taken, worker.name)
    else:
        worker.log.debug("Successfully completed job %s in %ss on worker %s", job.id, taken, worker.name)
    job.send_webhooks(JobStatus.FINISHED)
    worker.log.debug("Worker %s: %s: %s (%s)", worker.name, green(job.origin), blue("Job OK"), job.id)
    if value is not None:
        worker.log.debug("Worker %s: result: %r", worker.name, value)


class Count:
    """A count on the event loop, and a wait for it to be zero."""

    def __init__(self) -> None:
        self._n = 0
        self._zero = asyncio.Event()
        self._zero.set()

    def add(self) -> None:
        self._n += 1
        self._zero.clear()

    def remove(self) -> None:
        self._n -= 1
        if not self._n:
            self._zero.set()

    async def zero(self) -> None:
        await self._zero.wait()


class Coalescer(Generic[I, R]):
    """`run_many(items) -> results` on the bookkeeping thread, for every item that came while
    the previous call ran: each caller awaits its own item's result, or exception (a result
    that is one, or what the whole call raised)."""

    def __init__(self, run_many: Callable[[list[I]], list[R]], submit: Callable[..., Awaitable[Any]]) -> None:
        self._run_many = run_many
        self._submit = submit  # runs a function on the bookkeeping thread
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
                    results = await self._submit(self._run_many, [item for item, _ in batch])
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
