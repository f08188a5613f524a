"""How a subscription's results are framed over plain HTTP, exactly enough for every
client's parser: GraphQL over Server-Sent Events and Apollo's multipart subscriptions.

Strawberry's own framings trip clients nobody here wrote: its events end with
"\\r\\n\\r\\n", which urql (splitting the stream on "\\n\\n") never finds; its multipart
stream names a stray `,application/json` in its Content-Type, opens its first part without
a delimiter and closes after an empty part, which a strict parser (meros) reads as a part
dropped and a part that is not JSON. The transports here replace them in the view
(`stream_transport_classes_by_protocol`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from typing import Any, cast

import anyio
from prometheus_client import Gauge
from starlette.responses import StreamingResponse
from starlette.types import Send
from strawberry.http.streaming import MultipartSubscriptionTransport, SSETransport
from strawberry.types.graphql import OperationType

from gql_service.metrics import REGISTRY

HTTP_STREAMS = Gauge(
    "gqls_http_subscription_streams", "Subscriptions open over HTTP, by transport", ["transport"], registry=REGISTRY
)
for _transport in ("sse", "multipart"):
    HTTP_STREAMS.labels(_transport)  # shown at 0 from the start

BOUNDARY = "graphql"
MULTIPART_CONTENT_TYPE = f'multipart/mixed; boundary="{BOUNDARY}"; subscriptionSpec="1.0"'


def media_ranges(accept: str) -> Iterable[tuple[str, dict[str, str]]]:
    """Each media range of an Accept header: its type and its parameters (names lowercased,
    quotes taken off), one at a time: a header names several (Apollo's ends `,application/json`)."""
    for media_range in accept.split(","):
        media_type, *params = media_range.split(";")
        parsed = {}
        for param in params:
            name, _, value = param.partition("=")
            parsed[name.strip().lower()] = value.strip().strip("'\"")
        yield media_type.strip().lower(), parsed


class EventStream(SSETransport):
    """GraphQL over Server-Sent Events, distinct connections mode. Every event ends with
    "\\n\\n": the SSE grammar allows "\\r\\n" too, but urql's fetchSubscriptions splits on
    "\\n\\n" alone (and graphql-sse's reference server writes "\\n")."""

    def encode_event(self, event: str, data: str | None = None) -> str:
        return sse_event(event, data)

    def encode_comment(self, comment: str) -> str:
        return f": {comment}\n\n"


def sse_event(event: str, data: str | None = None) -> str:
    if data and ("\r" in data or "\n" in data):
        raise ValueError("SSE event data must be one line")  # orjson never writes a newline
    # An event without a `data` field is dropped by EventSource; an empty one stays bare
    # (`data:`), as graphql-sse writes it, so urql's `data: ?(.+)` finds nothing to parse.
    return f"event: {event}\ndata: {data}\n\n" if data else f"event: {event}\ndata:\n\n"


class MultipartSubscriptions(MultipartSubscriptionTransport):
    """Apollo's multipart subscriptions, framed as RFC 2046 has it: the body opens with
    `--graphql` (`PREAMBLE`, sent by `counted` before anything else), each part is headers,
    a blank line and JSON followed by `\\r\\n--graphql` (so a client has every part as soon as
    it is sent), and the close is the one `--` after the last delimiter."""

    PREAMBLE = f"--{BOUNDARY}"

    def __init__(self) -> None:
        super().__init__(BOUNDARY)

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": MULTIPART_CONTENT_TYPE}

    def accepts(self, accept: str) -> bool:
        # Strawberry reads the whole header as one media type: a multipart range after
        # another (`application/json, multipart/mixed;subscriptionSpec=1.0`) went unseen.
        return any(self.accepts_content_type(kind, params) for kind, params in media_ranges(accept))

    def allowed_operation_types(self, allowed_operation_types: set[OperationType]) -> Iterable[OperationType]:
        # A query or a mutation from a client that takes nothing but this stream is answered
        # with one part (Strawberry allowed subscriptions alone: an internal error).
        return allowed_operation_types

    def encode_complete(self) -> str:
        return "--\r\n"  # every part already ends with the delimiter this closes


def counted(stream: Callable[[], AsyncIterator[str]], content_type: str) -> Callable[[], AsyncIterator[str]]:
    """The stream as sent: counted in `gqls_http_subscription_streams` while open, and a
    multipart subscription opened by its delimiter before its first part or heartbeat."""
    transport = "sse" if content_type.startswith("text/event-stream") else "multipart"
    preamble = MultipartSubscriptions.PREAMBLE if content_type == MULTIPART_CONTENT_TYPE else None

    async def sent() -> AsyncIterator[str]:
        # Ends when the client goes: Starlette cancels the stream at the disconnect, and
        # the subscription's own `finally` blocks release its channels at once.
        HTTP_STREAMS.labels(transport).inc()
        try:
            if preamble is not None:
                yield preamble
            # Closed with this one: leaving `async for` early would leave Strawberry's stream
            # (and its heartbeat and subscription tasks) suspended until a garbage collection.
            async with contextlib.aclosing(cast(AsyncGenerator[str, None], stream())) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            HTTP_STREAMS.labels(transport).dec()

    return sent


class ClosingStreamingResponse(StreamingResponse):
    """Starlette's streaming response, ending the subscription behind it when the client
    goes. Starlette cancels the sending task at the disconnect and leaves the body
    suspended, and Strawberry's heartbeat merge cancels the task reading the subscription
    without closing it: the subscription (and its MAX_WATCHED_JOBS_PER_TENANT slots) lived
    on, suspended, until a garbage collection found it. Here the body and then the
    subscription's source are closed, shielded from the cancellation already under way
    (inside it every await would be cancelled again)."""

    def __init__(self, content: AsyncIterator[str], *, source: AsyncGenerator[Any, None] | None, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.source = source

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await cast(AsyncGenerator[Any, None], self.body_iterator).aclose()
                if self.source is not None:
                    with contextlib.suppress(RuntimeError):  # still running: it ends by itself
                        await self.source.aclose()
