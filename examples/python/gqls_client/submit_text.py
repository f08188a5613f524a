from datetime import datetime

from pydantic import Field

from .base_model import BaseModel
from .enums import JobStage, JobStatus


class SubmitText(BaseModel):
    submit_text: "SubmitTextSubmitText" = Field(alias="submitText")


class SubmitTextSubmitText(BaseModel):
    deduplicated: bool
    job: "SubmitTextSubmitTextJob"


class SubmitTextSubmitTextJob(BaseModel):
    id: str
    status: JobStatus
    stage: JobStage
    version: int
    created_at: datetime = Field(alias="createdAt")


SubmitText.model_rebuild()
SubmitTextSubmitText.model_rebuild()
