"""The GraphQL schema: types mirroring the job record, and the three root operations."""

from __future__ import annotations

import base64
import contextlib
import math
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import strawberry
from graphql import GraphQLError
from strawberry.extensions import AddValidationRules, MaxTokensLimiter, ParserCache, ValidationCache
from strawberry.types import Info

from . import models
from .errors import BadUserInput, Unauthenticated
from .jobs import Interim, JobService, NewJob
from .operations import OperationMetrics, Schema
from .query_limits import QueryLimits

JobStatus = strawberry.enum(models.JobStatus, description="Where the job is in its life.")
JobStage = strawberry.enum(models.JobStage, description="What the worker is doing right now.")
Sentiment = strawberry.enum(models.Sentiment)
JobErrorCode = strawberry.enum(models.JobErrorCode)

MAX_TOKENS = 2000


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


@strawberry.type
class Job:
    id: strawberry.ID
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
        )


@strawberry.type
class JobEdge:
    cursor: str
    node: Job


@strawberry.type
class PageInfo:
    has_next_page: bool
    end_cursor: str | None


@strawberry.type(description="A page of jobs, newest first (Relay connection).")
class JobConnection:
    edges: list[JobEdge]
    page_info: PageInfo


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


@dataclass(frozen=True)
class Caller:
    jobs: JobService
    tenant: str
    request_id: str | None


async def _raise(error: Exception) -> None:
    raise error


def _ctx(info: Info) -> Caller:
    ctx = info.context
    assert isinstance(ctx, Context)
    if ctx.tenant is None:
        raise Unauthenticated("a valid API key is required")
    return Caller(jobs=ctx.jobs, tenant=ctx.tenant, request_id=ctx.request_id)


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
        return JobConnection(
            edges=edges, page_info=PageInfo(has_next_page=next_start is not None, end_cursor=end_cursor)
        )


def _aware(moment: datetime | None, name: str) -> datetime | None:
    """A time with its offset: one without it would mean a different instant on every host."""
    if moment is not None and moment.tzinfo is None:
        raise BadUserInput(f"{name} needs a time zone offset, e.g. 2026-11-24T12:00:00Z")
    return moment


MAX_PAGE = 100
MAX_BATCH = 100


@strawberry.type
class Mutation:
    @strawberry.mutation(description="Queue text for extraction; returns at once with the new (or deduplicated) job.")
    async def submit_text(self, info: Info, input: SubmitTextInput) -> SubmitTextPayload:
        ctx = _ctx(info)
        record, deduplicated = await ctx.jobs.submit(
            input.text, idempotency_key=input.idempotency_key, tenant=ctx.tenant, request_id=ctx.request_id
        )
        return SubmitTextPayload(job=Job.from_record(record), deduplicated=deduplicated)

    @strawberry.mutation(
        description=f"Queue up to {MAX_BATCH} texts in one round trip. A bad item is null in the answer, "
        "with a BAD_USER_INPUT error at its index; the good items are still submitted."
    )
    async def submit_texts(self, info: Info, inputs: list[SubmitTextInput]) -> list[SubmitTextPayload | None]:
        ctx = _ctx(info)
        if len(inputs) > MAX_BATCH:
            raise BadUserInput(f"at most {MAX_BATCH} inputs per call, got {len(inputs)}")
        accepted: list[tuple[int, NewJob]] = []
        errors: dict[int, BadUserInput] = {}
        for index, item in enumerate(inputs):
            try:
                job = ctx.jobs.new_job(
                    item.text, idempotency_key=item.idempotency_key, tenant=ctx.tenant, request_id=ctx.request_id
                )
                accepted.append((index, job))
            except BadUserInput as exc:
                errors[index] = BadUserInput(f"inputs[{index}]: {exc.message}", index=index)
        submitted = await ctx.jobs.submit_many([job for _, job in accepted]) if accepted else []
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


@strawberry.type
class Subscription:
    @strawberry.subscription(
        description="The job now, then every change, completing after DONE/FAILED/CANCELED. "
        "Unknown ids end with a NOT_FOUND error. With `partial: true`, also interim frames (`partial` "
        "set) while the model writes its answer, at most one per PARTIAL_INTERVAL_MS."
    )
    async def job_updates(self, info: Info, id: strawberry.ID, partial: bool = False) -> AsyncGenerator[Job, None]:
        ctx = _ctx(info)
        async for update in ctx.jobs.updates([str(id)], tenant=ctx.tenant, partial=partial):
            yield Job.from_update(update)

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
        async for update in ctx.jobs.updates(unique, tenant=ctx.tenant, partial=partial):
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
