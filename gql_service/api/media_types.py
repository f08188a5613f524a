"""The two media types a GraphQL response can have, and which one a client asked for.

GraphQL over HTTP: `application/graphql-response+json` when the client asks for it (with
the spec's status codes), `application/json` otherwise, as for every client before it.
Shared by the view and by the middleware that answer before it (401, 413).
"""

from __future__ import annotations

JSON = "application/json"
GRAPHQL_RESPONSE_JSON = "application/graphql-response+json"


def _json_qualities(accept: str) -> tuple[float, float]:
    """(application/graphql-response+json's q, application/json's q) in an Accept header."""
    response_json_q = json_q = 0.0
    for media_range in accept.split(","):
        media_type, *params = media_range.split(";")
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media_type = media_type.strip().lower()
        if media_type == GRAPHQL_RESPONSE_JSON:
            response_json_q = max(response_json_q, q)
        elif media_type in (JSON, "application/*", "*/*"):
            json_q = max(json_q, q)
    return response_json_q, json_q


def preferred_media_type(accept: str) -> str:
    """application/graphql-response+json when the client names it and ranks it no lower than
    application/json; otherwise (no Accept, */*, application/json) application/json, as before."""
    response_json_q, json_q = _json_qualities(accept)
    return GRAPHQL_RESPONSE_JSON if response_json_q > 0 and response_json_q >= json_q else JSON


def accepts_json(accept: str) -> bool:
    """Whether a plain JSON response will do (a client naming event streams or multipart as
    well, like urql's, still takes JSON for what needs no stream)."""
    return max(_json_qualities(accept)) > 0


def content_type_of(media_type: str) -> str:
    # application/json stays exactly as before (no charset); the new type names its charset.
    return f"{media_type}; charset=utf-8" if media_type == GRAPHQL_RESPONSE_JSON else media_type


def content_type_for(headers: dict[bytes, bytes]) -> bytes:
    """The Content-Type header for an ASGI request's raw headers (for middleware)."""
    accept = headers.get(b"accept", b"").decode("latin-1")
    return content_type_of(preferred_media_type(accept)).encode()
