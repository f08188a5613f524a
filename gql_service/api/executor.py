"""graphql-core's executor, as Strawberry runs it, without the garbage it leaves behind.

graphql-core 3.3 builds one executor per subscription and a shallow copy of it per event
(`build_per_event_executor`), and two things in it outlive their use:

* the copy shares the subscription's memo of sub-field selections (`_relevant_sub_fields`),
  keyed by the id() of lists each event makes afresh: it never hits, and grows by a few
  entries per event for as long as the subscription is open;
* every executor holds bound methods of itself (`async_helpers`), so it, and all it holds,
  is freed only by the cycle collector.

So a subscription's frames piled up while it was open and became one cyclic blob when it
ended (BENCHMARKS.md: fan-out memory growth, and a full collection's pause of seconds).
Here each event's executor starts a memo of its own, and `async_helpers` reaches its
executor through a weak reference. tests/test_strawberry_internals.py pins what this uses.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from graphql.pyutils import RefMap
from graphql.type import GraphQLResolveInfoHelpers
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext


class ServiceExecutor(StrawberryGraphQLCoreExecutionContext):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.async_helpers = _helpers(weakref.ref(self))

    def build_per_event_executor(self, payload: Any) -> ServiceExecutor:
        executor: ServiceExecutor = super().build_per_event_executor(payload)  # type: ignore[assignment]
        executor._relevant_sub_fields = {}
        executor._stream_usages = RefMap()
        return executor  # (its async_helpers are this one's, as graphql-core's copy has them)


def _helpers(executor: Callable[[], ServiceExecutor | None]) -> GraphQLResolveInfoHelpers:
    def gather(values: Any) -> Awaitable[Any]:
        running = executor()
        assert running is not None  # an executor outlives the fields it runs
        return running.gather_async_work(values)

    def track(values: Any) -> None:
        running = executor()
        assert running is not None
        running.track_async_work(values)

    return GraphQLResolveInfoHelpers(gather=gather, track=track)
