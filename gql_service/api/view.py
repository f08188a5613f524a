"""Strawberry's ASGI GraphQL view, configured for this service: JSON codec, context, auth at
connection_init, the GraphQL over HTTP spec's media types, status codes and request errors,
subscriptions over websockets (both protocols) and over HTTP (GraphQL over Server-Sent
Events, both modes, and Apollo's multipart subscriptions, framed in streams.py; the single
connection mode's requests are handed to single_connection.py), and the GraphiQL
playground served from the package (no CDN)."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from datetime import timedelta
from typing import Any

import orjson
from cross_web import AsyncHTTPRequestAdapter, HTTPException
from graphql import GraphQLError, GraphQLSyntaxError, OperationDefinitionNode, parse
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError
from strawberry.http import GraphQLHTTPResponse, GraphQLRequestData
from strawberry.http.base import BaseRequestProtocol
from strawberry.schema.exceptions import CannotGetOperationTypeError, InvalidOperationTypeError
from strawberry.subscriptions import (
    GRAPHQL_SSE_PROTOCOL,
    GRAPHQL_TRANSPORT_WS_PROTOCOL,
    GRAPHQL_WS_PROTOCOL,
    MULTIPART_SUBSCRIPTION_PROTOCOL,
)
from strawberry.types import ExecutionResult
from strawberry.types.execution import PreExecutionError
from strawberry.types.unset import UnsetType

from gql_service import logs
from gql_service.api.auth import ApiKeys
from gql_service.api.documents import ID_FIELDS, DocumentRefused, documents_from, named, own_page
from gql_service.api.error_codes import code_of
from gql_service.api.errors import RequestError
from gql_service.api.media_types import GRAPHQL_RESPONSE_JSON, JSON, accepts_json, content_type_of, preferred_media_type
from gql_service.api.operations import core_schema
from gql_service.api.playground import Playground
from gql_service.api.reservations import Reservations
from gql_service.api.schema import MAX_TOKENS, Context, schema
from gql_service.api.single_connection import SingleConnection
from gql_service.api.streams import ClosingStreamingResponse, EventStream, MultipartSubscriptions, counted
from gql_service.api.ws import AMBIGUOUS, LegacyWSHandler, TransportWSHandler
from gql_service.settings import Settings

MAX_REQUEST_ID_CHARS = 128
SUBSCRIPTION_NEEDS_A_STREAM = (
    "a subscription needs a stream: a websocket (graphql-transport-ws or graphql-ws), Server-Sent Events "
    "(Accept: text/event-stream) or multipart HTTP (Accept: multipart/mixed;subscriptionSpec=1.0)"
)
# A request object or a batch; anything else ("hello", null, 42) is not a GraphQL request.
_OBJECT_OR_ARRAY = re.compile(rb"[ \t\r\n]*[{\[]")


def request_id_of(request: Request | WebSocket) -> str:
    given = request.headers.get("x-request-id", "")
    return given[:MAX_REQUEST_ID_CHARS] if given.strip() else uuid.uuid4().hex


class OperationKinds:
    """The operations a document holds, as (name, type) in order ("query", "subscription",
    ...; not a dict: several may be anonymous), remembered for recent documents: clients send
    the same few documents again and again, so this costs a parse only the first time. Keyed
    by digest, so the cache stays small whatever the documents' size."""

    def __init__(self, maxsize: int = 256) -> None:
        self.maxsize = maxsize
        self._kinds: OrderedDict[bytes, tuple[tuple[str | None, str], ...]] = OrderedDict()

    def __call__(self, query: str) -> tuple[tuple[str | None, str], ...]:
        key = hashlib.blake2b(query.encode(errors="surrogatepass"), digest_size=16).digest()
        kinds = self._kinds.get(key)
        if kinds is None:
            try:
                document = parse(query, no_location=True, max_tokens=MAX_TOKENS)
            except GraphQLError:
                kinds = ()  # execution reports the syntax error as it does for any document
            else:
                kinds = tuple(
                    (node.name.value if node.name else None, node.operation.value)
                    for node in document.definitions
                    if isinstance(node, OperationDefinitionNode)
                )
            self._kinds[key] = kinds
            if len(self._kinds) > self.maxsize:
                self._kinds.popitem(last=False)
        else:
            self._kinds.move_to_end(key)
        return kinds


def error_code(error: GraphQLError, result: ExecutionResult) -> str:
    """A code for an error that has none. Strawberry hands every error to the schema's
    process_errors, which stamps its code (gql_service.api.error_codes, the one
    classification, also the metrics' and the log's): this only covers one that got past it."""
    if isinstance(result, PreExecutionError) and not isinstance(error, GraphQLSyntaxError):
        return code_of(error) if error.original_error is not None else "GRAPHQL_VALIDATION_FAILED"
    return code_of(error)


def is_request_error(response_data: GraphQLHTTPResponse) -> bool:
    """Nothing was executed: the spec's request error (a field error carries a path)."""
    errors = response_data.get("errors") or []
    return (
        response_data.get("data") is None
        and bool(errors)
        and all(isinstance(e, dict) and "path" not in e for e in errors)
    )


class GraphQLView(GraphQL[Context, None]):
    graphql_transport_ws_handler_class = TransportWSHandler
    graphql_ws_handler_class = LegacyWSHandler
    # Framings every client parses (gql_service/api/streams.py), in place of Strawberry's.
    stream_transport_classes_by_protocol = {
        MULTIPART_SUBSCRIPTION_PROTOCOL: MultipartSubscriptions,
        GRAPHQL_SSE_PROTOCOL: EventStream,
    }

    def __init__(self, *, keys: ApiKeys, settings: Settings) -> None:
        super().__init__(
            schema,
            graphql_ide="graphiql",
            max_subscriptions_per_connection=settings.max_subscriptions_per_connection,
            connection_init_wait_timeout=timedelta(seconds=settings.ws_init_timeout_s),
            subscription_protocols=(
                GRAPHQL_TRANSPORT_WS_PROTOCOL,
                GRAPHQL_WS_PROTOCOL,
                GRAPHQL_SSE_PROTOCOL,
                MULTIPART_SUBSCRIPTION_PROTOCOL,
            ),
        )
        self.keys = keys
        self.documents = documents_from(settings, core_schema(schema))
        self.operation_kinds = OperationKinds()
        reservations = Reservations(
            max_per_tenant=settings.max_sse_reservations_per_tenant,
            ttl_s=settings.sse_reservation_ttl_s,
            max_operations=settings.max_subscriptions_per_connection,
        )
        self.single_connection = SingleConnection(self, reservations)  # graphql-sse's PUT, DELETE, tokens
        self.playground = Playground(api_keys=keys.enabled)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            if self.single_connection.handles(request):
                response = await self.single_connection.respond(request)
            else:
                response = await self.run(request)
        except HTTPException as exc:
            # Strawberry answers these in text/plain; a GraphQL client reads JSON errors.
            response = self.request_error_response(request, exc)
        await response(scope, receive, send)

    def request_error_response(self, request: Request, exc: HTTPException) -> Response:
        code, headers = (exc.code, exc.headers) if isinstance(exc, RequestError) else ("BAD_REQUEST", {})
        if exc.status_code == 405 and not headers:
            headers = {"allow": "GET, POST, PUT, DELETE"}
        # A request error has no `data` entry: nothing was executed.
        body = {"errors": [{"message": exc.reason, "extensions": {"code": code}}]}
        media_type = preferred_media_type(request.headers.get("accept", ""))
        return Response(self.encode_json(body), exc.status_code, headers, media_type=content_type_of(media_type))

    async def render_graphql_ide(self, request: Request) -> Response:
        return self.playground.response(request)

    def encode_json(self, data: object) -> str:
        # str, not bytes: Strawberry sends bytes as binary websocket frames, which the
        # GraphQL websocket protocols don't allow.
        return orjson.dumps(data).decode()

    def decode_json(self, data: str | bytes) -> object:
        return orjson.loads(data)

    async def get_sub_response(self, request: Request | WebSocket) -> Response:
        sub_response = await super().get_sub_response(request)
        # Remembered here for create_response, which only sees the sub-response.
        sub_response.media_type = preferred_media_type(request.headers.get("accept", ""))
        return sub_response

    async def parse_http_body(self, request: AsyncHTTPRequestAdapter) -> GraphQLRequestData | list[GraphQLRequestData]:
        # Strawberry takes any JSON value for a request object and fails on it with a 500.
        is_json_post = request.method == "POST" and JSON in (request.content_type or "")
        if is_json_post and not _OBJECT_OR_ARRAY.match(await request.get_body()):
            raise RequestError(400, "the request body must be a JSON object: {query, variables, operationName}")
        return await super().parse_http_body(request)

    async def _resolve_document(self, request: Request, request_data: GraphQLRequestData) -> None:
        """The document the request names (documents.py), or a request error."""
        if request_data.query is not None and request_data.extensions is None and not self.documents.only:
            return  # a document sent in full, as most requests are: nothing to look up
        raw: Any = {}
        if not request_data.query:  # then an id may be at the top level
            raw = request.query_params if request.method == "GET" else orjson.loads(await request.body())
        try:
            request_data.query = await self.documents.resolve(
                request.app.state.redis,
                request_data.query,
                named(raw, request_data.extensions),
                own_page=self.documents.allow_own_pages and own_page(request),
            )
        except DocumentRefused as refused:
            raise RequestError(refused.status, refused.message, code=refused.code) from None

    def should_render_graphql_ide(self, request: BaseRequestProtocol) -> bool:
        # A GET naming a persisted document has no `query` either: it is no page request.
        params = request.query_params
        named_one = "extensions" in params or any(name in params for name in ID_FIELDS)
        return not named_one and super().should_render_graphql_ide(request)

    async def execute_operation(  # noqa: PLR0917 (Strawberry's signature)
        self,
        request: Request,
        request_adapter: AsyncHTTPRequestAdapter,
        request_data: GraphQLRequestData | list[GraphQLRequestData],
        context: Context,
        root_value: None,
        sub_response: Response,
    ) -> Any:
        if not isinstance(request_data, list):  # (batches are off)
            await self._resolve_document(request, request_data)
            self._check_operation(request_data, request.headers.get("accept", ""), request.method)
        result = await super().execute_operation(
            request, request_adapter, request_data, context, root_value, sub_response
        )
        if isinstance(result, AsyncGenerator):
            # A stream's source, closed with its response (ClosingStreamingResponse).
            request.state.stream_source = result
        return result

    def _check_operation(self, request_data: GraphQLRequestData, accept: str, method: str = "POST") -> None:
        """What Strawberry would not refuse before running it (or, for streams, before the
        200 and the first event are sent), and whether to stream the answer at all."""
        query, name = request_data.query, request_data.operation_name
        if not isinstance(query, str) or not isinstance(name, str | None):
            return  # Strawberry answers a malformed request itself (a 400)
        kinds = self.operation_kinds(query)
        if name is None and len(kinds) > 1:
            # Strawberry would run the first of several operations; the spec asks for an error.
            raise RequestError(400, AMBIGUOUS, code="OPERATION_RESOLUTION_FAILURE")
        kind = dict(kinds).get(name) if name is not None else (kinds[0][1] if kinds else None)
        streamed = self._get_stream_transport(request_data.protocol) is not None
        if streamed and kind != "subscription" and accepts_json(accept):
            # Strawberry streams whatever comes with a stream in its Accept: a query or a
            # mutation from a client that takes JSON too (urql's) gets JSON, as it prefers.
            request_data.protocol = "http"
        elif streamed and kind == "mutation" and method == "GET":
            # As over plain HTTP (the spec's 405); Strawberry's stream sent an internal error.
            raise RequestError(405, "mutations are not allowed when using GET", headers={"allow": "POST"})
        elif not streamed and kind == "subscription":
            # Strawberry would run it as a query: a 200 with an internal error for its field.
            raise RequestError(400, SUBSCRIPTION_NEEDS_A_STREAM)

    async def execute_single(  # noqa: PLR0917 (Strawberry's signature)
        self,
        request: Request,
        request_adapter: AsyncHTTPRequestAdapter,
        sub_response: Response,
        context: Context,
        root_value: None,
        request_data: GraphQLRequestData,
    ) -> ExecutionResult:
        try:
            return await super().execute_single(
                request, request_adapter, sub_response, context, root_value, request_data
            )
        except HTTPException as exc:
            if isinstance(exc.__cause__, CannotGetOperationTypeError):
                raise RequestError(400, exc.reason, code="OPERATION_RESOLUTION_FAILURE") from exc
            if isinstance(exc.__cause__, InvalidOperationTypeError):
                # The spec: a mutation over GET is 405, and nothing runs.
                raise RequestError(405, exc.reason, headers={"allow": "POST"}) from exc
            raise

    async def process_result(self, request: Request, result: ExecutionResult) -> GraphQLHTTPResponse:
        response_data = await super().process_result(request, result)
        if result.errors and response_data.get("errors"):
            # Every error carries a code a client can act on, not only the ones we raise.
            formatted: list[object] = []
            for error, shown in zip(result.errors, response_data["errors"] or [], strict=True):
                if isinstance(shown, dict) and "code" not in (shown.get("extensions") or {}):
                    shown = {
                        **shown,
                        "extensions": {**(shown.get("extensions") or {}), "code": error_code(error, result)},
                    }
                formatted.append(shown)
            response_data["errors"] = formatted
        return response_data

    async def create_streaming_response(
        self,
        request: Request | WebSocket,
        stream: Callable[[], AsyncIterator[str]],
        sub_response: Response,
        headers: Mapping[str, str],
    ) -> Response:
        content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
        return ClosingStreamingResponse(  # as Strawberry's, but closed when the client goes
            counted(stream, content_type)(),
            status_code=sub_response.status_code or 200,
            headers={**sub_response.headers, **headers},
            source=getattr(request.state, "stream_source", None),
        )

    def create_response(
        self, response_data: GraphQLHTTPResponse | list[GraphQLHTTPResponse], sub_response: Response
    ) -> Response:
        if sub_response.media_type != GRAPHQL_RESPONSE_JSON:
            return super().create_response(response_data, sub_response)
        status = None
        if isinstance(response_data, dict) and is_request_error(response_data):
            # The spec for this media type: no `data` when nothing ran, and a 4xx (5xx if ours).
            codes = {
                e.get("extensions", {}).get("code") for e in response_data.get("errors") or [] if isinstance(e, dict)
            }
            status = 500 if "INTERNAL_SERVER_ERROR" in codes else 400
            response_data = GraphQLHTTPResponse(errors=response_data.get("errors"))
        response = super().create_response(response_data, sub_response)
        response.headers["content-type"] = content_type_of(GRAPHQL_RESPONSE_JSON)
        if status is not None and not sub_response.status_code:
            response.status_code = status
        return response

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
        context = Context(jobs=request.app.state.jobs, tenant=tenant, request_id=rid)
        if isinstance(request, WebSocket) and self.documents.allow_own_pages:
            context.own_page = own_page(request)
        return context

    async def on_ws_connect(self, context: Context) -> UnsetType | dict[str, object] | None:
        if self.keys.enabled and context.tenant is None:
            tenant = self.keys.tenant_from_params(context.connection_params)
            if tenant is None:
                # graphql-transport-ws closes with 4403 Forbidden; legacy graphql-ws sends connection_error.
                raise ConnectionRejectionError({"message": "a valid API key is required"})
            context.tenant = tenant
        return await super().on_ws_connect(context)
