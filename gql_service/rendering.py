"""A job as its clients see it, written once.

`job_view` picks a record's public fields and their values; the GraphQL `Job`
(gql_service/api/schema/types.py) is built from it, the webhook's `data` is `as_json` of it
(gql_service/webhooks.py), and the CLI's JSON is the GraphQL answer. Keys are the schema's
field names in snake_case and values are Python's (enums, datetimes); `as_json` writes them
as GraphQL does: camelCase names, enum names, ISO 8601 times. tests/test_webhooks.py compares
an event with the GraphQL answer for the same job.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from gql_service.models import Extraction, JobRecord, PartialExtraction


def extraction_view(m: Extraction | PartialExtraction) -> dict[str, Any]:
    """An extraction, whole or as far as it is written (fields not yet arrived are None)."""
    return {
        "summary": m.summary,
        "sentiment": m.sentiment,
        "tags": None if m.tags is None else list(m.tags),
        "entities": None if m.entities is None else [e.model_dump() for e in m.entities],
        "language": m.language,
        "toxicity_score": m.toxicity_score,
    }


def job_view(r: JobRecord) -> dict[str, Any]:
    """The public fields of a job. Not here: the webhook's delivery (its own object, read
    apart) and the fields of interim frames (null on a job read whole)."""
    return {
        "id": r.id,
        "status": r.status,
        "stage": r.stage,
        "version": r.version,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "started_at": r.started_at,
        "finished_at": r.finished_at,
        "attempts": r.attempts,
        "model": r.model,
        "result": extraction_view(r.result) if r.result else None,
        "error": r.error.model_dump() if r.error else None,
        "usage": r.usage.public() if r.usage else None,
        "cost_usd": r.cost_usd,
        "request_id": r.request_id,
        "trace_id": r.trace.trace_id if r.trace else None,
        "priority": r.priority,
    }


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def as_json(value: Any) -> Any:
    """A view as the GraphQL answer writes it."""
    if isinstance(value, dict):
        return {_camel(k): as_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_json(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, datetime):
        return value.isoformat()  # as the GraphQL DateTime scalar writes it
    return value
