"""The worker's resources: built once when a worker process starts, handed to every job as its
first argument (arq's `ctx`), never connected on import.

RQ calls a job's function with the job's own arguments: for a function marked with
`takes_context` (the service's own), the worker classes here put the context first, the
async worker in its own call and RQ's fork and simple workers through `ContextJob`; any
other RQ job runs as RQ would run it. RQ calls its failure callbacks with the job alone: they, and RQ's fork and
simple workers, read the context of the process (`of_process`), set by `run_workers` before
any fork.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio import Redis as AsyncRedis
from rq.job import Job as RQJob

from gql_service.partials import Demand
from gql_service.redis_conn import async_client
from gql_service.settings import RedisTarget, Settings, load_settings
from gql_service.worker.llm import Provider


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    provider: Provider
    redis_target: RedisTarget
    # LLM_FALLBACKS, in order: asked when the provider (or the fallback before) fails.
    fallbacks: tuple[Provider, ...] = ()
    # The async worker's: one Redis client and one ear for interim-frame subscribers, shared
    # by every job on its event loop. None in RQ's fork and simple workers, where each job
    # runs on an event loop of its own and opens its own.
    redis: AsyncRedis | None = None
    demand: Demand | None = None

    @asynccontextmanager
    async def connected(
        self, name: str, *, with_demand: bool = False
    ) -> AsyncIterator[tuple[AsyncRedis, Demand | None]]:
        """Redis (and, `with_demand`, the ear for interim-frame subscribers) for one job: the
        shared ones, or ones opened for the job and closed after it."""
        if self.redis is not None:
            yield self.redis, self.demand
            return
        redis = async_client(self.redis_target, name=name)
        demand = Demand(redis) if with_demand else None
        try:
            if demand is not None:
                await demand.start()
            yield redis, demand
        finally:
            if demand is not None:
                await demand.stop()
            await redis.aclose()


_process: WorkerContext | None = None
F = TypeVar("F", bound=Callable[..., Any])


def takes_context(func: F) -> F:
    """Marks a job function whose first argument is the worker's context."""
    func.takes_worker_context = True  # type: ignore[attr-defined]
    return func


def arguments(func: Callable[..., Any], args: Sequence[Any], context: WorkerContext) -> tuple[Any, ...]:
    """What a job's function is called with: `context` first if it takes one."""
    return (context, *args) if getattr(func, "takes_worker_context", False) else tuple(args)


def start(context: WorkerContext) -> None:
    """This process's context, from now on (before any fork: work horses inherit it)."""
    global _process
    _process = context


def of_process() -> WorkerContext:
    # A worker started by plain `rq worker` still works: the context is built on first use.
    if _process is None:
        from gql_service.worker.llm.factory import make_fallbacks, make_provider

        settings = load_settings()
        start(WorkerContext(settings, make_provider(settings), settings.redis_target, make_fallbacks(settings)))
    assert _process is not None
    return _process


class ContextJob(RQJob):
    """RQ's Job, running a function that takes the worker's context with it first. `_execute`
    is RQ's own (tests/test_rq_internals.py pins it) but for that argument."""

    def _execute(self) -> Any:
        if not self.func:
            raise ValueError("Cannot execute job: function is None")
        result = self.func(*arguments(self.func, self.args, of_process()), **self.kwargs)
        if asyncio.iscoroutine(result):
            return asyncio.run(result)
        return result
