from typing import Optional

from pydantic import Field

from .base_model import BaseModel


class SubmitTextInput(BaseModel):
    text: str
    idempotency_key: Optional[str] = Field(alias="idempotencyKey", default=None)
