"""The extraction as far as a streamed answer has written it.

jiter (the JSON parser the `openai` SDK itself uses for streamed structured outputs) reads
the unfinished JSON text. Only what is certain is kept: a string value once it is closed
(the summary aside, shown as it grows), a number once something follows it (`0.0` may be
the start of `0.05`), list items once complete, and only values the contract allows, so a
client never sees a value that the validated result would not have.
"""

from __future__ import annotations

import re
from typing import Any

import jiter

from gql_service.models import MAX_SUMMARY_CHARS, Entity, PartialExtraction, Sentiment

# A number at the very end of the text may not be finished yet.
_TRAILING_NUMBER = re.compile(rb"[-+0-9.eE]+\s*$")
_LANGUAGE = re.compile(r"^[a-z]{2}$")
_SENTIMENTS = {s.value: s for s in Sentiment}
MAX_TAGS, MAX_TAG_CHARS, MAX_ENTITIES = 5, 40, 50


def parse_partial(text: str) -> PartialExtraction | None:
    """None until the text is the start of a JSON object with something in it."""
    data = text.encode()
    try:
        growing = jiter.from_json(data, partial_mode="trailing-strings")
        settled = jiter.from_json(_TRAILING_NUMBER.sub(b"", data), partial_mode="on")
    except ValueError:
        return None
    if not isinstance(growing, dict) or not isinstance(settled, dict):
        return None
    partial = PartialExtraction(
        summary=_summary(growing.get("summary")),
        sentiment=_sentiment(settled.get("sentiment")),
        tags=_tags(settled.get("tags")),
        entities=_entities(settled.get("entities")),
        language=_language(settled.get("language")),
        toxicity_score=_score(settled.get("toxicity_score")),
    )
    return partial if any(v is not None for v in partial.__dict__.values()) else None


def _summary(value: Any) -> str | None:
    return value[:MAX_SUMMARY_CHARS] if isinstance(value, str) and value.strip() else None


def _sentiment(value: Any) -> Sentiment | None:
    return _SENTIMENTS.get(value) if isinstance(value, str) else None


def _tags(value: Any) -> list[str] | None:
    if not isinstance(value, list):
        return None
    return [t for t in value if isinstance(t, str) and 0 < len(t) <= MAX_TAG_CHARS][:MAX_TAGS]


def _entities(value: Any) -> list[Entity] | None:
    if not isinstance(value, list):
        return None
    found = []
    for item in value[:MAX_ENTITIES]:
        if isinstance(item, dict) and {"type", "value", "confidence"} <= item.keys():
            try:
                found.append(Entity.model_validate(item))
            except ValueError:
                continue  # not an entity the contract allows: the repair will sort it out
    return found


def _language(value: Any) -> str | None:
    return value.strip().lower() if isinstance(value, str) and _LANGUAGE.match(value.strip().lower()) else None


def _score(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1 else None
