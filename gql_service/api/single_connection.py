"""graphql-sse's single connection mode over HTTP (its PROTOCOL.md): one event stream per
client carries every operation's results.

* `PUT /graphql` reserves a stream: 201 and a token (text/plain).
* `GET /graphql` with the token and `Accept: text/event-stream` opens it.
* `POST /graphql` with the token runs the operation named in the body, whose
  `extensions.operationId` tags its results: 202, then `next` events
  (`{"id", "payload"}`) and a `complete` (`{"id"}`) on the stream.
* `DELETE /graphql?operationId=...` with the token stops one operation.

The token travels in `X-GraphQL-Event-Stream-Token` (or the `token` query parameter),
always beside the API key: a token belongs to the tenant that reserved it, and to any other
it does not exist. Operations run as they do on every other transport (the same parsing,
checks and resolvers: the job's snapshot first, the tenant's watch bound), and a request
problem is answered before the 202, as GraphQL over HTTP has it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

from cross_web import AsyncHTTPRequestAdapter
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from strawberry.http import GraphQLHTTPResponse, GraphQLRequestData
from strawberry.types import ExecutionResult

from gql_service.api.auth import PUBLIC_TENANT
from gql_service.api.errors import RequestError
from gql_service.api.reservations import Reservation, Reservations, Results
from gql_service.api.streams import EventStream

TOKEN_HEADER = "x-graphql-event-stream-token"
HEARTBEAT_S = 15.0


class OperationView(Protocol):
    """What of Strawberry's view (gql_service/api/view.py) runs an operation here, so that
    it is parsed, checked and executed exactly as on the other transports."""

    @property
    def request_adapter_class(self) -> Callable[[Request], AsyncHTTPRequestAdapter]: ...

    async def parse_http_body(
        self, request: AsyncHTTPRequestAdapter, /
    ) -> GraphQLRequestData | list[GraphQLRequestData]: ...

    async def get_sub_response(self, request: Request, /) -> Response: ...

    async def get_context(self, request: Request, response: Response, /) -> Any: ...

    async def execute_operation(  # noqa: PLR0917 (Strawberry's signature)
        self,
        request: Request,
        request_adapter: AsyncHTTPRequestAdapter,
        request_data: GraphQLRequestData | list[GraphQLRequestData],
        context: Any,
        root_value: None,
        sub_response: Response,
        /,
    ) -> Any: ...

    async def process_result(self, request: Request, result: ExecutionResult, /) -> GraphQLHTTPResponse: ...

    def encode_json(self, data: object, /) -> str: ...


def _token(request: Request) -> str | None:
    # Asked of every POST: the query string is parsed only when there is one.
    token = request.headers.get(TOKEN_HEADER)
    if token or not request.scope.get("query_string"):
        return token or None
    return request.query_params.get("token")


class SingleConnection:
    def __init__(self, view: OperationView, reservations: Reservations, *, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.view = view
        self.reservations = reservations
        self.heartbeat_s = heartbeat_s

    @staticmethod
    def handles(request: Request) -> bool:
        """A request of this mode: a reservation, a stop, or anything carrying a token."""
        return request.method in {"PUT", "DELETE"} or _token(request) is not None

    async def respond(self, request: Request) -> Response:
        # RequireApiKey has checked the key already; without keys everyone is "public".
        tenant: str = request.scope.get("state", {}).get("tenant") or PUBLIC_TENANT
        if request.method == "PUT":
            return PlainTextResponse(self.reservations.reserve(tenant).token, status_code=201)
        token = _token(request)
        reservation = self.reservations.find(token, tenant) if token else None
        if reservation is None:
            raise RequestError(404, "no such event stream: reserve one with a PUT first", code="NOT_FOUND")
        if request.method == "GET":
            return self._open(request, reservation)
        if request.method == "POST":
            return await self._run(request, reservation)
        if request.method == "DELETE":
            op_id = request.query_params.get("operationId")
            if not op_id:
                raise RequestError(400, "the operation to stop is named by the operationId query parameter")
            reservation.stop(op_id)
            return Response(status_code=200)
        raise RequestError(405, f"{request.method} is not part of graphql-sse", headers={"allow": "GET, POST"})

    def _open(self, request: Request, reservation: Reservation) -> Response:
        if "text/event-stream" not in request.headers.get("accept", ""):
            raise RequestError(406, "a reserved stream is opened with Accept: text/event-stream; operations go by POST")
        self.reservations.open(reservation)

        async def events() -> AsyncIterator[str]:
            self.reservations.streaming(reservation)
            try:
                # Some browsers report the stream open only once its first bytes arrive.
                yield ":\n\n"
                while True:
                    try:
                        async with asyncio.timeout(self.heartbeat_s):
                            event = await reservation.events.get()
                    except TimeoutError:
                        event = ": ping\n\n"  # keeps proxies from closing an idle stream
                    yield event
            finally:
                # The client went (Starlette cancels the stream at the disconnect): so does
                # every operation on it, and the token.
                self.reservations.close(reservation)

        return StreamingResponse(events(), headers=EventStream.headers)

    async def _run(self, request: Request, reservation: Reservation) -> Response:
        view = self.view
        adapter = view.request_adapter_class(request)
        request_data = await view.parse_http_body(adapter)
        if isinstance(request_data, list):
            raise RequestError(400, "one operation a request")
        op_id = reservation.claim((request_data.extensions or {}).get("operationId"), self.reservations.max_operations)
        try:
            request_data.protocol = "sse"  # a subscription is streamed; a query or mutation answered at once
            sub_response = await view.get_sub_response(request)
            context = await view.get_context(request, sub_response)
            result = await view.execute_operation(request, adapter, request_data, context, None, sub_response)
        except BaseException:
            reservation.release(op_id)
            raise
        results = self._results(request, result)
        if not reservation.start(op_id, results, view.encode_json):
            await results.aclose()
            raise RequestError(404, "the event stream was closed", code="NOT_FOUND")
        return Response(status_code=202)

    async def _results(self, request: Request, result: Any) -> Results:
        """The operation's results as a client reads them (codes on every error)."""
        if isinstance(result, ExecutionResult):  # a query or a mutation, run already
            yield await self._processed(request, result)
            return
        async with contextlib.aclosing(result):
            async for value in result:
                yield await self._processed(request, value)

    async def _processed(self, request: Request, result: ExecutionResult) -> Mapping[str, object]:
        return dict(await self.view.process_result(request, result))
