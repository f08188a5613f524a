"""The ASGI application: Starlette routes, Strawberry's GraphQL view, shared clients.

Only wiring lives here: the clients are opened in the lifespan and handed to JobService.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import Redis as AsyncRedis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL

from .broadcast import Broadcast
from .jobs import JobService
from .redis_conn import DEFAULT_URL, async_client, sync_client
from .schema import Context, schema
from .settings import Settings, load_settings
from .ws import LegacyWSHandler, TransportWSHandler

log = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 128


def request_id_of(request: Request | WebSocket) -> str:
    given = request.headers.get("x-request-id", "")
    return given[:MAX_REQUEST_ID_CHARS] if given.strip() else uuid.uuid4().hex


class GraphQLView(GraphQL[Context, None]):
    graphql_transport_ws_handler_class = TransportWSHandler
    graphql_ws_handler_class = LegacyWSHandler

    async def get_context(self, request: Request | WebSocket, response: Response | WebSocket) -> Context:
        rid = request_id_of(request)
        if isinstance(response, Response):
            response.headers["x-request-id"] = rid
        return Context(jobs=request.app.state.jobs, request_id=rid)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    redis: AsyncRedis = request.app.state.redis
    try:
        await redis.ping()
    except Exception as exc:  # any failure to answer means "not ready"
        return JSONResponse({"status": "unavailable", "redis": type(exc).__name__}, status_code=503)
    return JSONResponse({"status": "ready", "pubsub": request.app.state.broadcast.connected})


def create_app(settings: Settings, *, redis_url: str) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        redis = async_client(redis_url)
        sync_redis = sync_client(redis_url)
        broadcast = Broadcast(redis)
        await broadcast.start()
        app.state.redis = redis
        app.state.broadcast = broadcast
        app.state.jobs = JobService(redis=redis, sync_redis=sync_redis, broadcast=broadcast, settings=settings)
        try:
            yield
        finally:
            await broadcast.stop()
            await redis.aclose()
            sync_redis.close()

    view = GraphQLView(schema, graphql_ide="graphiql")
    routes: list[Any] = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/graphql", view),
        WebSocketRoute("/graphql", view),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def app_from_env() -> Starlette:
    """uvicorn's factory: settings and REDIS_URL from the environment (`gql-service serve`)."""
    settings = load_settings()
    return create_app(settings, redis_url=settings.redis_url or DEFAULT_URL)
