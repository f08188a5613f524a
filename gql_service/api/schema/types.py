"""The GraphQL types: mirrors of the job and batch records, their connections and inputs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import strawberry
from strawberry.relay import PageInfo
from strawberry.scalars import JSON
from strawberry.types import Info

from gql_service import models, rendering
from gql_service.api.follow import Interim
from gql_service.api.schema import pagination
from gql_service.api.schema.context import caller
from gql_service.api.schema.leaf_inputs import leaf_input
from gql_service.api.schema.pagination import _page, _position_cursor, page_size

JobStatus = strawberry.enum(models.JobStatus, description="Where the job is in its life.")
JobStage = strawberry.enum(models.JobStage, description="What the worker is doing right now.")
Sentiment = strawberry.enum(models.Sentiment)
JobErrorCode = strawberry.enum(models.JobErrorCode)
WebhookStatus = strawberry.enum(models.WebhookStatus, description="Where a webhook's delivery is.")
JobPriority = strawberry.enum(
    models.JobPriority,
    description="Which queue a job waits on: workers take HIGH before NORMAL before LOW, keeping one take in "
    "PRIORITY_SHARE_EVERY (10) for NORMAL and one for LOW, so neither waits forever.",
)
BatchStatus = strawberry.enum(
    models.BatchStatus,
    description="OPEN takes more jobs; RUNNING is closed with jobs not ended; COMPLETED is closed with every job "
    "ended; CANCELED takes no more and its jobs not ended are CANCELED.",
)

BatchMode = strawberry.enum(
    models.BatchMode,
    description="INTERACTIVE: each job is one LLM call as it comes. ECONOMY: the jobs go to the provider's "
    "Batch API at its batch price (LLM_BATCH_DISCOUNT), answered within 24 h.",
)


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
    def from_view(cls, view: dict[str, Any]) -> Extraction:
        return cls(**view | {"entities": [Entity(**e) for e in view["entities"]]})


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
        view = rendering.extraction_view(m)
        entities = view["entities"]
        return cls(**view | {"entities": None if entities is None else [Entity(**e) for e in entities]})


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
    cost_usd: float | None = strawberry.field(
        description="What `usage` cost in USD at the prices of the model that answered (LLM_PRICES); null "
        "when that model has no price."
    )
    request_id: str | None
    trace_id: str | None = strawberry.field(
        description="The OpenTelemetry trace of the job's spans (W3C trace id, 32 hex digits), to find it in a "
        "tracing backend; null while tracing is off, and, for a job of a submitTexts call, until its first "
        "attempt starts (its spans have a trace of their own, linked to the request's)."
    )
    priority: JobPriority | None = strawberry.field(  # type: ignore[valid-type]
        description="The queue it waits on (a batch's jobs have the batch's); null for a job read back from the "
        "PostgreSQL history, which does not keep it."
    )
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
        delivery = await caller(info).deliveries.load(str(self.id))
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
        view = rendering.job_view(r)  # the one rendering of a job, the webhook's too
        result, error, usage = view["result"], view["error"], view["usage"]
        return cls(
            **view
            | {
                "id": strawberry.ID(r.id),
                "result": Extraction.from_view(result) if result else None,
                "error": JobError(**error) if error else None,
                "usage": TokenUsage(**usage) if usage else None,
            },
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


@strawberry.type(description="The provider's counts of the requests of one of its batches.")
class ProviderRequestCounts:
    total: int
    completed: int
    failed: int


@strawberry.type(
    description="One batch at the LLM provider's Batch API, made of an ECONOMY batch's jobs (up to "
    "ECONOMY_MAX_REQUESTS of them), as the provider last reported it."
)
class ProviderBatch:
    id: str | None = strawberry.field(description="The provider's batch id; null until it is made.")
    status: str = strawberry.field(
        description="The provider's word: validating, in_progress, finalizing, completed, expired, cancelling, "
        "cancelled or failed; `preparing` until the provider has it."
    )
    request_counts: ProviderRequestCounts


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
    priority: JobPriority = strawberry.field(description="Every job of the batch has it.")  # type: ignore[valid-type]
    mode: BatchMode  # type: ignore[valid-type]
    record: strawberry.Private[models.BatchRecord]

    @strawberry.field(description="An ECONOMY batch's provider batches, in the order they were made; empty otherwise.")
    async def provider_batches(self, info: Info) -> list[ProviderBatch]:
        chunks = await caller(info).batches.provider_batches(self.record)
        return [
            ProviderBatch(id=c.provider_batch, status=c.status,
                          request_counts=ProviderRequestCounts(total=c.total, completed=c.completed, failed=c.failed))
            for c in chunks
        ]  # fmt: skip

    @strawberry.field(description="The batch's jobs in the order they were added (1-100 a page).")
    async def jobs(
        self,
        info: Info,
        first: int | None = 20,
        after: str | None = None,
        status: JobStatus | None = None,  # type: ignore[valid-type]
    ) -> JobConnection:
        ctx = caller(info)
        size, start = page_size(first, default=20), _page(after)
        page, next_start = await ctx.batches.jobs_page(self.record, first=size, after=start, status=status)
        edges = [JobEdge(cursor=_position_cursor(n + 1), node=Job.from_record(r)) for r, n in page]
        return _connection(edges, start, next_start)

    @strawberry.field(
        description="The batch's jobs that have ended, in the order they ended: read on from the last "
        "`endCursor` to get each result once, as it comes (1-1000 a page)."
    )
    async def ended_jobs(self, info: Info, first: int | None = 100, after: str | None = None) -> JobConnection:
        ctx = caller(info)
        size, start = page_size(first, default=100, most=MAX_ENDED_PAGE), _page(after)
        records, next_start = await ctx.batches.ended_page(self.record, first=size, after=start)
        edges = [JobEdge(cursor=_position_cursor(at + 1), node=Job.from_record(r)) for r, at in records]
        # More have ended than this page holds: the next page has them. Either way endCursor
        # is where to read on, later, when more jobs have ended.
        page_info = pagination.page_info(
            edges, has_next=next_start < self.record.counts.ended, has_previous=start > 0,
            end_cursor=_position_cursor(next_start),
        )  # fmt: skip
        return JobConnection(edges=edges, page_info=page_info)

    @classmethod
    def from_record(cls, b: models.BatchRecord) -> Batch:
        return cls(
            id=strawberry.ID(b.id), name=b.name, status=b.status, metadata=b.metadata,  # type: ignore[arg-type]
            version=b.version,
            created_at=b.created_at, closed_at=b.closed_at, completed_at=b.completed_at,
            counts=BatchCounts(**b.counts.model_dump()), usage=TokenUsage(**b.usage.public()),
            priority=b.priority, mode=b.mode, record=b,
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
    priority: JobPriority = strawberry.field(  # type: ignore[valid-type]
        default=models.JobPriority.NORMAL, description="The priority of every job added to the batch."
    )
    mode: BatchMode = strawberry.field(  # type: ignore[valid-type]
        default=models.BatchMode.INTERACTIVE,
        description="ECONOMY: the jobs wait, then go to the provider's Batch API at its batch price, answered "
        "within 24 h (sent when the batch closes, ECONOMY_FLUSH_S after its first text, or at "
        "ECONOMY_MAX_REQUESTS texts).",
    )


def _connection(edges: list[JobEdge], start: int, next_start: int | None) -> JobConnection:
    end_cursor = _position_cursor(next_start) if next_start is not None else None
    page_info = pagination.page_info(
        edges, has_next=next_start is not None, has_previous=start > 0, end_cursor=end_cursor
    )
    return JobConnection(edges=edges, page_info=page_info)


@leaf_input  # built without Strawberry's field-by-field conversion: it is on every submit
@strawberry.input
class SubmitTextInput:
    text: str
    idempotency_key: str | None = None
    webhook_url: str | None = strawberry.field(
        default=None,
        description="Where to POST a signed event (Standard Webhooks) when the job ends: FINISHED, FAILED "
        "or CANCELED. http(s) only, to a public address.",
    )
    priority: JobPriority = strawberry.field(  # type: ignore[valid-type]
        default=models.JobPriority.NORMAL,
        description="HIGH jobs are taken before NORMAL ones, NORMAL before LOW. In a batch (submitTexts' "
        "batchId) the jobs have the batch's priority: leave it NORMAL, or give the batch's.",
    )


@strawberry.type
class SubmitTextPayload:
    job: Job
    deduplicated: bool
