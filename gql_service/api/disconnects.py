"""A client that goes while the server is sending to it: an ordinary end, not an error.

A websocket's operations run as tasks of their own beside the task reading the socket. When
the client goes (a closed tab, a dropped network), an operation may be sending at that very
moment, before the reader has seen the close and cancelled it. Starlette then raises
(WebSocketDisconnect for a socket that broke during the send, WebSocketDisconnected once the
close is known), and Strawberry either logged it at ERROR with a traceback (graphql-transport-ws:
"Exception in worker task") or left it in the task for asyncio to log at ERROR (the legacy
graphql-ws: "Task exception was never retrieved"). Nothing is lost: the reader sees the
close and cancels every operation of the socket, which releases its subscriptions.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable

from starlette.websockets import WebSocketDisconnect
from starlette.websockets import WebSocketDisconnected as StarletteDisconnected
from strawberry.http.exceptions import WebSocketDisconnected

log = logging.getLogger(__name__)

# What a send to a client that has gone raises, at each layer (uvicorn's ClientDisconnected,
# an OSError, reaches us as Starlette's WebSocketDisconnect).
GONE = (WebSocketDisconnect, StarletteDisconnected, WebSocketDisconnected, OSError)


async def unless_gone(send: Awaitable[None]) -> None:
    """Send, unless the client has gone: then there is nobody to tell, and nothing to log."""
    try:
        await send
    except GONE as exc:
        log.debug("a message for a client that has gone was dropped (%s)", type(exc).__name__)
