"""The outboxes (archive, webhooks): one bad entry never holds up the rest, a poison entry
ends in its outbox's dead letters (and can be replayed), the streams are bounded, and no
process writes an entry that no consumer reads. Real Redis, PostgreSQL, uvicorn and RQ
worker processes."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gql_service.models import Extraction

from .openai_stub import VALID_EXTRACTION


@pytest.mark.parametrize(
    "nul",
    [
        {"summary": "A visit\x00 to the clinic."},
        {"tags": ["health", "clin\x00ic"]},
        {"entities": [{"type": "PER\x00SON", "value": "Dr. Rao", "confidence": 0.9}]},
        {"entities": [{"type": "PERSON", "value": "Dr.\x00Rao", "confidence": 0.9}]},
        {"language": "e\x00"},
    ],
)
def test_an_extraction_with_a_nul_in_any_text_is_invalid(nul: dict[str, object]) -> None:
    Extraction.model_validate(VALID_EXTRACTION)  # the same answer without it is fine
    with pytest.raises(ValidationError):
        Extraction.model_validate({**VALID_EXTRACTION, **nul})
