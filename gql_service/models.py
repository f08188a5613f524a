"""The data the service keeps and the LLM must produce, as Pydantic models.

`Extraction` is the output contract the LLM is held to; `JobRecord` is the job state
kept in Redis and published on every change. The GraphQL types mirror these.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


class JobStage(enum.Enum):
    QUEUED = "QUEUED"
    CALLING_LLM = "CALLING_LLM"
    VALIDATING = "VALIDATING"
    REPAIRING = "REPAIRING"
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


class Entity(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(
        min_length=1, max_length=40, description="Entity kind, e.g. PERSON, ORG, LOCATION, DATE, MONEY, EMAIL"
    )
    value: str = Field(min_length=1, max_length=200, description="The entity as written in the text")
    confidence: Score = Field(description="Confidence in [0, 1]")


class Extraction(BaseModel):
    """What the LLM must return. Every field is required: strict structured outputs need that."""

    model_config = ConfigDict(extra="forbid")

    summary: str = Field(
        min_length=1, max_length=MAX_SUMMARY_CHARS, description=f"Brief summary, at most {MAX_SUMMARY_WORDS} words"
    )
    sentiment: Sentiment = Field(description="Overall sentiment")
    tags: list[Annotated[str, Field(min_length=1, max_length=40)]] = Field(
        min_length=1, max_length=5, description="1 to 5 short topical tags"
    )
    entities: list[Entity] = Field(max_length=50, description="Named entities found in the text")
    language: str = Field(pattern=r"^[a-z]{2}$", description="ISO 639-1 code of the text's language, e.g. en")
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

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
        )


class JobError(BaseModel):
    code: JobErrorCode
    message: str
    retryable: bool = False

    @field_validator("message")
    @classmethod
    def _bounded(cls, value: str) -> str:
        # Messages quote validation errors and exceptions, which can quote model output.
        return value if len(value) <= MAX_ERROR_CHARS else value[: MAX_ERROR_CHARS - 1] + "…"


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
    request_id: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status.terminal
