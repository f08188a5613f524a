"""A SERVER span per HTTP request, while tracing is on: the ASGI middleware that starts each
request's trace (or continues the caller's, from its W3C `traceparent` header).

Our own few lines rather than opentelemetry-instrumentation-asgi: that package also times and
names every `send` and `receive` (a span each, for a subscription's every frame) and records
the query string, where a GET request's GraphQL variables are: the users' texts.
"""

from __future__ import annotations

from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gql_service import tracing

# The routes (gql_service/api/app.py): a span's name must not grow with what clients send.
ROUTES = frozenset({"/", "/graphql"})
# Probes and scrapes: every few seconds, nothing to follow.
UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})


class TraceRequests:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in UNTRACED or not tracing.active():
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for name, value in scope.get("headers", ()):
            if name in (b"traceparent", b"tracestate"):
                headers[name.decode("latin-1")] = value.decode("latin-1")
        method = scope.get("method", "GET")
        route = path if path in ROUTES else None
        attributes: dict[str, str | int] = {"http.request.method": method, "url.scheme": scope.get("scheme", "http")}
        if route is not None:
            attributes["http.route"] = route
        name = f"{method} {route}" if route else method
        with tracing.tracer().start_as_current_span(
            name, context=tracing.extract(headers), kind=SpanKind.SERVER, attributes=attributes,
            record_exception=False,
        ) as span:  # fmt: skip

            async def traced_send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                await send(message)

            await self.app(scope, receive, traced_send)
