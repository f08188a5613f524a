"""The queries: a job, a batch, pages of them, and Relay's node lookups."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import strawberry
from strawberry.types import Info

from gql_service import keys
from gql_service.api.errors import BadUserInput
from gql_service.api.schema import pagination
from gql_service.api.schema.context import caller
from gql_service.api.schema.pagination import decode_cursor, encode_cursor, page_size
from gql_service.api.schema.types import (
    Batch,
    BatchConnection,
    BatchEdge,
    Job,
    JobConnection,
    JobEdge,
    JobStatus,
    Node,
)
from gql_service.api.schema.usage import Usage

MAX_BATCH = 100


@strawberry.type
class Query:
    @strawberry.field(description="A job by id; null when it does not exist (or has expired).")
    async def job(self, info: Info, id: strawberry.ID) -> Job | None:
        ctx = caller(info)
        record = await ctx.jobs.get(str(id), tenant=ctx.tenant)
        return Job.from_record(record) if record else None

    @strawberry.field(
        description="Your jobs, newest first, in pages of `first` (1-100) after the cursor `after`; "
        "`createdAfter` (inclusive) and `createdBefore` (exclusive) bound their creation time. With the "
        "job history on, ended jobs Redis no longer holds are listed too."
    )
    async def jobs(
        self,
        info: Info,
        first: int | None = 20,
        after: str | None = None,
        status: JobStatus | None = None,  # type: ignore[valid-type]
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> JobConnection:
        ctx = caller(info)
        size = page_size(first, default=20)
        bounds = [_aware(created_after, "createdAfter"), _aware(created_before, "createdBefore")]
        page, next_start = await ctx.jobs.listing.page(
            tenant=ctx.tenant, first=size, after=decode_cursor(after) if after else None, status=status,
            created_after=bounds[0], created_before=bounds[1],
        )  # fmt: skip
        edges = [JobEdge(cursor=encode_cursor(ms, r.id), node=Job.from_record(r)) for r, ms in page]
        # With a status filter a page can end early, even empty, with more to come: its
        # endCursor then points past the jobs it looked at, not at its last edge.
        end_cursor = encode_cursor(*next_start) if next_start else None
        # Forward only (first/after): a page after a cursor has jobs before it.
        page_info = pagination.page_info(
            edges, has_next=next_start is not None, has_previous=after is not None, end_cursor=end_cursor
        )
        return JobConnection(edges=edges, page_info=page_info)

    @strawberry.field(description="A batch by id; null when it does not exist (or has expired).")
    async def batch(self, info: Info, id: strawberry.ID) -> Batch | None:
        ctx = caller(info)
        record = await ctx.batches.get(str(id), tenant=ctx.tenant)
        return Batch.from_record(record) if record else None

    @strawberry.field(description="Your batches, newest first, in pages of `first` (1-100).")
    async def batches(self, info: Info, first: int | None = 20, after: str | None = None) -> BatchConnection:
        ctx = caller(info)
        page, more = await ctx.batches.page(
            tenant=ctx.tenant, first=page_size(first, default=20), after=decode_cursor(after) if after else None
        )
        edges = [BatchEdge(cursor=encode_cursor(ms, b.id), node=Batch.from_record(b)) for b, ms in page]
        page_info = pagination.page_info(edges, has_next=more, has_previous=after is not None)
        return BatchConnection(edges=edges, page_info=page_info)

    @strawberry.field(
        description="Your jobs created in [from, to) (at most 366 days): how many by status, their tokens "
        "and cost, in all and by UTC day."
    )
    async def usage(
        self,
        info: Info,
        from_: Annotated[datetime, strawberry.argument(name="from")],
        to: datetime,
    ) -> Usage:
        ctx = caller(info)
        report = await ctx.jobs.usage.report(tenant=ctx.tenant, start=from_, end=to)
        return Usage.of_report(report, from_, to)

    @strawberry.field(description="The object with this id (Relay's refetch); null when it does not exist.")
    async def node(self, info: Info, id: strawberry.ID) -> Node | None:
        [found] = await _nodes(info, [id])
        return found

    @strawberry.field(
        description=f"The objects with these ids (at most {MAX_BATCH}), in order; null for a missing one."
    )
    async def nodes(self, info: Info, ids: list[strawberry.ID]) -> list[Node | None]:
        if len(ids) > MAX_BATCH:
            raise BadUserInput(f"at most {MAX_BATCH} ids, got {len(ids)}")
        return await _nodes(info, ids)


async def _nodes(info: Info, ids: list[strawberry.ID]) -> list[Node | None]:
    """Jobs and batches: a batch's id has its prefix, which no job id (uuid hex) has."""
    ctx = caller(info)
    wanted = [str(i) for i in ids]
    batch_ids = [i for i in wanted if i.startswith(keys.BATCH_ID_PREFIX)]
    job_ids = [i for i in wanted if not i.startswith(keys.BATCH_ID_PREFIX)]
    found: dict[str, Node] = {}
    if job_ids:
        records = await ctx.jobs.get_many(job_ids, tenant=ctx.tenant)
        found |= {r.id: Job.from_record(r) for r in records if r is not None}
    if batch_ids:
        batches = await ctx.batches.get_many(batch_ids, tenant=ctx.tenant)
        found |= {b.id: Batch.from_record(b) for b in batches if b is not None}
    return [found.get(i) for i in wanted]


def _aware(moment: datetime | None, name: str) -> datetime | None:
    """A time with its offset: one without it would mean a different instant on every host."""
    if moment is not None and moment.tzinfo is None:
        raise BadUserInput(f"{name} needs a time zone offset, e.g. 2026-11-24T12:00:00Z")
    return moment
