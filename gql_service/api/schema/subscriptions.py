"""The subscriptions: a job's, a batch's, and many jobs' updates as they happen."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

import strawberry
from strawberry.types import Info

from gql_service.api.errors import BadUserInput
from gql_service.api.schema.context import caller
from gql_service.api.schema.queries import MAX_BATCH
from gql_service.api.schema.types import Batch, Job


@strawberry.type
class Subscription:
    # Each resolver closes the generator it reads from when it is closed itself: a stream
    # closed while paused at its `yield` (a client's `complete` during a send) would
    # otherwise hold its Redis subscription until the garbage collector finds it.
    @strawberry.subscription(
        description="The job now, then every change, completing after DONE/FAILED/CANCELED. "
        "Unknown ids end with a NOT_FOUND error. With `partial: true`, also interim frames (`partial` "
        "set) while the model writes its answer, at most one per PARTIAL_INTERVAL_MS."
    )
    async def job_updates(self, info: Info, id: strawberry.ID, partial: bool = False) -> AsyncGenerator[Job, None]:
        ctx = caller(info)
        async with contextlib.aclosing(
            ctx.jobs.following.updates([str(id)], tenant=ctx.tenant, partial=partial)
        ) as updates:
            async for update in updates:
                yield Job.from_update(update)

    @strawberry.subscription(
        description="The batch now, then as its counts move (at most four frames a second, each the latest), "
        "completing once it is closed and every job has ended. Unknown ids end with a NOT_FOUND error."
    )
    async def batch_updates(self, info: Info, id: strawberry.ID) -> AsyncGenerator[Batch, None]:
        ctx = caller(info)
        async with contextlib.aclosing(ctx.batches.updates(str(id), tenant=ctx.tenant)) as updates:
            async for record in updates:
                yield Batch.from_record(record)

    @strawberry.subscription(
        description="The updates of up to 100 jobs over one subscription: each job's current state, then "
        "every change, completing when all have ended. `partial` as for jobUpdates."
    )
    async def jobs_updates(
        self, info: Info, ids: list[strawberry.ID], partial: bool = False
    ) -> AsyncGenerator[Job, None]:
        ctx = caller(info)
        unique = list(dict.fromkeys(str(i) for i in ids))
        if not 1 <= len(unique) <= MAX_BATCH:
            raise BadUserInput(f"ids must hold 1 to {MAX_BATCH} job ids")
        async with contextlib.aclosing(
            ctx.jobs.following.updates(unique, tenant=ctx.tenant, partial=partial, field="jobsUpdates")
        ) as updates:
            async for update in updates:
                yield Job.from_update(update)
