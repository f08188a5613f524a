"""The async worker's batched RQ bookkeeping (gql_service/worker/rq_batches.py) leaves Redis as
RQ's own one-job-at-a-time calls do: the same keys, registries, states, results and counts."""

from __future__ import annotations

import contextvars
import re
import uuid

from redis import Redis
from rq import Queue, SimpleWorker
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job, JobStatus

from gql_service import keys
from gql_service.worker import rq_batches


def _token() -> str:
    return uuid.uuid4().hex


def _worker(redis: Redis, *queues: Queue) -> SimpleWorker:
    worker = SimpleWorker(list(queues), connection=redis)
    worker.register_birth()
    return worker


def _shape(redis: Redis, ids: dict[str, str]) -> set[tuple[str, str]]:
    """Every key with its type, job and execution ids replaced by placeholders."""
    shape = set()
    for key in redis.scan_iter():
        name = key.decode()
        if name.startswith(keys.take("")):
            continue  # the async worker's own record of a take (a take that lands once)
        for real, placeholder in ids.items():
            name = name.replace(real, placeholder)
        shape.add((re.sub(r"[0-9a-f]{32}", "<execution>", name), redis.type(key).decode()))
    return shape


def _by_rq(worker: SimpleWorker, queue: Queue) -> Job:
    taken = Queue.dequeue_any([queue], None, connection=worker.connection)
    assert taken is not None
    job, _ = taken
    execution = worker.prepare_execution(job)
    worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
    job.started_at = job.started_at or job.enqueued_at
    worker._finalize_success(job, queue, execution, "answer")
    return job


def _batched(worker: SimpleWorker, queue: Queue, n: int) -> list[Job]:
    taken = rq_batches.take_many(worker, [[queue]] * (n + 2), _token())  # more takes than jobs: the rest find none
    assert [q.name for _, q in taken] == [queue.name] * n
    jobs = [job for job, _ in taken]
    executions = rq_batches.prepare_many(worker, jobs)
    assert {job.get_status() for job in jobs} == {JobStatus.STARTED}
    assert set(queue.started_job_registry.get_job_ids()) == {job.id for job in jobs}
    assert worker.get_state() == "busy" and len(worker.executions) == n
    ended = []
    for job, execution in zip(jobs, executions, strict=True):
        job.started_at = job.enqueued_at
        ended.append((job, queue, execution, "answer", contextvars.copy_context()))
    assert rq_batches.finish_many(worker, ended) == [None] * n
    return jobs


def test_a_batch_leaves_what_rqs_own_calls_leave_job_by_job(sync_redis: Redis) -> None:
    queue = Queue("batches-rq", connection=sync_redis)
    queue.enqueue("builtins.len", "x", result_ttl=600)
    worker = _worker(sync_redis, queue)
    job = _by_rq(worker, queue)
    by_rq = _shape(sync_redis, {job.id: "<job>", worker.name: "<worker>", queue.name: "<queue>"})
    sync_redis.flushdb()

    queue = Queue("batches-ours", connection=sync_redis)
    ids = [queue.enqueue("builtins.len", "x", result_ttl=600).id for _ in range(3)]
    worker = _worker(sync_redis, queue)
    jobs = _batched(worker, queue, 3)
    assert [job.id for job in jobs] == ids  # in the queue's order
    for job in jobs:
        assert job.get_status(refresh=True) == JobStatus.FINISHED
        result = job.latest_result()
        assert result is not None and result.return_value == "answer"
        shape = _shape(sync_redis, {job.id: "<job>", worker.name: "<worker>", queue.name: "<queue>"})
        others = {o for o in ids if o != job.id}
        assert {k for k in shape if not any(o in k[0] for o in others)} == by_rq
    assert set(queue.finished_job_registry.get_job_ids()) == set(ids)
    assert queue.started_job_registry.get_job_ids() == [] and worker.executions == {}
    assert Queue("x", connection=sync_redis).connection.llen(f"{queue.key}:intermediate") == 0
    worker.refresh()
    assert worker.successful_job_count == 3


def test_each_take_looks_at_the_queues_in_its_own_order(sync_redis: Redis) -> None:
    high, normal = Queue("batches-high", connection=sync_redis), Queue("batches-normal", connection=sync_redis)
    for queue in (high, normal):
        for _ in range(2):
            queue.enqueue("builtins.len", "x")
    worker = _worker(sync_redis, high, normal)
    taken = rq_batches.take_many(worker, [[high, normal], [normal, high], [high, normal], [high, normal]], _token())
    assert [q.name for _, q in taken] == ["batches-high", "batches-normal", "batches-high", "batches-normal"]


def test_each_set_of_queues_sharing_slots_bounds_its_own_queues_takes_only(sync_redis: Redis) -> None:
    """A worker's webhook queue has its own few slots: they bounded every take of LLM jobs too
    (with one webhook slot free, one LLM job a take)."""
    llm, hooks = Queue("batches-llm", connection=sync_redis), Queue("batches-hooks", connection=sync_redis)
    for queue in (llm, hooks):
        for _ in range(4):
            queue.enqueue("builtins.len", "x")
    worker = _worker(sync_redis, llm, hooks)
    shares = [(3, [llm.name]), (1, [hooks.name])]
    taken = rq_batches.take_many(worker, [[hooks, llm]] * 6, _token(), shares=shares)
    assert [q.name for _, q in taken] == [hooks.name, llm.name, llm.name, llm.name]
    assert len(llm.get_job_ids()) == 1 and len(hooks.get_job_ids()) == 3


def test_a_job_with_dependents_ends_through_rqs_own_path_which_releases_them(sync_redis: Redis) -> None:
    queue = Queue("batches-dependents", connection=sync_redis)
    parent = queue.enqueue("builtins.len", "x")
    child = queue.enqueue("builtins.len", "y", depends_on=parent)
    worker = _worker(sync_redis, queue)
    [(job, _)] = rq_batches.take_many(worker, [[queue]] * 2, _token())
    assert job.id == parent.id
    [execution] = rq_batches.prepare_many(worker, [job])
    job.started_at = job.enqueued_at
    assert rq_batches.finish_many(worker, [(job, queue, execution, None, contextvars.copy_context())]) == [None]
    assert job.get_status(refresh=True) == JobStatus.FINISHED
    assert child.get_status(refresh=True) == JobStatus.QUEUED and queue.get_job_ids() == [child.id]


def test_a_take_sent_again_after_its_reply_was_lost_answers_what_it_took_and_takes_no_more(
    sync_redis: Redis,
) -> None:
    """redis-py sends a script again when the connection drops before its reply: taken twice,
    the first take's jobs sat in the intermediate list, known to no worker, until RQ's cleanup
    failed them a minute later (tests/test_lossy_network.py timed out on it)."""
    queue = Queue("batches-once", connection=sync_redis)
    ids = [queue.enqueue("builtins.len", "x").id for _ in range(4)]
    worker = _worker(sync_redis, queue)
    first = _token()
    taken = rq_batches.take_many(worker, [[queue]] * 2, first)
    again = rq_batches.take_many(worker, [[queue]] * 2, first)  # the same take, its reply lost
    assert [job.id for job, _ in taken] == [job.id for job, _ in again] == ids[:2]
    assert queue.get_job_ids() == ids[2:]
    assert sync_redis.exists(keys.take(first))
    later = rq_batches.take_many(worker, [[queue]] * 2, _token(), first)  # the next take: the last one answered
    assert [job.id for job, _ in later] == ids[2:] and not sync_redis.exists(keys.take(first))


def test_a_take_clears_the_mark_rqs_cleanup_left_on_an_earlier_stay_in_the_intermediate_list(
    sync_redis: Redis,
) -> None:
    """RQ's cleanup marks a job it finds in an intermediate list and never removes the mark: a
    minute later it would fail the job at once, were it found there again between a later take
    and its start (a job retried, or revived by the reconciler), while a worker runs it."""
    queue = Queue("batches-seen", connection=sync_redis)
    job = queue.enqueue("builtins.len", "x")
    intermediate = IntermediateQueue(queue.key, connection=sync_redis)
    sync_redis.set(intermediate.get_first_seen_key(job.id), 0)  # seen there long ago
    assert intermediate.should_be_cleaned_up(job.id)
    [(taken, _)] = rq_batches.take_many(_worker(sync_redis, queue), [[queue]], _token())
    assert taken.id == job.id and intermediate.get_job_ids() == [job.id]  # between its take and its start
    assert not intermediate.should_be_cleaned_up(job.id)
    assert intermediate.set_first_seen(job.id)  # a cleanup now sees it for the first time


def test_a_job_whose_start_was_not_written_goes_back_to_the_head_of_its_queue(sync_redis: Redis) -> None:
    queue = Queue("batches-back", connection=sync_redis)
    first, second, third = (queue.enqueue("builtins.len", "x") for _ in range(3))
    worker = _worker(sync_redis, queue)
    [(job, _), (started, _)] = rq_batches.take_many(worker, [[queue]] * 2, _token())
    rq_batches.prepare_many(worker, [started])  # its start written: the other's was not
    assert rq_batches.give_back(worker, job, queue) and queue.get_job_ids() == [first.id, third.id]
    assert not rq_batches.give_back(worker, job, queue)  # given back once, whatever the network does
    assert not rq_batches.give_back(worker, started, queue)  # RQ's abandoned-job detection answers for it
    assert queue.get_job_ids() == [first.id, third.id] and started.id == second.id
    assert IntermediateQueue(queue.key, connection=sync_redis).get_job_ids() == []


def test_rqs_own_bookkeeping_is_still_made_of_the_calls_the_batches_make() -> None:
    """The batches compose RQ's own calls as RQ's one-job methods do: a new step in those
    methods must be added to gql_service/worker/rq_batches.py too (the tests above compare
    the state they leave, for what RQ does today)."""
    import inspect

    from rq import executions
    from rq.worker import BaseWorker

    steps = {
        executions.prepare_execution: ["Execution.create(", "set_state(WorkerStatus.BUSY"],
        BaseWorker.prepare_job_execution: ["self.heartbeat(", "job.heartbeat(", "job.prepare_for_execution(",
                                           "pipeline.persist(", "pipeline.lrem("],
        BaseWorker.handle_job_success: ["move_dependents_to_ready(", "increment_successful_job_count(",
                                        "increment_total_working_time(", "job._handle_success(", "Repeat.schedule(",
                                        "job.cleanup(", "self.cleanup_execution(", "release_slot(job)"],
        BaseWorker._finalize_success: ["handle_execution_ended(", "isinstance(return_value, Retry)",
                                       "execute_success_callback(", "job.send_webhooks(JobStatus.FINISHED)"],
    }  # fmt: skip
    for method, calls in steps.items():
        source = inspect.getsource(method)
        assert [call for call in calls if call not in source] == [], method.__qualname__
        assert source.count("pipeline.execute()") + source.count("pipe.execute()") <= 1, method.__qualname__


def test_a_second_copy_of_a_job_on_its_queue_is_dropped_not_run_twice(sync_redis: Redis) -> None:
    """RQ's cleanup retries an abandoned job in a MULTI that redis-py sends again when its reply
    is lost: the job is then on its queue twice (tests/test_lossy_network.py once took four
    jobs twice each in one take, and the LLM was asked twice for two of them)."""
    queue = Queue("batches-twice", connection=sync_redis)
    worker = _worker(sync_redis, queue)
    intermediate = IntermediateQueue(queue.key, connection=sync_redis)
    twice, other = queue.enqueue("builtins.len", "x"), queue.enqueue("builtins.len", "y")
    queue.push_job_id(twice.id)  # what the MULTI sent again queues
    taken = rq_batches.take_many(worker, [[queue]] * 4, _token())
    assert [job.id for job, _ in taken] == [twice.id, other.id]  # in one take: once
    assert queue.get_job_ids() == [] and intermediate.get_job_ids() == [twice.id, other.id]

    later = queue.enqueue("builtins.len", "z")
    queue.push_job_id(later.id)
    [(job, _)] = rq_batches.take_many(worker, [[queue]], _token())
    assert job.id == later.id
    assert rq_batches.take_many(worker, [[queue]], _token()) == []  # its copy, while it waits for its start
    rq_batches.prepare_many(worker, [job])
    queue.push_job_id(later.id)
    assert rq_batches.take_many(worker, [[queue]], _token()) == []  # and while it runs
    assert queue.get_job_ids() == [] and later.id not in intermediate.get_job_ids()


def test_a_job_rqs_cleanup_queues_again_before_removing_its_stuck_entry_is_taken(sync_redis: Redis) -> None:
    """RQ's cleanup of an intermediate list retries a stuck job (no wait: queued at once) and
    only then removes its entry there: a take in between sees the job in the list, but marked
    by that cleanup, and takes it; dropped, it would be on no list at all."""
    queue = Queue("batches-stuck", connection=sync_redis)
    worker = _worker(sync_redis, queue)
    intermediate = IntermediateQueue(queue.key, connection=sync_redis)
    job = queue.enqueue("builtins.len", "x")
    sync_redis.lmove(queue.key, intermediate.key, "LEFT", "RIGHT")  # taken by a worker that died
    intermediate.set_first_seen(job.id)
    queue.push_job_id(job.id)  # the cleanup's retry; its removal of the stuck entry comes next
    [(taken, _)] = rq_batches.take_many(worker, [[queue]], _token())
    assert taken.id == job.id
    intermediate.remove(job.id)  # the cleanup's next step
    assert intermediate.get_job_ids() == [job.id]  # the copy taken, waiting for its start
