from typing import Optional

from pydantic import Field

from .base_model import BaseModel
from .enums import JobErrorCode, JobStage, JobStatus, Sentiment


class JobUpdates(BaseModel):
    job_updates: "JobUpdatesJobUpdates" = Field(alias="jobUpdates")


class JobUpdatesJobUpdates(BaseModel):
    id: str
    status: JobStatus
    stage: JobStage
    version: int
    result: Optional["JobUpdatesJobUpdatesResult"]
    error: Optional["JobUpdatesJobUpdatesError"]
    partial: Optional["JobUpdatesJobUpdatesPartial"]
    partial_seq: Optional[int] = Field(alias="partialSeq")


class JobUpdatesJobUpdatesResult(BaseModel):
    summary: str
    sentiment: Sentiment
    tags: list[str]
    entities: list["JobUpdatesJobUpdatesResultEntities"]
    language: str
    toxicity_score: float = Field(alias="toxicityScore")


class JobUpdatesJobUpdatesResultEntities(BaseModel):
    type_: str = Field(alias="type")
    value: str
    confidence: float


class JobUpdatesJobUpdatesError(BaseModel):
    code: JobErrorCode
    message: str
    retryable: bool


class JobUpdatesJobUpdatesPartial(BaseModel):
    summary: Optional[str]
    tags: Optional[list[str]]


JobUpdates.model_rebuild()
JobUpdatesJobUpdates.model_rebuild()
JobUpdatesJobUpdatesResult.model_rebuild()
