"""What the async worker (gql_service/worker/async_worker.py, the one place that reaches into
RQ's internals) relies on in RQ, pinned: an RQ upgrade that changes it fails here, not in a
worker that silently stops recording its jobs. Also the job class the API queues with
(gql_service/queueing.py)."""

from __future__ import annotations

import asyncio
import inspect

import pytest
from redis import Redis
from rq.job import Job, _current_job, get_current_job
from rq.worker import BaseWorker


async def test_rqs_current_job_is_a_context_variable_each_task_sets_for_itself(sync_redis: Redis) -> None:
    """The worker sets `rq.job._current_job` in each job's task, so that RQ's public
    `get_current_job()` (the task and the webhook delivery call it) finds that task's job."""

    async def in_task(job: Job) -> Job | None:
        _current_job.set(job)
        await asyncio.sleep(0)  # another task runs meanwhile with its own job
        return get_current_job()

    jobs = [Job(id=f"pinned-{i}", connection=sync_redis) for i in range(2)]
    found = await asyncio.gather(*(asyncio.create_task(in_task(job)) for job in jobs))
    assert found == jobs
    assert get_current_job() is None  # the tasks' settings stayed theirs


@pytest.mark.parametrize(
    ("method", "parameters"),
    [
        ("_finalize_success", ["self", "job", "queue", "execution", "return_value"]),
        ("_finalize_failure", ["self", "job", "queue", "execution", "exc_info"]),
        ("_start_scheduler", ["self", "burst", "logging_level", "date_format", "log_format"]),
        ("prepare_execution", ["self", "job"]),
        ("prepare_job_execution", ["self", "job", "remove_from_intermediate_queue"]),
        ("maintain_heartbeats", ["self", "job", "execution"]),
        ("request_stop_execution", ["self", "execution_id"]),
        ("handle_payload", ["self", "message"]),
    ],
)
def test_the_worker_methods_the_async_worker_calls_keep_their_shape(method: str, parameters: list[str]) -> None:
    assert list(inspect.signature(getattr(BaseWorker, method)).parameters) == parameters


def test_a_stopped_job_is_told_to_rq_by_the_attribute_it_reads() -> None:
    """RQ's failure handling marks a job STOPPED (not retried) when `_stopped_job_id` names it."""
    source = inspect.getsource(BaseWorker.handle_job_failure)
    assert "_stopped_job_id" in source


def test_a_jobs_function_is_called_by_rqs_private_execute_as_context_job_copies_it() -> None:
    """gql_service.worker.context.ContextJob overrides `Job._execute` to put the worker's
    context first: RQ's own must still be the call it copies."""
    source = inspect.getsource(Job._execute)
    assert "self.func(*self.args, **self.kwargs)" in source and "asyncio.run(result)" in source


def test_a_dequeue_waits_a_fraction_of_a_second_as_asked(sync_redis: Redis) -> None:
    """Idle workers wait DEQUEUE_WAIT_S (0.25 s) on RQ_QUEUE between looks at the others:
    RQ's `timeout` is hinted `int`, and it must reach BLMOVE as the fraction it is (truncated
    to 0 it would be refused; rounded up it would be a second)."""
    from rq.exceptions import DequeueTimeout
    from rq.queue import Queue

    from gql_service.worker.tuning import DEQUEUE_WAIT_S

    assert DEQUEUE_WAIT_S < 1
    with pytest.raises(DequeueTimeout) as waited:
        Queue.lmove(sync_redis, "rq:queue:pinned-empty", DEQUEUE_WAIT_S)  # type: ignore[arg-type]
    assert waited.value.args[0] == DEQUEUE_WAIT_S


def test_the_api_makes_rqs_jobs_with_rqs_default_serializer(sync_redis: Redis) -> None:
    """gql_service/queueing.py hands RQ's Job.create no serializer for the default one (the
    check it skips is slow): the job must still be RQ's, with RQ's default, as workers read it."""
    from rq.serializers import DefaultSerializer

    from gql_service import keys, queueing
    from gql_service.models import JobPriority
    from gql_service.settings import Settings

    queue = queueing.llm_queues(Settings(), sync_redis)[JobPriority.NORMAL]
    made = queue.create_job(keys.TASK, args=("job-1",), job_id="job-1")
    assert isinstance(made, Job) and made.serializer is DefaultSerializer
    made.save()
    read = Job.fetch("job-1", connection=sync_redis)
    assert read.func_name == keys.TASK and read.args == ("job-1",)
    assert "serializer" in inspect.signature(Job.create).parameters
