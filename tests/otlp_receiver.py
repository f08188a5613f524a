"""A real OTLP/HTTP trace receiver on loopback, for the tracing tests: it decodes each
ExportTraceServiceRequest with opentelemetry-proto, as a collector would, and keeps its spans.

`hang=True` makes a receiver that accepts every connection and never answers (a collector
that is stuck), to show that nothing the service does waits on it.
"""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass(frozen=True)
class ReceivedSpan:
    """A span as the receiver decoded it, with the service that sent it."""

    service: str
    name: str
    kind: int  # opentelemetry.proto.trace.v1 Span.SpanKind
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    links: list[tuple[str, str]]  # (trace id, span id)
    start_ns: int = 0  # Unix nanoseconds
    end_ns: int = 0
    event_ns: tuple[int, ...] = ()  # each event's time, in the order of `events`
    link_attributes: list[dict[str, Any]] = field(default_factory=list)  # each link's, in `links`' order
    dropped_links: int = 0  # links the SDK left out (past OTEL_SPAN_LINK_COUNT_LIMIT)
    status: tuple[int, str] = (0, "")  # (code: 0 unset, 1 ok, 2 error; description)


def _value(v: Any) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, which) if which else None


def _attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


def decode(request: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    """The spans of one export request, with the service each came from."""
    found = []
    for resource_spans in request.resource_spans:
        service = str(_attributes(resource_spans.resource.attributes).get("service.name"))
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                found.append(
                    ReceivedSpan(
                        service=service,
                        name=s.name,
                        kind=s.kind,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        attributes=_attributes(s.attributes),
                        events=[(e.name, _attributes(e.attributes)) for e in s.events],
                        links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        event_ns=tuple(e.time_unix_nano for e in s.events),
                        link_attributes=[_attributes(link.attributes) for link in s.links],
                        dropped_links=s.dropped_links_count,
                        status=(s.status.code, s.status.message),
                    )  # fmt: skip
                )
    return found


class SpanStore:
    """What a receiver got, and waits on it (the receivers' own notifications, no polling)."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0  # export requests that arrived (answered or, hanging, not)
        self._changed = threading.Condition()

    def _arrived(self) -> None:
        with self._changed:
            self.requests += 1
            self._changed.notify_all()

    def _add(self, request: ExportTraceServiceRequest) -> None:
        found = decode(request)
        with self._changed:
            self.spans.extend(found)
            self._changed.notify_all()

    def wait_for(self, predicate: Any, *, timeout_s: float = 60.0, what: str = "spans") -> list[ReceivedSpan]:
        """Wait until `predicate(spans)` holds."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self.spans), timeout=timeout_s):
                names = sorted({(s.service, s.name) for s in self.spans})
                raise TimeoutError(f"timed out waiting for {what}; received: {names}")
            return list(self.spans)

    def wait_for_requests(self, count: int, *, timeout_s: float = 60.0) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self.requests >= count, timeout=timeout_s):
                raise TimeoutError(f"timed out waiting for {count} export requests")


class OtlpReceiver(SpanStore):
    def __init__(self, *, hang: bool = False) -> None:
        super().__init__()
        self.hang = hang
        self._release = threading.Event()  # lets hanging handlers go at stop()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                receiver._arrived()
                if receiver.hang:
                    receiver._release.wait()
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver._add(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """OTEL_EXPORTER_OTLP_ENDPOINT (the exporter adds /v1/traces)."""
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()


def service_env(receiver: OtlpReceiver) -> dict[str, str]:
    """The settings that send a service's spans to `receiver`, exported within 50 ms (the
    tests wait for spans), with JSON log lines (which carry the trace and span ids)."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50", "LOG_FORMAT": "json"}
