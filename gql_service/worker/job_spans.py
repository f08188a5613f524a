"""The worker's spans, while tracing is on (gql_service.tracing): one `job extract` span (kind
CONSUMER) per attempt, the job's stage transitions as its events, and each LLM call as a
`chat {model}` span (kind CLIENT) by the OpenTelemetry GenAI semantic conventions.

A job's span continues the trace its record carries (`JobRecord.trace`): a child of the
submitting request's span, or, for a job of a many-job request, a trace of its own that
links to it (the first attempt puts its span in the record, and retries descend from it).

No user text and no model output go into a span, unless
OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true: then the chat span's events carry
the user's text and the answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode

from gql_service import tracing
from gql_service.models import JobRecord, JobTrace
from gql_service.worker.llm import Completion, LLMError, Provider
from gql_service.worker.llm.base import OnText

# A reason (a validation problem, an error's message) is cut to this length in a span.
MAX_REASON_CHARS = 200


@contextmanager
def job_span(record: JobRecord) -> Iterator[Span]:
    """The span of one attempt at `record`'s job (INVALID_SPAN, which records nothing, while
    tracing is off). Its status says how the attempt ended, by exception type or error code
    alone: an exception's message can quote the model's output."""
    if not tracing.active():
        yield INVALID_SPAN
        return
    parent, links = tracing.job_parent(record.trace)
    attributes: dict[str, str | int] = {
        "gqls.job.id": record.id,
        "gqls.tenant": record.tenant,
        "gqls.job.attempt": record.attempts + 1,
        "messaging.system": "rq",
        "messaging.operation.type": "process",
    }
    if record.batch_id:
        attributes["gqls.batch.id"] = record.batch_id
    with tracing.tracer().start_as_current_span(
        "job extract", context=parent or Context(), kind=SpanKind.CONSUMER, links=links, attributes=attributes,
        record_exception=False, set_status_on_exception=False,
    ) as span:  # fmt: skip
        try:
            yield span
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise


def own_trace(span: Span, record: JobRecord) -> JobTrace | None:
    """What the record's trace becomes at this attempt's start: this span, where the record
    held only a link (the first attempt of a job of a many-job request); unchanged otherwise."""
    if record.trace is None or not record.trace.link or not span.is_recording():
        return record.trace
    return tracing.as_job_trace(span.get_span_context()) or record.trace


def stage(span: Span, record: JobRecord) -> None:
    """A transition the attempt wrote, as an event named for the stage entered."""
    if span.is_recording():
        span.add_event(
            record.stage.value,
            {"gqls.job.status": record.status.value, "gqls.job.version": record.version},
        )


def event(span: Span, name: str, reason: str, **attributes: str | int | float) -> None:
    """A pause, a repair re-ask, a validation failure: with its reason, cut short."""
    if span.is_recording():
        span.add_event(name, {"gqls.reason": reason[:MAX_REASON_CHARS], **attributes})


@contextmanager
def chat_span(provider: Provider, *, text: str, repair: bool) -> Iterator[Span]:
    """One LLM call (INVALID_SPAN while tracing is off)."""
    if not tracing.active():
        yield INVALID_SPAN
        return
    model = provider.model
    attributes: dict[str, str | bool] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": getattr(provider, "provider_name", "unknown"),
        "gen_ai.request.model": model,
        "gqls.llm.repair": repair,
    }
    address = server_address(provider)
    if address:
        attributes["server.address"] = address
    with tracing.tracer().start_as_current_span(
        f"chat {model}", kind=SpanKind.CLIENT, attributes=attributes, record_exception=False,
        set_status_on_exception=False,
    ) as span:  # fmt: skip
        if tracing.capture_content:
            span.add_event("gen_ai.user.message", {"content": text})
        try:
            yield span
        except LLMError as exc:
            span.set_attribute("error.type", exc.code.value)
            span.set_status(Status(StatusCode.ERROR, exc.code.value))
            _usage(span, exc.usage.prompt_tokens, exc.usage.completion_tokens)
            raise
        except BaseException as exc:
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise


def completed(span: Span, completion: Completion) -> None:
    if not span.is_recording():
        return
    span.set_attribute("gen_ai.response.model", completion.model)
    if completion.response_id:
        span.set_attribute("gen_ai.response.id", completion.response_id)
    if completion.finish_reasons:
        span.set_attribute("gen_ai.response.finish_reasons", list(completion.finish_reasons))
    _usage(span, completion.usage.prompt_tokens, completion.usage.completion_tokens)
    if tracing.capture_content:
        span.add_event("gen_ai.choice", {"content": completion.content})


def _usage(span: Span, input_tokens: int, output_tokens: int) -> None:
    span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", output_tokens)


def server_address(provider: Provider) -> str | None:
    base_url = getattr(provider, "base_url", None)
    return urlsplit(base_url).hostname if isinstance(base_url, str) else None


def first_token_noted(span: Span, on_text: OnText) -> OnText:
    """`on_text`, noting the first piece of a streamed answer on the chat span (time to first token)."""
    noted = False

    def feed(piece: str) -> None:
        nonlocal noted
        if not noted:
            noted = True
            span.add_event("gen_ai.first_token")
        on_text(piece)

    return feed
