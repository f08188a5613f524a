"""The data the service keeps and the LLM must produce, as Pydantic models.

`Extraction` is the output contract the LLM is held to; `JobRecord` is the job state
kept in Redis and published on every change. The GraphQL types mirror these.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

MAX_SUMMARY_WORDS = 40
# Bounds on what a model (or a misbehaving endpoint) can make us store and publish.
MAX_SUMMARY_CHARS = 600
MAX_MODEL_CHARS = 200
MAX_ERROR_CHARS = 1000


class JobStatus(enum.Enum):
    QUEUED = "QUEUED"
    STARTED = "STARTED"
    RETRYING = "RETRYING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED})


class JobPriority(enum.Enum):
    """Which of the LLM queues a job waits on: workers take HIGH before NORMAL before LOW,
    with a share of their takes kept for the lower ones (gql_service.worker.priorities)."""

    HIGH = "HIGH"
    NORMAL = "NORMAL"
    LOW = "LOW"


class JobStage(enum.Enum):
    QUEUED = "QUEUED"
    CALLING_LLM = "CALLING_LLM"
    VALIDATING = "VALIDATING"
    REPAIRING = "REPAIRING"
    # An ECONOMY batch's job, sent in a provider batch: its answer comes within 24 h.
    PROVIDER_BATCH = "PROVIDER_BATCH"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELED = "CANCELED"


class Sentiment(enum.Enum):
    # Lower-case values are what the model writes; GraphQL shows the names.
    POSITIVE = "positive"
    NEUTRAL = "neutral"
    NEGATIVE = "negative"


class JobErrorCode(enum.Enum):
    INVALID_OUTPUT = "INVALID_OUTPUT"
    REFUSED = "REFUSED"
    TRUNCATED = "TRUNCATED"
    TIMEOUT = "TIMEOUT"
    RATE_LIMITED = "RATE_LIMITED"
    PROVIDER_ERROR = "PROVIDER_ERROR"
    PROVIDER_AUTH = "PROVIDER_AUTH"
    WORKER_LOST = "WORKER_LOST"
    CANCELED = "CANCELED"
    INTERNAL = "INTERNAL"


Score = Annotated[float, Field(ge=0.0, le=1.0)]


def _no_nul(value: str) -> str:
    # PostgreSQL's text can't hold NUL: a model that writes one must repair its answer, or
    # the job ends INVALID_OUTPUT; it never reaches the record, nor the history.
    if "\x00" in value:
        raise ValueError("contains a NUL character (\\u0000); remove it")
    return value


# A string the model writes into the record.
Text = Annotated[str, AfterValidator(_no_nul)]


class Entity(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Text = Field(
        min_length=1, max_length=40, description="Entity kind, e.g. PERSON, ORG, LOCATION, DATE, MONEY, EMAIL"
    )
    value: Text = Field(min_length=1, max_length=200, description="The entity as written in the text")
    confidence: Score = Field(description="Confidence in [0, 1]")


class Extraction(BaseModel):
    """What the LLM must return. Every field is required: strict structured outputs need that."""

    model_config = ConfigDict(extra="forbid")

    summary: Text = Field(
        min_length=1, max_length=MAX_SUMMARY_CHARS, description=f"Brief summary, at most {MAX_SUMMARY_WORDS} words"
    )
    sentiment: Sentiment = Field(description="Overall sentiment")
    tags: list[Annotated[Text, Field(min_length=1, max_length=40)]] = Field(
        min_length=1, max_length=5, description="1 to 5 short topical tags"
    )
    entities: list[Entity] = Field(max_length=50, description="Named entities found in the text")
    language: Text = Field(pattern=r"^[a-z]{2}$", description="ISO 639-1 code of the text's language, e.g. en")
    toxicity_score: Score = Field(description="How toxic the text is, in [0, 1]")

    @field_validator("summary")
    @classmethod
    def _short_summary(cls, value: str) -> str:
        value = value.strip()
        words = len(value.split())
        if words > MAX_SUMMARY_WORDS:
            raise ValueError(f"summary has {words} words, at most {MAX_SUMMARY_WORDS} allowed")
        if not value:
            raise ValueError("summary is empty")
        return value

    @field_validator("language", mode="before")
    @classmethod
    def _lower_language(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value


class PartialExtraction(BaseModel):
    """An extraction as far as the model has written it: each field once it has arrived
    (the summary while it is being written), lists with their complete items so far."""

    summary: str | None = None
    sentiment: Sentiment | None = None
    tags: list[str] | None = None
    entities: list[Entity] | None = None
    language: str | None = None
    toxicity_score: float | None = None


class TokenUsage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # Of the prompt tokens, those the provider served from its cache: priced apart when
    # LLM_PRICES says so (gql_service.pricing), not shown to clients.
    cached_tokens: int = 0

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
        )

    def public(self) -> dict[str, int]:
        """The counts clients see (GraphQL's TokenUsage, webhooks)."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}  # fmt: skip


class JobError(BaseModel):
    code: JobErrorCode
    message: str
    retryable: bool = False

    @field_validator("message")
    @classmethod
    def _bounded(cls, value: str) -> str:
        # Messages quote validation errors and exceptions, which can quote model output.
        return value if len(value) <= MAX_ERROR_CHARS else value[: MAX_ERROR_CHARS - 1] + "…"


class JobTrace(BaseModel):
    """The W3C trace context a job's spans descend from (gql_service.tracing): the
    submitting request's span, or, for a job of a many-job request (`link`), that span to
    link to until the first attempt starts the job's own trace and puts its span here."""

    parent: str = Field(max_length=55)  # a version-00 `traceparent`
    state: str | None = Field(default=None, max_length=512)  # `tracestate`, as W3C bounds it
    link: bool = False

    @property
    def trace_id(self) -> str | None:
        """The trace the job's spans are in (unknown until its first attempt, for a link)."""
        return None if self.link else self.parent.split("-")[1]


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobRecord(BaseModel):
    """A job's whole state. Stored as JSON and published whole on every change."""

    id: str
    tenant: str = "public"
    status: JobStatus = JobStatus.QUEUED
    stage: JobStage = JobStage.QUEUED
    version: int = 1
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    model: str | None = None
    result: Extraction | None = None
    error: JobError | None = None
    usage: TokenUsage | None = None
    # What `usage` cost at the answering model's LLM_PRICES (gql_service.pricing); None
    # when the model has no price. Written with the usage, by the worker.
    cost_usd: float | None = None
    request_id: str | None = None
    # Where the job's end is announced (gql_service.webhooks); its delivery is kept apart
    # (`WebhookDelivery`): the record never changes once the job has ended.
    webhook_url: str | None = None
    # The batch the job belongs to: its counts move with the job's transitions (store.py).
    batch_id: str | None = None
    # Where the job's spans go: set only while tracing is on (gql_service.tracing).
    trace: JobTrace | None = None
    # Which queue it waits on (gql_service.keys.llm_queue); records written before there were
    # priorities have none stored and were queued as NORMAL. None only for a job read back
    # from the PostgreSQL history, which does not keep it.
    priority: JobPriority | None = JobPriority.NORMAL
    # Of `usage`, what a provider batch answered (an ECONOMY batch's job): priced at the
    # batch discount (LLM_BATCH_DISCOUNT). Not shown to clients.
    batch_usage: TokenUsage | None = None

    @property
    def terminal(self) -> bool:
        return self.status.terminal

    @property
    def bucket(self) -> str:
        """Which of its batch's counts the job is in."""
        return BUCKETS[self.status]


# A batch's counts, by job status (a job waiting for its retry is queued again).
BUCKETS = {
    JobStatus.QUEUED: "queued",
    JobStatus.RETRYING: "queued",
    JobStatus.STARTED: "running",
    JobStatus.FINISHED: "finished",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELED: "canceled",
}


class BatchMode(enum.Enum):
    """How a batch's jobs reach the LLM: one call each as they come (INTERACTIVE), or gathered
    into the provider's Batch API at its batch price, answered within 24 h (ECONOMY:
    gql_service.worker.economy)."""

    INTERACTIVE = "INTERACTIVE"
    ECONOMY = "ECONOMY"


class BatchStatus(enum.Enum):
    OPEN = "OPEN"  # takes more jobs
    RUNNING = "RUNNING"  # closed; some jobs have not ended
    COMPLETED = "COMPLETED"  # closed, and every job has ended
    CANCELED = "CANCELED"  # canceled: no more jobs, and those not ended are canceled


class BatchCounts(BaseModel):
    total: int = 0
    queued: int = 0
    running: int = 0
    finished: int = 0
    failed: int = 0
    canceled: int = 0

    @property
    def ended(self) -> int:
        return self.finished + self.failed + self.canceled


class BatchRecord(BaseModel):
    """A batch: its own fields, and the counts and usage its jobs' transitions keep."""

    id: str
    tenant: str
    name: str
    metadata: dict[str, object] = Field(default_factory=dict)
    version: int = 1
    created_at: datetime
    closed_at: datetime | None = None
    completed_at: datetime | None = None
    canceled_at: datetime | None = None
    priority: JobPriority = JobPriority.NORMAL  # every job of the batch waits with it
    mode: BatchMode = BatchMode.INTERACTIVE
    counts: BatchCounts = Field(default_factory=BatchCounts)
    usage: TokenUsage = Field(default_factory=lambda: TokenUsage())

    @property
    def status(self) -> BatchStatus:
        if self.canceled_at is not None:
            return BatchStatus.CANCELED
        if self.completed_at is not None:
            return BatchStatus.COMPLETED
        return BatchStatus.RUNNING if self.closed_at is not None else BatchStatus.OPEN

    @property
    def done(self) -> bool:
        """Closed, and every job has ended: nothing about it changes any more."""
        return self.closed_at is not None and self.counts.ended >= self.counts.total


class WebhookStatus(enum.Enum):
    PENDING = "PENDING"
    DELIVERED = "DELIVERED"
    RETRYING = "RETRYING"
    FAILED = "FAILED"


class WebhookDelivery(BaseModel):
    """How the webhook of a job's end is getting on; written by the delivering worker."""

    url: str
    status: WebhookStatus = WebhookStatus.PENDING
    attempts: int = 0
    last_status_code: int | None = None
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    delivered_at: datetime | None = None

    @property
    def ended(self) -> bool:
        return self.status in (WebhookStatus.DELIVERED, WebhookStatus.FAILED)

    @field_validator("last_error")
    @classmethod
    def _bounded(cls, value: str | None) -> str | None:
        return value if value is None or len(value) <= MAX_ERROR_CHARS else value[: MAX_ERROR_CHARS - 1] + "…"
