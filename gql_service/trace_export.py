"""How spans leave a process: the OTLP exporter the standard variables name, behind a
batch processor whose queue is bounded and whose drops are counted.

Imported by gql_service.tracing only once tracing is configured: it is the one module that
imports the OpenTelemetry SDK and its exporters.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence

from opentelemetry.context import Context
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import Counter

log = logging.getLogger(__name__)

# Short, unless OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT says otherwise: an export runs on the
# processor's own thread, but a shutdown (SIGTERM) waits for the one under way.
EXPORT_TIMEOUT_S = 2.0
DEFAULT_MAX_QUEUE_SIZE = 2048  # the SDK's own defaults for OTEL_BSP_MAX_QUEUE_SIZE
DEFAULT_MAX_BATCH_SIZE = 512  # and OTEL_BSP_MAX_EXPORT_BATCH_SIZE
OWN = "gql_service"  # the name of our own tracer (gql_service.tracing)
INSTRUMENTATIONS = "opentelemetry.instrumentation."  # how the maintained instrumentations name theirs


# The exporters' own loggers. A collector that is away makes them say so at every export (a
# WARNING per retry and an ERROR per batch: a line a second per process under load, for as
# long as it is away); one line a minute says as much.
EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
)
QUIET_S = 60.0


class OneLinePerMinute(logging.Filter):
    def __init__(self, every_s: float = QUIET_S) -> None:
        super().__init__()
        self.every_s = every_s
        self._next = 0.0
        self._held = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._held += 1
                return False
            held, self._held, self._next = self._held, 0, now + self.every_s
        if held:
            record.msg = f"{record.msg} ({held} more such lines in the last minute not shown)"
        return True


def exporter(environ: Mapping[str, str]) -> SpanExporter | None:
    """The OTLP exporter of OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL; None (tracing stays off,
    said once in the log) for a protocol this install can't speak."""
    variable = next(
        (name for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL") if environ.get(name)),
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    )
    protocol = environ.get(variable, "").strip() or "http/protobuf"
    quiet = OneLinePerMinute()
    for name in EXPORTER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLinePerMinute) for f in logger.filters):
            logger.addFilter(quiet)
    told = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT" in environ or "OTEL_EXPORTER_OTLP_TIMEOUT" in environ
    timeout = None if told else EXPORT_TIMEOUT_S  # None: the exporter reads the variable
    chosen: SpanExporter
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        chosen = OTLPSpanExporter(timeout=timeout)
        return chosen
    if protocol == "grpc":
        try:  # the `grpc` extra: grpcio is a large compiled wheel, not installed by default
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )
        except ImportError:
            # One line, at start-up, and the process goes on untraced: a missing optional
            # package must not keep an API or a worker from serving.
            log.warning(
                "%s=grpc needs the OTLP/gRPC exporter, which is not installed "
                "(pip install 'gql-service[grpc]'); tracing is off",
                variable,
            )
            return None
        chosen = GrpcSpanExporter(timeout=timeout)  # http:// endpoints: a plaintext channel
        return chosen
    log.warning("%s=%s is not supported (http/protobuf, grpc); tracing is off", variable, protocol)
    return None


# Instrumentations are named as OpenTelemetry's auto-instrumentation names them, in the
# standard variable that turns them off. Unset, the aiohttp client's is off: with the openai
# SDK's own retries off (gql_service/worker/llm/openai_provider.py), its span repeats the
# `chat` span it sits in, and it cost about 250 us a job attempt (docs/operations/tracing.md).
DISABLED_INSTRUMENTATIONS = "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"
DEFAULT_DISABLED = "aiohttp-client"


def _instrumentors(environ: Mapping[str, str]) -> list[BaseInstrumentor]:
    from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

    disabled = {name.strip() for name in environ.get(DISABLED_INSTRUMENTATIONS, DEFAULT_DISABLED).split(",")}
    known: dict[str, BaseInstrumentor] = {
        "aiohttp-client": AioHttpClientInstrumentor(),
        "psycopg": PsycopgInstrumentor(),
    }
    return [instrumentor for name, instrumentor in known.items() if name not in disabled]


def instrument(provider: TracerProvider, environ: Mapping[str, str]) -> None:
    """The maintained instrumentations that fit (measured in docs/operations/tracing.md): the
    job history's queries (psycopg), and, when asked for, the openai SDK's HTTP requests
    through its aiohttp transport, as children of each `chat` span. Not redis-py's (a span
    per command: +18 % CPU per submitText), nor ASGI's (it records the query string, a GET's
    GraphQL variables), nor httpx's for webhook deliveries (a receiver's URL may carry a token
    in its query; the `webhook deliver` span has the status and the host). Both record no
    content: a URL without credentials, a SQL text without its parameters."""
    # The stable HTTP and database conventions, as our own spans follow (http.request.method,
    # db.query.text), unless the operator chose: the instrumentations' default is the old ones.
    # Read once, by the first instrumentation imported below.
    os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http,database")
    for instrumentor in _instrumentors(environ):
        instrumentor.instrument(tracer_provider=provider)


def uninstrument() -> None:
    """Undo `instrument` (its patches hold the provider, which a shutdown ends)."""
    for instrumentor in _instrumentors({DISABLED_INSTRUMENTATIONS: ""}):
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()


def processor(exporter: SpanExporter, environ: Mapping[str, str], *, dropped: Counter) -> SpanProcessor:
    """The SDK's batch processor behind a gate of its queue's size (OTEL_BSP_MAX_QUEUE_SIZE):
    a span that would find the queue full is dropped at the gate, where `dropped` counts it
    (the SDK's own queue drops silently)."""
    size = _positive(environ, "OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_MAX_QUEUE_SIZE)
    # At most the queue: the SDK refuses to start with a larger batch (its default is 512).
    batch = min(_positive(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", DEFAULT_MAX_BATCH_SIZE), size)
    gate = _Gate(size)
    processor = BatchSpanProcessor(_Counted(exporter, gate), max_queue_size=size, max_export_batch_size=batch)
    return _Bounded(processor, gate, dropped)


def _positive(environ: Mapping[str, str], name: str, default: int) -> int:
    try:
        return max(int(environ.get(name, default)), 1)
    except ValueError:
        return default


class _Gate:
    """How many spans wait for export: taken in `on_end`, given back when the exporter takes
    them (they have left the queue, exported or not)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.queued = 0
        self._lock = threading.Lock()
        # A forked child (a fork worker's work horse) starts with an empty queue, as the
        # batch processor's own fork hook makes it, and a lock no other thread can hold.
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self.queued = 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.queued >= self.size:
                return False
            self.queued += 1
            return True

    def leave(self, count: int) -> None:
        with self._lock:
            self.queued = max(self.queued - count, 0)


class _Counted(SpanExporter):
    """The exporter, telling the gate how many spans left the queue."""

    def __init__(self, exporter: SpanExporter, gate: _Gate) -> None:
        self.exporter = exporter
        self.gate = gate

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            return self.exporter.export(spans)
        finally:
            self.gate.leave(len(spans))

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


def _instrumentation(span: ReadableSpan) -> bool:
    scope = span.instrumentation_scope
    return scope is not None and scope.name.startswith(INSTRUMENTATIONS)


class _Bounded(SpanProcessor):
    def __init__(self, batch: BatchSpanProcessor, gate: _Gate, dropped: Counter) -> None:
        self.batch = batch
        self.gate = gate
        self.dropped = dropped
        # The start of each run of drops is also said in the log (a worker's count reaches the
        # API's /metrics through Redis: gql_service.worker.trace_drops).
        self._dropping = False

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.batch.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if not span.context.trace_flags.sampled:
            return  # the batch processor exports sampled spans only
        if span.parent is None and _instrumentation(span):
            # An instrumentation's span outside any of ours (a background loop's query, say):
            # a trace of one span, about nothing a request or job did. Traces start at ours.
            return
        if self.gate.enter():
            self._dropping = False
            self.batch.on_end(span)
            return
        self.dropped.inc()
        if not self._dropping:
            self._dropping = True
            log.warning("spans dropped: the export queue is full (the collector is slow or away)")

    def shutdown(self) -> None:
        self.batch.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.batch.force_flush(timeout_millis)
