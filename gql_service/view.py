"""Strawberry's ASGI GraphQL view, configured for this service: JSON codec, context, auth at connection_init."""

from __future__ import annotations

import uuid
from datetime import timedelta

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError
from strawberry.types.unset import UnsetType

from . import logs
from .auth import ApiKeys
from .schema import Context, schema
from .settings import Settings
from .ws import LegacyWSHandler, TransportWSHandler

MAX_REQUEST_ID_CHARS = 128


def request_id_of(request: Request | WebSocket) -> str:
    given = request.headers.get("x-request-id", "")
    return given[:MAX_REQUEST_ID_CHARS] if given.strip() else uuid.uuid4().hex


class GraphQLView(GraphQL[Context, None]):
    graphql_transport_ws_handler_class = TransportWSHandler
    graphql_ws_handler_class = LegacyWSHandler

    def __init__(self, *, keys: ApiKeys, settings: Settings) -> None:
        super().__init__(
            schema,
            graphql_ide="graphiql",
            max_subscriptions_per_connection=settings.max_subscriptions_per_connection,
            connection_init_wait_timeout=timedelta(seconds=settings.ws_init_timeout_s),
        )
        self.keys = keys

    def encode_json(self, data: object) -> str:
        # str, not bytes: Strawberry sends bytes as binary websocket frames, which the
        # GraphQL websocket protocols don't allow.
        return orjson.dumps(data).decode()

    def decode_json(self, data: str | bytes) -> object:
        return orjson.loads(data)

    async def get_context(self, request: Request | WebSocket, response: Response | WebSocket) -> Context:
        rid = request_id_of(request)
        logs.request_id.set(rid)  # every log line of this request carries it
        if isinstance(response, Response):
            response.headers["x-request-id"] = rid
            # RequireApiKey has checked the key already; without keys everyone is "public".
            tenant = request.scope.get("state", {}).get("tenant") or self.keys.tenant(None)
        else:
            # Decided at connection_init (on_ws_connect); an upgrade header may already carry it.
            tenant = self.keys.tenant(request.headers.get("authorization")) if self.keys.enabled else "public"
        return Context(jobs=request.app.state.jobs, tenant=tenant, request_id=rid)

    async def on_ws_connect(self, context: Context) -> UnsetType | dict[str, object] | None:
        if self.keys.enabled and context.tenant is None:
            tenant = self.keys.tenant_from_params(context.connection_params)
            if tenant is None:
                # graphql-transport-ws closes with 4403 Forbidden; legacy graphql-ws sends connection_error.
                raise ConnectionRejectionError({"message": "a valid API key is required"})
            context.tenant = tenant
        return await super().on_ws_connect(context)
