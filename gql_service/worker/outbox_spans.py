"""The spans of what is done once a job has ended, while tracing is on (gql_service.tracing):
each attempt at delivering its webhook (`webhook deliver`, kind CLIENT) and each write of
ended jobs into the PostgreSQL history (`history archive`, kind CLIENT).

Each is a trace of its own that links to the job's (the span its record carries: the
request that submitted it, or its first attempt), not a child in it: a delivery can come
hours after the job, over retries, and one archive write holds up to a batch of jobs.

No URL path or query, no header, no secret and no payload goes into a span (they can hold
a user's text or credentials): the receiver's host and port, the status code, and a failure
in a word (`HTTP 500`, `timeout`, `refused`, an exception's class).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypedDict
from urllib.parse import urlsplit

from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Link, Span, SpanKind, Status, StatusCode

from gql_service import tracing, webhooks
from gql_service.models import JobRecord, JobTrace, WebhookStatus


class DeliveryAbout(TypedDict, total=False):
    """What a delivery's span says of its job, carried by the delivery's RQ job (its
    arguments are the job id, the URL and the body, which a span must not show)."""

    tenant: str
    batch_id: str
    event: str  # the event's type, `job.finished`...
    trace: str  # the job's JobTrace, as JSON


def about(record: JobRecord) -> DeliveryAbout:
    found: DeliveryAbout = {"tenant": record.tenant, "event": webhooks.EVENT_TYPES[record.status]}
    if record.batch_id:
        found["batch_id"] = record.batch_id
    if record.trace is not None:
        found["trace"] = record.trace.model_dump_json()
    return found


def _link(job_id: str, trace: JobTrace | None) -> list[Link]:
    # The job's id on the link too: an archive write links to many jobs' traces.
    link = tracing.job_link(trace, {"gqls.job.id": job_id})
    return [link] if link is not None else []


def _server(url: str) -> dict[str, str | int]:
    """The receiver's host and port, and nothing else of its URL."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # refused at the attempt, as at submission
        return {}
    return {"server.address": parts.hostname, "server.port": port} if parts.hostname else {}


@contextmanager
def delivery_span(job_id: str, url: str, job: DeliveryAbout | None, *, attempt: int) -> Iterator[Span]:
    """One delivery attempt (INVALID_SPAN, which records nothing, while tracing is off)."""
    if not tracing.active():
        yield INVALID_SPAN
        return
    job = job or {}  # a delivery queued before its RQ job carried this
    attributes: dict[str, str | int] = {
        "gqls.job.id": job_id,
        "gqls.webhook.attempt": attempt,
        "http.request.method": "POST",
        **_server(url),
    }
    if "tenant" in job:
        attributes["gqls.tenant"] = job["tenant"]
    if "batch_id" in job:
        attributes["gqls.batch.id"] = job["batch_id"]
    if "event" in job:
        attributes["gqls.webhook.event"] = job["event"]
    trace = JobTrace.model_validate_json(job["trace"]) if "trace" in job else None
    with _client_span("webhook deliver", _link(job_id, trace), attributes) as span:
        yield span


def delivered(span: Span, outcome: webhooks.Outcome, status: WebhookStatus) -> None:
    """How the attempt went, and what the delivery is after it (RETRYING: another is due)."""
    if not span.is_recording():
        return
    span.set_attribute("gqls.webhook.status", status.value)
    if outcome.status_code is not None:
        span.set_attribute("http.response.status_code", outcome.status_code)
    if outcome.delivered:
        return
    if outcome.status_code is not None:
        error_type, reason = str(outcome.status_code), f"HTTP {outcome.status_code}"
    else:
        error_type = reason = outcome.error_type or "_OTHER"  # _OTHER: the conventions' "unknown"
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, reason))


@contextmanager
def archive_span(jobs: Sequence[tuple[str, JobTrace | None]]) -> Iterator[Span]:
    """One write of ended jobs (id, trace) into the history, with a link to each job's trace.

    A span keeps at most OTEL_SPAN_LINK_COUNT_LIMIT links (128 by default) and a write can
    hold more jobs (up to the outbox's batch, 200): the SDK then keeps the last ones and
    counts the others in the span's `dropped_links_count`, which OTLP carries; the span's
    `gqls.archive.records` says how many jobs it wrote in all."""
    if not tracing.active():
        yield INVALID_SPAN
        return
    attributes: dict[str, str | int] = {
        "db.system.name": "postgresql",
        "db.operation.name": "INSERT",
        "db.collection.name": "jobs",
        "gqls.archive.records": len(jobs),
    }
    if len(jobs) > 1:  # the conventions' batch size is for two operations or more
        attributes["db.operation.batch.size"] = len(jobs)
    links = [link for job_id, trace in jobs for link in _link(job_id, trace)]
    with _client_span("history archive", links, attributes) as span:
        yield span


def database(span: Span, host: str | None, port: int | None) -> None:
    """Where the write went (the connection's host and port: never its URL, which may hold a password)."""
    if span.is_recording():
        if host:
            span.set_attribute("server.address", host)
        if port:
            span.set_attribute("server.port", port)


@contextmanager
def _client_span(name: str, links: list[Link], attributes: dict[str, str | int]) -> Iterator[Span]:
    """A CLIENT span at the root of a trace of its own; an exception that ends it is said by
    its class alone (a message can quote a URL, a row, a receiver's answer)."""
    with tracing.tracer().start_as_current_span(
        name, context=Context(), kind=SpanKind.CLIENT, links=links, attributes=attributes, record_exception=False,
        set_status_on_exception=False,
    ) as span:  # fmt: skip
        try:
            yield span
        except BaseException as exc:
            span.set_attribute("error.type", type(exc).__qualname__)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
