"""Websocket protocol handlers, hardened against malformed messages.

Strawberry's handlers index into each message (`message["type"]`), so a JSON array or a
`start` without an id would raise inside the connection task. These subclasses check the
shape first and answer the way each protocol prescribes: graphql-transport-ws closes
with 4400; the legacy graphql-ws replies with an `error` message, as the reference
subscriptions-transport-ws server does, and keeps the connection.
"""

from __future__ import annotations

from typing import Any

from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import BaseGraphQLTransportWSHandler
from strawberry.subscriptions.protocols.graphql_ws.handlers import BaseGraphQLWSHandler

_LEGACY_TYPES = {"connection_init", "connection_terminate", "start", "stop"}


class TransportWSHandler(BaseGraphQLTransportWSHandler[Any, Any]):
    async def handle_message(self, message: Any) -> None:
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            await self.handle_invalid_message("Failed to parse message")
            return
        await super().handle_message(message)  # type: ignore[arg-type]


def _legacy_problem(message: Any) -> str | None:
    if not isinstance(message, dict) or message.get("type") not in _LEGACY_TYPES:
        return "Invalid message type!"
    if message["type"] in {"start", "stop"} and not isinstance(message.get("id"), str):
        return "Message needs a string id"
    if message["type"] == "start":
        payload = message.get("payload")
        if not isinstance(payload, dict) or not isinstance(payload.get("query"), str):
            return "start needs a payload with a query"
    return None


class LegacyWSHandler(BaseGraphQLWSHandler[Any, Any]):
    async def handle_message(self, message: Any) -> None:
        problem = _legacy_problem(message)
        if problem is not None:
            op_id = message.get("id") if isinstance(message, dict) and isinstance(message.get("id"), str) else None
            reply: Any = {"type": "error", "id": op_id, "payload": {"message": problem}}
            await self.send_message(reply)
            return
        await super().handle_message(message)
