from typing import Any, Optional

from pydantic import Field

from .base_model import BaseModel
from .enums import BatchMode, JobPriority


class CreateBatchInput(BaseModel):
    name: str
    metadata: Optional[Any] = None
    "Any JSON object, up to 4 KiB."
    idempotency_key: Optional[str] = Field(alias="idempotencyKey", default=None)
    "The same key gives back the same batch (a resumed upload finds its batch)."
    priority: JobPriority = JobPriority.NORMAL
    "The priority of every job added to the batch."
    mode: BatchMode = BatchMode.INTERACTIVE
    "ECONOMY: the jobs wait, then go to the provider's Batch API at its batch price, answered within 24 h (sent when the batch closes, ECONOMY_FLUSH_S after its first text, or at ECONOMY_MAX_REQUESTS texts)."


class SubmitTextInput(BaseModel):
    text: str
    idempotency_key: Optional[str] = Field(alias="idempotencyKey", default=None)
    webhook_url: Optional[str] = Field(alias="webhookUrl", default=None)
    "Where to POST a signed event (Standard Webhooks) when the job ends: FINISHED, FAILED or CANCELED. http(s) only, to a public address."
    priority: JobPriority = JobPriority.NORMAL
    "HIGH jobs are taken before NORMAL ones, NORMAL before LOW. In a batch (submitTexts' batchId) the jobs have the batch's priority: leave it NORMAL, or give the batch's."
