"""The GraphQL schema: types mirroring the job record, and the three root operations."""

from __future__ import annotations

import base64
import contextlib
import math
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

import strawberry
from graphql import GraphQLError
from strawberry.dataloader import DataLoader
from strawberry.extensions import AddValidationRules, MaxTokensLimiter, ParserCache, ValidationCache
from strawberry.relay import PageInfo
from strawberry.scalars import JSON
from strawberry.types import Info

from gql_service import keys, models
from gql_service.api.errors import BadUserInput, Unauthenticated
from gql_service.api.jobs import Interim, JobService, NewJob
from gql_service.api.operations import OperationMetrics, Schema
from gql_service.api.query_limits import QueryLimits

JobStatus = strawberry.enum(models.JobStatus, description="Where the job is in its life.")
JobStage = strawberry.enum(models.JobStage, description="What the worker is doing right now.")
Sentiment = strawberry.enum(models.Sentiment)
JobErrorCode = strawberry.enum(models.JobErrorCode)
WebhookStatus = strawberry.enum(models.WebhookStatus, description="Where a webhook's delivery is.")
BatchStatus = strawberry.enum(
    models.BatchStatus,
    description="OPEN takes more jobs; RUNNING is closed with jobs not ended; COMPLETED is closed with every job "
    "ended; CANCELED takes no more and its jobs not ended are CANCELED.",
)

MAX_TOKENS = 2000
MAX_PAGE = 100
MAX_BATCH = 100
MAX_ENDED_PAGE = 1000


@strawberry.type
class Entity:
    type: str
    value: str
    confidence: float


@strawberry.type(description="The validated structure the LLM extracted from the text.")
class Extraction:
    summary: str = strawberry.field(description="At most 40 words.")
    sentiment: Sentiment  # type: ignore[valid-type]
    tags: list[str] = strawberry.field(description="1 to 5 short tags.")
    entities: list[Entity] = strawberry.field(description="Confidence in [0, 1].")
    language: str = strawberry.field(description="ISO 639-1 code.")
    toxicity_score: float = strawberry.field(description="In [0, 1].")

    @classmethod
    def from_model(cls, m: models.Extraction) -> Extraction:
        return cls(
            summary=m.summary,
            sentiment=m.sentiment,
            tags=list(m.tags),
            entities=[Entity(type=e.type, value=e.value, confidence=e.confidence) for e in m.entities],
            language=m.language,
            toxicity_score=m.toxicity_score,
        )


@strawberry.type(
    description="The extraction as far as the model has written it: each field once it has arrived "
    "(the summary while it is being written), lists with their complete items so far."
)
class PartialExtraction:
    summary: str | None
    sentiment: Sentiment | None  # type: ignore[valid-type]
    tags: list[str] | None
    entities: list[Entity] | None
    language: str | None
    toxicity_score: float | None

    @classmethod
    def from_model(cls, m: models.PartialExtraction) -> PartialExtraction:
        return cls(
            summary=m.summary,
            sentiment=m.sentiment,
            tags=m.tags,
            entities=[Entity(type=e.type, value=e.value, confidence=e.confidence) for e in m.entities]
            if m.entities is not None
            else None,
            language=m.language,
            toxicity_score=m.toxicity_score,
        )


@strawberry.type
class TokenUsage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@strawberry.type
class JobError:
    code: JobErrorCode  # type: ignore[valid-type]
    message: str
    retryable: bool


@strawberry.type(description="The webhook announcing a job's end, and how its delivery is getting on.")
class WebhookDelivery:
    url: str
    status: WebhookStatus  # type: ignore[valid-type]
    attempts: int = strawberry.field(description="Attempts made so far.")
    last_status_code: int | None = strawberry.field(description="The HTTP status of the last attempt's answer.")
    last_error: str | None = strawberry.field(description="Why the last attempt did not count, if it did not.")
    next_attempt_at: datetime | None = strawberry.field(description="When the next attempt is due (RETRYING).")
    delivered_at: datetime | None

    @classmethod
    def from_model(cls, m: models.WebhookDelivery) -> WebhookDelivery:
        return cls(
            url=m.url, status=m.status, attempts=m.attempts, last_status_code=m.last_status_code,
            last_error=m.last_error, next_attempt_at=m.next_attempt_at, delivered_at=m.delivered_at,
        )  # fmt: skip


@strawberry.interface(
    description="An object with an id unique across the whole schema, which `node(id:)` fetches again "
    "(Relay's Object Identification). Ids are the service's own, as `job(id:)` takes them."
)
class Node:
    id: strawberry.ID


@strawberry.type
class Job(Node):
    status: JobStatus  # type: ignore[valid-type]
    stage: JobStage  # type: ignore[valid-type]
    version: int = strawberry.field(description="Increases by one on every change.")
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    model: str | None
    result: Extraction | None
    error: JobError | None
    usage: TokenUsage | None
    request_id: str | None
    partial: PartialExtraction | None = strawberry.field(
        default=None,
        description="On interim frames of a `partial: true` subscription, while the stage is CALLING_LLM "
        "or REPAIRING: the answer as far as it is written. Null otherwise.",
    )
    partial_seq: int | None = strawberry.field(
        default=None,
        description="On interim frames: increases within an attempt. Frames carry the job's current "
        "`version` (they are not new versions): order them by (version, partialSeq).",
    )
    webhook_url: strawberry.Private[str | None] = None

    @strawberry.field(
        description="The webhook given with `webhookUrl`, and its delivery; null without one (or once the "
        "job's record has expired from Redis, after RESULT_TTL_S)."
    )
    async def webhook(self, info: Info) -> WebhookDelivery | None:
        if self.webhook_url is None:
            return None
        delivery = await _ctx(info).deliveries.load(str(self.id))
        return WebhookDelivery.from_model(delivery) if delivery else None

    @classmethod
    def from_update(cls, update: models.JobRecord | Interim) -> Job:
        """A record as it is, or an interim frame: the record with the partial answer."""
        if isinstance(update, Interim):
            job = cls.from_record(update.record)
            job.partial, job.partial_seq = PartialExtraction.from_model(update.partial), update.seq
            return job
        return cls.from_record(update)

    @classmethod
    def from_record(cls, r: models.JobRecord) -> Job:
        return cls(
            id=strawberry.ID(r.id),
            status=r.status,
            stage=r.stage,
            version=r.version,
            created_at=r.created_at,
            updated_at=r.updated_at,
            started_at=r.started_at,
            finished_at=r.finished_at,
            attempts=r.attempts,
            model=r.model,
            result=Extraction.from_model(r.result) if r.result else None,
            error=JobError(code=r.error.code, message=r.error.message, retryable=r.error.retryable)
            if r.error
            else None,
            usage=TokenUsage(**r.usage.model_dump()) if r.usage else None,
            request_id=r.request_id,
            webhook_url=r.webhook_url,
        )


@strawberry.type
class JobEdge:
    cursor: str
    node: Job


@strawberry.type(description="A page of jobs, newest first (Relay connection).")
class JobConnection:
    edges: list[JobEdge]
    page_info: PageInfo


@strawberry.type(description="A batch's jobs by status; they add up to `total` at every moment.")
class BatchCounts:
    total: int
    queued: int = strawberry.field(description="QUEUED, or RETRYING (waiting for the next attempt).")
    running: int
    finished: int
    failed: int
    canceled: int


@strawberry.type(description="Jobs submitted together (`submitTexts(batchId:)`), counted as they go.")
class Batch(Node):
    name: str
    status: BatchStatus  # type: ignore[valid-type]
    metadata: JSON
    version: int = strawberry.field(description="Increases on every change of the batch or its counts.")
    created_at: datetime
    closed_at: datetime | None
    completed_at: datetime | None
    counts: BatchCounts
    usage: TokenUsage = strawberry.field(description="Summed over the jobs that have ended.")
    record: strawberry.Private[models.BatchRecord]

    @strawberry.field(description="The batch's jobs in the order they were added (1-100 a page).")
    async def jobs(
        self,
        info: Info,
        first: int = 20,
        after: str | None = None,
        status: JobStatus | None = None,  # type: ignore[valid-type]
    ) -> JobConnection:
        ctx = _ctx(info)
        start = _page(first, after)
        page, next_start = await ctx.jobs.batches.jobs_page(self.record, first=first, after=start, status=status)
        edges = [JobEdge(cursor=_position_cursor(n + 1), node=Job.from_record(r)) for r, n in page]
        return _connection(edges, start, next_start)

    @strawberry.field(
        description="The batch's jobs that have ended, in the order they ended: read on from the last "
        "`endCursor` to get each result once, as it comes (1-1000 a page)."
    )
    async def ended_jobs(self, info: Info, first: int = 100, after: str | None = None) -> JobConnection:
        ctx = _ctx(info)
        start = _page(first, after, most=MAX_ENDED_PAGE)
        records, next_start = await ctx.jobs.batches.ended_page(self.record, first=first, after=start)
        edges = [JobEdge(cursor=_position_cursor(at + 1), node=Job.from_record(r)) for r, at in records]
        # More have ended than this page holds: the next page has them. Either way endCursor
        # is where to read on, later, when more jobs have ended.
        page_info = PageInfo(
            has_next_page=next_start < self.record.counts.ended, end_cursor=_position_cursor(next_start),
            has_previous_page=start > 0, start_cursor=edges[0].cursor if edges else None,
        )  # fmt: skip
        return JobConnection(edges=edges, page_info=page_info)

    @classmethod
    def from_record(cls, b: models.BatchRecord) -> Batch:
        return cls(
            id=strawberry.ID(b.id), name=b.name, status=b.status, metadata=b.metadata,  # type: ignore[arg-type]
            version=b.version,
            created_at=b.created_at, closed_at=b.closed_at, completed_at=b.completed_at,
            counts=BatchCounts(**b.counts.model_dump()), usage=TokenUsage(**b.usage.model_dump()), record=b,
        )  # fmt: skip


@strawberry.type
class BatchEdge:
    cursor: str
    node: Batch


@strawberry.type(description="A page of batches, newest first (Relay connection).")
class BatchConnection:
    edges: list[BatchEdge]
    page_info: PageInfo


@strawberry.input
class CreateBatchInput:
    name: str
    metadata: JSON | None = strawberry.field(default=None, description="Any JSON object, up to 4 KiB.")
    idempotency_key: str | None = strawberry.field(
        default=None, description="The same key gives back the same batch (a resumed upload finds its batch)."
    )


def _position_cursor(position: int) -> str:
    return base64.urlsafe_b64encode(f"p|{position}".encode()).decode()


def _page(first: int, after: str | None, *, most: int = MAX_PAGE) -> int:
    """The position a page of `first` starts at, from its `after` cursor."""
    if not 1 <= first <= most:
        raise BadUserInput(f"first must be 1 to {most}")
    if after is None:
        return 0
    try:
        kind, _, position = base64.urlsafe_b64decode(after.encode()).decode().partition("|")
        if kind == "p" and int(position) >= 0:
            return int(position)
    except (ValueError, UnicodeError):
        pass
    raise BadUserInput("after is not a cursor this API gave out")


def _connection(edges: list[JobEdge], start: int, next_start: int | None) -> JobConnection:
    end_cursor = _position_cursor(next_start) if next_start is not None else (edges[-1].cursor if edges else None)
    page_info = PageInfo(
        has_next_page=next_start is not None, end_cursor=end_cursor, has_previous_page=start > 0,
        start_cursor=edges[0].cursor if edges else None,
    )  # fmt: skip
    return JobConnection(edges=edges, page_info=page_info)


def encode_cursor(created_ms: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_ms!r}|{job_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created, _, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        position = float(created), job_id
    except (ValueError, UnicodeError):
        position = math.nan, ""
    if not math.isfinite(position[0]) or not position[1]:
        raise BadUserInput("after is not a cursor this API gave out")
    return position


@strawberry.input
class SubmitTextInput:
    text: str
    idempotency_key: str | None = None
    webhook_url: str | None = strawberry.field(
        default=None,
        description="Where to POST a signed event (Standard Webhooks) when the job ends: FINISHED, FAILED "
        "or CANCELED. http(s) only, to a public address.",
    )


@strawberry.type
class SubmitTextPayload:
    job: Job
    deduplicated: bool


@dataclass
class Context:
    jobs: JobService
    tenant: str | None = "public"
    request_id: str | None = None
    connection_params: object = None  # a websocket's connection_init payload
    # A page of jobs asking for `webhook` reads every delivery in one round trip. Not cached:
    # a websocket's context lives as long as its connection, and deliveries change.
    deliveries: DataLoader[str, models.WebhookDelivery | None] = field(init=False)

    def __post_init__(self) -> None:
        self.deliveries = DataLoader(self.jobs.deliveries, cache=False)


@dataclass(frozen=True)
class Caller:
    jobs: JobService
    tenant: str
    request_id: str | None
    deliveries: DataLoader[str, models.WebhookDelivery | None]


async def _raise(error: Exception) -> None:
    raise error


def _ctx(info: Info) -> Caller:
    ctx = info.context
    assert isinstance(ctx, Context)
    if ctx.tenant is None:
        raise Unauthenticated("a valid API key is required")
    return Caller(jobs=ctx.jobs, tenant=ctx.tenant, request_id=ctx.request_id, deliveries=ctx.deliveries)


@strawberry.type
class Query:
    @strawberry.field(description="A job by id; null when it does not exist (or has expired).")
    async def job(self, info: Info, id: strawberry.ID) -> Job | None:
        ctx = _ctx(info)
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
        first: int = 20,
        after: str | None = None,
        status: JobStatus | None = None,  # type: ignore[valid-type]
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> JobConnection:
        ctx = _ctx(info)
        if not 1 <= first <= MAX_PAGE:
            raise BadUserInput(f"first must be 1 to {MAX_PAGE}")
        bounds = [_aware(created_after, "createdAfter"), _aware(created_before, "createdBefore")]
        page, next_start = await ctx.jobs.list_jobs(
            tenant=ctx.tenant, first=first, after=decode_cursor(after) if after else None, status=status,
            created_after=bounds[0], created_before=bounds[1],
        )  # fmt: skip
        edges = [JobEdge(cursor=encode_cursor(ms, r.id), node=Job.from_record(r)) for r, ms in page]
        # With a status filter a page can end early, even empty, with more to come: its
        # endCursor then points past the jobs it looked at, not at its last edge.
        end_cursor = encode_cursor(*next_start) if next_start else (edges[-1].cursor if edges else None)
        page_info = PageInfo(
            has_next_page=next_start is not None,
            end_cursor=end_cursor,
            # Forward only (first/after): a page after a cursor has jobs before it.
            has_previous_page=after is not None,
            start_cursor=edges[0].cursor if edges else None,
        )
        return JobConnection(edges=edges, page_info=page_info)

    @strawberry.field(description="A batch by id; null when it does not exist (or has expired).")
    async def batch(self, info: Info, id: strawberry.ID) -> Batch | None:
        ctx = _ctx(info)
        record = await ctx.jobs.batches.get(str(id), tenant=ctx.tenant)
        return Batch.from_record(record) if record else None

    @strawberry.field(description="Your batches, newest first, in pages of `first` (1-100).")
    async def batches(self, info: Info, first: int = 20, after: str | None = None) -> BatchConnection:
        ctx = _ctx(info)
        if not 1 <= first <= MAX_PAGE:
            raise BadUserInput(f"first must be 1 to {MAX_PAGE}")
        page, more = await ctx.jobs.batches.page(
            tenant=ctx.tenant, first=first, after=decode_cursor(after) if after else None
        )
        edges = [BatchEdge(cursor=encode_cursor(ms, b.id), node=Batch.from_record(b)) for b, ms in page]
        page_info = PageInfo(
            has_next_page=more, end_cursor=edges[-1].cursor if edges else None, has_previous_page=after is not None,
            start_cursor=edges[0].cursor if edges else None,
        )  # fmt: skip
        return BatchConnection(edges=edges, page_info=page_info)

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
    ctx = _ctx(info)
    wanted = [str(i) for i in ids]
    batch_ids = [i for i in wanted if i.startswith(keys.BATCH_ID_PREFIX)]
    job_ids = [i for i in wanted if not i.startswith(keys.BATCH_ID_PREFIX)]
    found: dict[str, Node] = {}
    if job_ids:
        records = await ctx.jobs.get_many(job_ids, tenant=ctx.tenant)
        found |= {r.id: Job.from_record(r) for r in records if r is not None}
    if batch_ids:
        batches = await ctx.jobs.batches.get_many(batch_ids, tenant=ctx.tenant)
        found |= {b.id: Batch.from_record(b) for b in batches if b is not None}
    return [found.get(i) for i in wanted]


def _aware(moment: datetime | None, name: str) -> datetime | None:
    """A time with its offset: one without it would mean a different instant on every host."""
    if moment is not None and moment.tzinfo is None:
        raise BadUserInput(f"{name} needs a time zone offset, e.g. 2026-11-24T12:00:00Z")
    return moment


@strawberry.type
class Mutation:
    @strawberry.mutation(description="Queue text for extraction; returns at once with the new (or deduplicated) job.")
    async def submit_text(self, info: Info, input: SubmitTextInput) -> SubmitTextPayload:
        ctx = _ctx(info)
        record, deduplicated = await ctx.jobs.submit(
            input.text, idempotency_key=input.idempotency_key, tenant=ctx.tenant, request_id=ctx.request_id,
            webhook_url=input.webhook_url,
        )  # fmt: skip
        return SubmitTextPayload(job=Job.from_record(record), deduplicated=deduplicated)

    @strawberry.mutation(
        description=f"Queue up to {MAX_BATCH} texts in one round trip. A bad item is null in the answer, "
        "with a BAD_USER_INPUT error at its index; the good items are still submitted."
    )
    async def submit_texts(
        self,
        info: Info,
        inputs: list[SubmitTextInput],
        batch_id: Annotated[
            strawberry.ID | None,
            strawberry.argument(description="Add the jobs to this open batch (createBatch); any number of calls."),
        ] = None,
    ) -> list[SubmitTextPayload | None]:
        ctx = _ctx(info)
        if len(inputs) > MAX_BATCH:
            raise BadUserInput(f"at most {MAX_BATCH} inputs per call, got {len(inputs)}")
        batch = str(batch_id) if batch_id is not None else None
        if batch is not None:
            await ctx.jobs.batches.check_owned(batch, tenant=ctx.tenant)
        accepted: list[tuple[int, NewJob]] = []
        errors: dict[int, BadUserInput] = {}
        refused = await ctx.jobs.refused_webhooks({i.webhook_url for i in inputs if i.webhook_url is not None})
        for index, item in enumerate(inputs):
            try:
                if item.webhook_url in refused:
                    raise refused[item.webhook_url]
                job = ctx.jobs.new_job(
                    item.text, idempotency_key=item.idempotency_key, tenant=ctx.tenant, request_id=ctx.request_id,
                    webhook_url=item.webhook_url, batch_id=batch,
                )  # fmt: skip
                accepted.append((index, job))
            except BadUserInput as exc:
                errors[index] = BadUserInput(f"inputs[{index}]: {exc.message}", index=index)
        submitted = await ctx.jobs.submit_many([job for _, job in accepted], batch_id=batch) if accepted else []
        answers: list[Any] = [None] * len(inputs)
        for (index, _), (record, deduplicated) in zip(accepted, submitted, strict=True):
            answers[index] = SubmitTextPayload(job=Job.from_record(record), deduplicated=deduplicated)
        for index, error in errors.items():
            answers[index] = _raise(error)  # graphql-core places the error at [submitTexts, index]
        return answers

    @strawberry.mutation(
        description="Cancel a queued or running job; it becomes CANCELED and never turns DONE later. "
        "Cancelling a finished or failed job is a BAD_USER_INPUT error; cancelling a canceled one returns it."
    )
    async def cancel_job(self, info: Info, id: strawberry.ID) -> Job:
        ctx = _ctx(info)
        return Job.from_record(await ctx.jobs.cancel(str(id), tenant=ctx.tenant))

    @strawberry.mutation(description="A new, open batch: add jobs with submitTexts(batchId:), then closeBatch.")
    async def create_batch(self, info: Info, input: CreateBatchInput) -> Batch:
        ctx = _ctx(info)
        record, _ = await ctx.jobs.batches.create(
            name=input.name,
            metadata=input.metadata,  # type: ignore[arg-type]  # the JSON scalar; create() checks it is an object
            idempotency_key=input.idempotency_key,
            tenant=ctx.tenant,
        )
        return Batch.from_record(record)

    @strawberry.mutation(
        description="No more jobs for this batch: it is RUNNING until every job has ended, then COMPLETED. "
        "Closing a closed batch returns it."
    )
    async def close_batch(self, info: Info, id: strawberry.ID) -> Batch:
        ctx = _ctx(info)
        return Batch.from_record(await ctx.jobs.batches.close(str(id), tenant=ctx.tenant))

    @strawberry.mutation(description="Close the batch and cancel every job of it that has not ended.")
    async def cancel_batch(self, info: Info, id: strawberry.ID) -> Batch:
        ctx = _ctx(info)
        return Batch.from_record(await ctx.jobs.batches.cancel(str(id), tenant=ctx.tenant))


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
        ctx = _ctx(info)
        async with contextlib.aclosing(ctx.jobs.updates([str(id)], tenant=ctx.tenant, partial=partial)) as updates:
            async for update in updates:
                yield Job.from_update(update)

    @strawberry.subscription(
        description="The batch now, then as its counts move (at most four frames a second, each the latest), "
        "completing once it is closed and every job has ended. Unknown ids end with a NOT_FOUND error."
    )
    async def batch_updates(self, info: Info, id: strawberry.ID) -> AsyncGenerator[Batch, None]:
        ctx = _ctx(info)
        async with contextlib.aclosing(ctx.jobs.batches.updates(str(id), tenant=ctx.tenant)) as updates:
            async for record in updates:
                yield Batch.from_record(record)

    @strawberry.subscription(
        description="The updates of up to 100 jobs over one subscription: each job's current state, then "
        "every change, completing when all have ended. `partial` as for jobUpdates."
    )
    async def jobs_updates(
        self, info: Info, ids: list[strawberry.ID], partial: bool = False
    ) -> AsyncGenerator[Job, None]:
        ctx = _ctx(info)
        unique = list(dict.fromkeys(str(i) for i in ids))
        if not 1 <= len(unique) <= MAX_BATCH:
            raise BadUserInput(f"ids must hold 1 to {MAX_BATCH} job ids")
        async with contextlib.aclosing(ctx.jobs.updates(unique, tenant=ctx.tenant, partial=partial)) as updates:
            async for update in updates:
                yield Job.from_update(update)


# Documents larger than this are parsed and validated afresh each time instead of cached:
# the caches hold the query text and its AST, and 256 distinct 500 KB documents (a hostile
# client's, never a real one's) once kept 300 MiB alive in the API.
MAX_CACHED_QUERY_CHARS = 16_384


class _ParserCache(ParserCache):
    """Strawberry's parse cache for documents of a real client's size. Also, a document
    that fails to parse is left to Strawberry's own parse, which reports it: raised from the
    extension, the error escaped Strawberry's error handling, so a subscription with a syntax
    error ended with a bare `complete` (or nothing, on the legacy protocol)."""

    def on_parse(self) -> Iterator[None]:
        ctx = self.execution_context
        if len(ctx.query or "") <= MAX_CACHED_QUERY_CHARS:
            with contextlib.suppress(GraphQLError):
                ctx.graphql_document = self.cached_parse_document(ctx.query, **ctx.parse_options)
        yield


class _ValidationCache(ValidationCache):
    """Strawberry's validation cache, for documents of a real client's size."""

    def on_validate(self) -> Iterator[None]:
        if len(self.execution_context.query or "") <= MAX_CACHED_QUERY_CHARS:
            yield from super().on_validate()
        else:
            yield  # Strawberry validates it itself, uncached


schema = Schema(
    query=Query,
    mutation=Mutation,
    subscription=Subscription,
    # Factories: each request gets fresh extension instances; the caches live at module level.
    extensions=[
        # One rule class for every request: ValidationCache keys on the rule tuple, so a fresh
        # class per request would make every validation a cache miss.
        lambda: AddValidationRules([QueryLimits]),
        lambda: MaxTokensLimiter(max_token_count=MAX_TOKENS),
        lambda: _ParserCache(maxsize=256),
        lambda: _ValidationCache(maxsize=256),
        OperationMetrics,
    ],
)
