from typing import Optional

from .base_model import BaseModel
from .enums import JobStage, JobStatus


class GetJob(BaseModel):
    job: Optional["GetJobJob"]


class GetJobJob(BaseModel):
    id: str
    status: JobStatus
    stage: JobStage
    version: int


GetJob.model_rebuild()
