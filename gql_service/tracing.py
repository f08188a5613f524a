"""OpenTelemetry tracing, off unless configured.

The SDK is set up once per process (`setup`) from the standard variables alone:
OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT turns it on,
OTEL_SDK_DISABLED=true (or OTEL_TRACES_EXPORTER=none) keeps it off, and the SDK itself reads
the rest (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER and _ARG,
OTEL_BSP_*, OTEL_EXPORTER_OTLP_HEADERS...). With nothing configured the SDK is never imported
and every helper here returns at its first line: no spans, no cost.

Spans leave the process on the batch processor's own thread, through a queue of at most
OTEL_BSP_MAX_QUEUE_SIZE spans: a collector that is down or hangs costs a dropped span
(counted in `gqls_trace_spans_dropped`), never a request's or a job's time.

Also here, because both sides need them: the W3C context a job carries across the queue
(`JobTrace`, stored in its record) and the ids a log line carries.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanContext
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import Counter

from gql_service.metrics import REGISTRY
from gql_service.models import JobTrace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

API_SERVICE = "gql-service-api"
WORKER_SERVICE = "gql-service-worker"
SHUTDOWN_TIMEOUT_MS = 3000

SPANS_DROPPED = Counter(
    "gqls_trace_spans_dropped",
    "Spans this process dropped because its export queue was full (collector slow or away)",
    registry=REGISTRY,
)

_PROPAGATOR = TraceContextTextMapPropagator()
_lock = threading.Lock()
_provider: TracerProvider | None = None
_tracer: trace.Tracer = trace.NoOpTracer()
# Whether content (prompts, completions) may go into spans: off unless asked for.
capture_content = False


def configured(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the standard variables ask for traces to be exported."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def active() -> bool:
    """Whether this process traces (its hot paths skip all tracing work otherwise)."""
    return _provider is not None


def tracer() -> trace.Tracer:
    return _tracer


def setup(default_service_name: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Set up the SDK for this process, once; whether tracing is on."""
    global _provider, _tracer, capture_content
    with _lock:
        if _provider is not None:
            return True
        if not configured(environ):
            return False
        from gql_service import trace_export  # the SDK: imported only where tracing is on

        exporter = trace_export.exporter(environ)
        if exporter is None:
            return False
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider

        resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: default_service_name}))
        provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER(_ARG)
        provider.add_span_processor(trace_export.processor(exporter, environ, dropped=SPANS_DROPPED))
        trace.set_tracer_provider(provider)
        trace_export.instrument(provider, environ)  # before any HTTP session or database pool is made
        _provider, _tracer = provider, provider.get_tracer(trace_export.OWN)
        capture_content = (
            environ.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "").strip().lower() == "true"
        )
    log.info("tracing on: service %s, spans to %s", resource.attributes.get(SERVICE_NAME), _endpoint(environ))
    return True


def shutdown() -> None:
    """Export what is queued (within SHUTDOWN_TIMEOUT_MS) and stop: on SIGTERM and Ctrl-C,
    from the API's lifespan and the end of a worker's work."""
    global _provider, _tracer
    with _lock:
        provider, _provider, _tracer = _provider, None, trace.NoOpTracer()
    if provider is not None:
        from gql_service import trace_export  # imported already: the provider came from it

        trace_export.uninstrument()
        provider.force_flush(SHUTDOWN_TIMEOUT_MS)
        provider.shutdown()


def flush(timeout_ms: int) -> None:
    """Send what is queued now, waiting at most `timeout_ms` (a fork worker's work horse,
    which ends without running exit hooks)."""
    provider = _provider
    if provider is not None:
        provider.force_flush(timeout_ms)


def _endpoint(environ: Mapping[str, str]) -> str:
    return environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")


# The context a job carries across the queue.


def current_job_trace(*, link: bool) -> JobTrace | None:
    """The current span's W3C context, for a job being submitted: its spans are children of
    it, or (`link`: one of many jobs of a request) in a trace of their own that links to it."""
    if _provider is None:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    parent = carrier.get("traceparent")
    if parent is None:
        return None
    return JobTrace(parent=parent, state=carrier.get("tracestate") or None, link=link)


def job_parent(job: JobTrace | None) -> tuple[Context | None, list[Link]]:
    """(parent context, links) for a span about a job that carries `job`."""
    if job is None:
        return None, []
    if not job.link:
        return _PROPAGATOR.extract(_carrier(job)), []
    remote = span_context(job)
    return Context(), [Link(remote)] if remote.is_valid else []


def span_context(job: JobTrace) -> SpanContext:
    """The span a job's trace context names (invalid if it names none)."""
    return trace.get_current_span(_PROPAGATOR.extract(_carrier(job))).get_span_context()


def job_link(job: JobTrace | None, attributes: Mapping[str, str] | None = None) -> Link | None:
    """A link to the span `job` carries (a job's request, or its first attempt once it has
    one): for work about an ended job, in a trace of its own (a webhook's delivery, an
    archive write). None when there is no valid context to link to."""
    if job is None:
        return None
    remote = span_context(job)
    return Link(remote, dict(attributes) if attributes else None) if remote.is_valid else None


def _carrier(job: JobTrace) -> dict[str, str]:
    return {"traceparent": job.parent, **({"tracestate": job.state} if job.state else {})}


def as_job_trace(span_context: SpanContext) -> JobTrace | None:
    """A span's own context as a job's (retries descend from the first attempt's span)."""
    if not span_context.is_valid:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, trace.set_span_in_context(trace.NonRecordingSpan(span_context)))
    return JobTrace(parent=carrier["traceparent"], state=carrier.get("tracestate") or None, link=False)


def extract(headers: Mapping[str, str]) -> Context:
    """The context a request's W3C headers carry (an empty one without them)."""
    return _PROPAGATOR.extract(headers)


def log_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span, as log lines carry them; None when tracing is off."""
    if _provider is None:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")
