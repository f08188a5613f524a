"""The edge: a connection must send its request head in time, and connections per process are bounded.

uvicorn closes a keep-alive connection left idle between requests, and nothing else: a
connection that sends nothing, or part of a request head, is kept for good. Enough of them
use up the process's file descriptors, and then libuv accepts and drops every new connection
(/healthz included) without a word in the log. `EdgeProtocol` is the HTTP protocol uvicorn
picks here (httptools) with two rules added:

* **HEADER_TIMEOUT_S.** A request head (request line and headers; a websocket upgrade's too)
  must arrive whole within this long of the connection opening, or of the previous
  response's end (keep-alive), or the connection is closed. Not "this long without data":
  a head trickled a byte at a time is cut all the same.
* **MAX_CONNECTIONS per process**, websockets and streams included, well under the file
  limit. At the bound, a new connection first closes the connection that has waited
  longest without a whole request head (nothing has been asked on it, so it is the cheapest
  to lose: nginx reuses idle keep-alive connections the same way). Only when every
  connection is busy (a request in flight, a websocket, a stream) is the new one answered
  503 and closed, counted in `gqls_connections_refused_total`.

The cost per request is two calls through the subclass, two OrderedDict operations and a
clock read; the timeouts are one timer per process, not one per connection.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from prometheus_client import Counter, Gauge
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gql_service.metrics import REGISTRY

log = logging.getLogger(__name__)

REFUSED = Counter(
    "gqls_connections_refused", "Connections answered 503 at MAX_CONNECTIONS (every other one busy)", registry=REGISTRY
)
CLOSED = Counter(
    "gqls_connections_closed",
    "Connections closed before a whole request head: past HEADER_TIMEOUT_S, or to make room at MAX_CONNECTIONS",
    ["reason"],
    registry=REGISTRY,
)
TIMED_OUT = CLOSED.labels("header_timeout")
EVICTED = CLOSED.labels("evicted")
CONNECTIONS = Gauge(
    "gqls_connections",
    "This API process's connections: waiting for a whole request head (idle keep-alive ones too), or active",
    ["state"],
    registry=REGISTRY,
)
BOUND = Gauge("gqls_connections_max", "MAX_CONNECTIONS as this API process applies it", registry=REGISTRY)

# Connections answered 503 are read until their client closes, or HEADER_TIMEOUT_S: closing
# one with its request unread would reset it, and its client could lose the answer. At most
# this many at once (beyond, the oldest is closed), so they stay within the descriptors kept
# in reserve.
MAX_LINGERING = 32
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 20\r\nretry-after: 1\r\nconnection: close\r\n\r\ntoo many connections"
)
REPORT_EVERY_S = 10.0  # one log line at most this often, while connections are closed or refused


@dataclass(frozen=True)
class EdgeLimits:
    header_timeout_s: float
    max_connections: int


def allowed_connections(fd_limit: int) -> int:
    """Connections a process with this file limit can hold: the limit less a reserve for
    everything else it opens (Redis and PostgreSQL pools, logs, the listener, connections
    being refused): 128 and an eighth, at most half. 768 under 1024, 57,216 under 65,536."""
    return fd_limit - min(fd_limit // 2, 128 + fd_limit // 8)


def edge_limits(header_timeout_s: float, max_connections: int | None) -> EdgeLimits:
    """The bound this process applies: MAX_CONNECTIONS, or (unset) what its file limit allows.
    A bound past the file limit would protect nothing, so a larger one is lowered to it."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    allowed = allowed_connections(1 << 20 if soft == resource.RLIM_INFINITY else soft)
    if max_connections is not None and max_connections > allowed:
        log.warning(
            "MAX_CONNECTIONS=%d does not fit the file limit (ulimit -n %d): applying %d", max_connections, soft, allowed
        )
    bound = allowed if max_connections is None else min(max_connections, allowed)
    return EdgeLimits(header_timeout_s=header_timeout_s, max_connections=max(1, bound))


class Edge:
    """One per process: its connections waiting for a whole request head, oldest first, and
    those answered 503 that are read until they close."""

    def __init__(self, limits: EdgeLimits) -> None:
        self.limits = limits
        self.waiting: OrderedDict[EdgeProtocol, float] = OrderedDict()
        self.lingering: OrderedDict[_Refused, float] = OrderedDict()
        self.connections: set[Any] = set()  # uvicorn's own set, once the first connection is made
        self.loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        # Connections made since this time have not yet had the chance to send anything (see
        # `admit`); None between rounds of accepts.
        self._round_from: float | None = None
        self._recent = {"timed out": 0, "evicted": 0, "refused": 0}
        self._report: asyncio.TimerHandle | None = None

    def __reduce__(self) -> tuple[type[Edge], tuple[EdgeLimits]]:
        # uvicorn --workers N pickles the protocol factory into each worker: a fresh Edge there.
        return Edge, (self.limits,)

    def _bind(self, conn: EdgeProtocol) -> asyncio.AbstractEventLoop:
        self.loop = conn.loop
        self.connections = conn.connections
        CONNECTIONS.labels("waiting").set_function(lambda: len(self.waiting))
        CONNECTIONS.labels("active").set_function(lambda: len(self.connections) - len(self.waiting))
        BOUND.set(self.limits.max_connections)
        return conn.loop

    def admit(self, conn: EdgeProtocol) -> None:
        """A new connection (uvicorn has counted it in `connections`)."""
        loop = self.loop or self._bind(conn)
        now = loop.time()
        if self._round_from is None:
            # The connections accepted together are all made before any of them is read. Until
            # the loop has gone round twice (asyncio's own loop starts reading one round later
            # than uvloop), they are not candidates to be closed for room: the first of a burst
            # would be closed before its request, sent at once, is even read. (A burst larger
            # than the connections older than it is answered 503 past the first ones.)
            self._round_from = now
            loop.call_soon(loop.call_soon, self._end_round)
        if len(self.connections) > self.limits.max_connections:
            oldest = next(iter(self.waiting.items()), None)
            if oldest is None or oldest[1] >= self._round_from:
                self._refuse(conn, now)
                return
            self.waiting.popitem(last=False)
            self._close(oldest[0], EVICTED, "evicted")
        self.wait(conn, now)

    def _end_round(self) -> None:
        self._round_from = None

    def wait(self, conn: EdgeProtocol, now: float) -> None:
        """`conn` waits for a whole request head from now."""
        self.waiting[conn] = now
        if self._sweeper is None:
            self._arm()

    def _arm(self) -> None:
        self._sweeper = cast(asyncio.AbstractEventLoop, self.loop).call_later(self.limits.header_timeout_s, self._sweep)

    def _close(self, conn: EdgeProtocol, counter: Any, kind: str) -> None:
        # Out of uvicorn's count at once: its connection_lost comes a round later, and the
        # connections accepted meanwhile must see the room this made.
        self.connections.discard(conn)
        conn.transport.close()
        counter.inc()
        self._note(kind)

    def _refuse(self, conn: EdgeProtocol, now: float) -> None:
        self.connections.discard(conn)
        transport = conn.transport
        transport.write(REFUSAL)
        refused = _Refused(self, transport)
        transport.set_protocol(refused)
        transport.write_eof()
        if len(self.lingering) >= MAX_LINGERING:
            self.lingering.popitem(last=False)[0].transport.close()
        self.lingering[refused] = now
        if self._sweeper is None:
            self._arm()
        REFUSED.inc()
        self._note("refused")

    def _sweep(self) -> None:
        """Close what has waited longer than HEADER_TIMEOUT_S; again when the next one is due
        (at least an eighth of the timeout later: one timer per process, not per connection)."""
        self._sweeper = None
        loop = cast(asyncio.AbstractEventLoop, self.loop)
        timeout = self.limits.header_timeout_s
        now = loop.time()
        cutoff = now - timeout
        while self.waiting:
            conn, since = next(iter(self.waiting.items()))
            if since > cutoff:
                break
            self.waiting.popitem(last=False)
            self._close(conn, TIMED_OUT, "timed out")
        while self.lingering:
            refused, since = next(iter(self.lingering.items()))
            if since > cutoff:
                break
            self.lingering.popitem(last=False)
            refused.transport.close()
        due = [next(iter(queue.values())) for queue in (self.waiting, self.lingering) if queue]
        if due:
            self._sweeper = loop.call_later(max(min(due) + timeout - now, timeout / 8), self._sweep)

    def _note(self, kind: str) -> None:
        self._recent[kind] += 1
        if self._report is None:
            self._report = cast(asyncio.AbstractEventLoop, self.loop).call_later(REPORT_EVERY_S, self._log_recent)

    def _log_recent(self) -> None:
        self._report = None
        recent, self._recent = self._recent, dict.fromkeys(self._recent, 0)
        at_bound = recent["evicted"] + recent["refused"]
        log.log(
            logging.WARNING if at_bound else logging.INFO,
            "edge: in the last %.0f s, %d connection(s) closed without a whole request head within "
            "HEADER_TIMEOUT_S=%g s, %d closed to make room and %d answered 503 at MAX_CONNECTIONS=%d",
            REPORT_EVERY_S, recent["timed out"], self.limits.header_timeout_s, recent["evicted"], recent["refused"],
            self.limits.max_connections,
        )  # fmt: skip


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a connection's wait for each request head in `Edge`."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        edge: Edge,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.edge = edge

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.edge.admit(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.edge.waiting.pop(self, None)
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        # A whole head: from here the request is the app's (a websocket's, after an upgrade).
        self.edge.waiting.pop(self, None)
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # uvicorn arms its keep-alive timer when the connection goes idle for the next
        # request (none pipelined, not closing): the next head is awaited from now.
        if self.timeout_keep_alive_task is not None:
            self.edge.wait(self, self.loop.time())


class _Refused(asyncio.Protocol):
    """A connection answered 503 (and its end of writing shut): what it sends is read and
    dropped until it closes, or `Edge._sweep` closes it."""

    __slots__ = ("edge", "transport")

    def __init__(self, edge: Edge, transport: asyncio.Transport) -> None:
        self.edge = edge
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.edge.lingering.pop(self, None)


def edge_protocol(limits: EdgeLimits) -> type[asyncio.Protocol]:
    """What to give uvicorn as `http=`. uvicorn only calls it, with keyword arguments
    (uvicorn/server.py `create_protocol`), so a partial with this process's Edge does; it
    pickles to a fresh Edge in each worker process (`--workers N`)."""
    return cast(type[asyncio.Protocol], partial(EdgeProtocol, edge=Edge(limits)))
