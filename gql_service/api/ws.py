"""Websocket protocol handlers, hardened against malformed messages.

Strawberry's handlers index into each message (`message["type"]`), so a JSON array or a
`start` without an id would raise inside the connection task. These subclasses check the
shape first and answer the way each protocol prescribes: graphql-transport-ws closes
with 4400; the legacy graphql-ws replies with an `error` message, as the reference
subscriptions-transport-ws server does, and keeps the connection. An operation may name its
document by id or hash (trusted documents, persisted queries): looked up first, and a
refusal is that operation's `error`, as is a document that doesn't parse.
"""

from __future__ import annotations

import asyncio
from typing import Any

from graphql import GraphQLError, GraphQLSyntaxError
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import BaseGraphQLTransportWSHandler
from strawberry.subscriptions.protocols.graphql_ws.handlers import BaseGraphQLWSHandler

from gql_service.api.disconnects import unless_gone
from gql_service.api.documents import DocumentRefused, named

_LEGACY_TYPES = {"connection_init", "connection_terminate", "start", "stop"}
# Ids are the client's names for its operations; nothing needs more than this.
MAX_ID_CHARS = 128


AMBIGUOUS = "the document holds several operations: name the one to run in operationName"


def _payload_problem(payload: Any, view: Any) -> str | None:
    """What is wrong with an operation payload: {query, variables?, operationName?, extensions?}."""
    if not isinstance(payload, dict):
        return "the payload must be an object"
    if not isinstance(payload.get("query"), str):
        return "payload.query must be a string"
    for name, kind, what in (
        ("variables", dict, "an object"),
        ("operationName", str, "a string"),
        ("extensions", dict, "an object"),
    ):
        if payload.get(name) is not None and not isinstance(payload[name], kind):
            return f"payload.{name} must be {what} or null"
    if payload.get("operationName") is None and len(view.operation_kinds(payload["query"])) > 1:
        return AMBIGUOUS  # Strawberry would run the first operation
    return None


def _id(message: Any) -> str | None:
    """The message's operation id, when it is one we accept."""
    op_id = message.get("id") if isinstance(message, dict) else None
    return op_id if isinstance(op_id, str) and 0 < len(op_id) <= MAX_ID_CHARS else None


def _id_problem(message: dict[str, Any]) -> str | None:
    if _id(message) is not None:
        return None
    if isinstance(message.get("id"), str) and message["id"]:
        return f"ids are at most {MAX_ID_CHARS} characters"
    return "the message needs a string id"


def _transport_problem(message: Any, view: Any) -> str | None:
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return "Failed to parse message"
    kind = message["type"]
    if kind in {"subscribe", "complete"} and (problem := _id_problem(message)):
        return problem
    if kind == "subscribe":
        return _payload_problem(message.get("payload"), view)
    if kind in {"ping", "pong"} and message.get("payload") is not None and not isinstance(message["payload"], dict):
        return f"a {kind} payload must be an object"
    return None


async def _named_document(handler: Any, message: Any, kind: str) -> DocumentRefused | None:
    """Put the document a `subscribe` (`start`) names by id or hash into its payload
    (gql_service/api/documents.py); what is refused is that operation's error."""
    payload = message.get("payload") if isinstance(message, dict) and message.get("type") == kind else None
    if not isinstance(payload, dict) or not isinstance(payload.get("query"), str | None) or _id(message) is None:
        return None  # malformed: answered as such below
    context = handler.context
    try:
        payload["query"] = await handler.view.documents.resolve(
            context.jobs.redis,
            payload.get("query"),
            named(payload, payload.get("extensions")),
            own_page=context.own_page,
        )
    except DocumentRefused as refused:
        return refused
    return None


class TransportWSHandler(BaseGraphQLTransportWSHandler[Any, Any]):
    async def send_message(self, message: Any) -> None:
        await unless_gone(super().send_message(message))  # a client that goes mid-send is no error

    async def handle_message(self, message: Any) -> None:
        if refused := await _named_document(self, message, "subscribe"):
            await self.send_message({"id": message["id"], "type": "error", "payload": [refused.formatted]})
            return
        # Every problem closes with 4400, as Strawberry closes an unknown operationName.
        if problem := _transport_problem(message, self.view):
            await self.handle_invalid_message(problem)
            return
        await super().handle_message(message)

    @staticmethod
    def _get_pre_execution_close_reason(error: GraphQLError) -> str | None:
        # A document that doesn't parse is its own operation's problem, as a validation
        # error is: an `error` message for its id; the socket and its other operations go on
        # (Strawberry closes the whole socket with 4400).
        if isinstance(error, GraphQLSyntaxError):
            return None
        return BaseGraphQLTransportWSHandler._get_pre_execution_close_reason(error)


def _legacy_problem(message: Any, view: Any) -> str | None:
    if not isinstance(message, dict) or message.get("type") not in _LEGACY_TYPES:
        return "Invalid message type!"
    if message["type"] in {"start", "stop"} and (problem := _id_problem(message)):
        return problem
    if message["type"] == "start":
        return _payload_problem(message.get("payload"), view)
    return None


class LegacyWSHandler(BaseGraphQLWSHandler[Any, Any]):
    async def send_message(self, message: Any) -> None:
        await unless_gone(super().send_message(message))  # a client that goes mid-send is no error

    async def handle(self) -> None:
        # The legacy protocol has no init timeout of its own: a socket that never sends
        # connection_init would hold its place forever. Same bound, and the same close
        # code, as graphql-transport-ws (legacy clients treat any close as a disconnect).
        timer = asyncio.create_task(self._close_unless_initialised())
        try:
            await super().handle()
        finally:
            timer.cancel()

    async def _close_unless_initialised(self) -> None:
        await asyncio.sleep(self.view.connection_init_wait_timeout.total_seconds())
        if not self.connection_acknowledged:
            await self.websocket.close(code=4408, reason="Connection initialisation timeout")

    async def handle_message(self, message: Any) -> None:
        if refused := await _named_document(self, message, "start"):
            await self.send_message({"type": "error", "id": message["id"], "payload": refused.formatted})
            return
        problem = _legacy_problem(message, self.view)
        if problem is not None:
            # The id is echoed only when it is one we accept (never a 100 KB one back).
            reply: Any = {"type": "error", "id": _id(message), "payload": {"message": problem}}
            await self.send_message(reply)
            return
        await super().handle_message(message)
