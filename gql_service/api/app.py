"""The ASGI application: Starlette routes, Strawberry's GraphQL view, shared clients.

Only wiring lives here: the clients are opened in the lifespan and handed to JobService.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError
from rq import Queue
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from gql_service import budgets, keys, logs, metrics, tracing
from gql_service import history as history_db
from gql_service.api.auth import PUBLIC_TENANT, ApiKeys, RequireApiKey
from gql_service.api.http_spans import TraceRequests
from gql_service.api.jobs import JobService
from gql_service.api.limits import LimitBodySize
from gql_service.api.view import GraphQLView
from gql_service.broadcast import Broadcast
from gql_service.models import utcnow
from gql_service.redis_conn import async_client, sync_client
from gql_service.settings import Settings, load_settings

log = logging.getLogger(__name__)

# Visible in CLIENT LIST, so operators (and the benchmarks) can count the API's connections.
API_CLIENT_NAME = "gql-service-api"

CONSOLE = Path(__file__).with_name("static") / "console.html"


async def console(request: Request) -> Response:
    # One self-contained page: no CDN, no build step.
    return FileResponse(CONSOLE, media_type="text/html")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def metrics_endpoint(request: Request) -> Response:
    jobs: JobService = request.app.state.jobs
    body = await metrics.render(
        request.app.state.redis,
        queue_keys={p.value: q.key for p, q in jobs.queues.items()},
        webhook_queue_key=Queue.redis_queue_namespace_prefix + keys.webhook_queue(jobs.settings.rq_queue),
        subscribers=request.app.state.broadcast.subscriber_count,
        timeout_s=jobs.settings.redis_timeout_s,
        outbox_max_len=jobs.settings.outbox_max_len,
        budget_limits=budgets.every_limit(jobs.settings.tenant_budgets, _tenants(jobs.settings), utcnow()),
    )
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _tenants(settings: Settings) -> set[str]:
    return set(settings.api_keys.values()) if settings.api_keys else {PUBLIC_TENANT}


async def readyz(request: Request) -> Response:
    jobs: JobService = request.app.state.jobs
    broadcast: Broadcast = request.app.state.broadcast
    # Shielded: when the ping is cut off, redis-py closes its connection, and against a hung
    # Redis that close waits too (measured: readyz took 6 s for a 2 s timeout). The answer
    # can't wait for that; the cleanup finishes in the background.
    ping = asyncio.ensure_future(request.app.state.redis.ping())
    try:
        await asyncio.wait_for(asyncio.shield(ping), jobs.settings.redis_timeout_s)
    except Exception as exc:  # any failure to answer in time means "not ready"
        ping.add_done_callback(lambda task: task.cancelled() or task.exception())  # retrieved, not logged
        ping.cancel()
        return JSONResponse({"status": "unavailable", "redis": type(exc).__name__}, status_code=503)
    if not broadcast.connected:
        # Commands work but subscriptions would not: not ready either.
        return JSONResponse({"status": "unavailable", "redis": "ok", "pubsub": False}, status_code=503)
    body: dict[str, object] = {"status": "ready", "pubsub": True}
    if jobs.history is not None:
        # A history that lags (PostgreSQL down, no worker draining) is said, not a reason to
        # turn traffic away: jobs still run and end, and are archived once it is back.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(jobs.settings.redis_timeout_s):
                lag_s = await metrics.outbox_age(request.app.state.redis)
            # Past twice the time a live worker takes over a dead one's batch, nobody drains.
            body["archive"] = "lagging" if lag_s > 2 * jobs.settings.archive_claim_after_s else "ok"
    return JSONResponse(body)


def create_app(settings: Settings) -> Starlette:
    target = settings.redis_target
    keys = ApiKeys(settings.api_keys)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not keys.enabled:
            log.warning("API_KEYS is not set: the API is open to anyone who can reach it (single tenant)")
        redis = async_client(
            target, timeout_s=settings.redis_timeout_s, name=API_CLIENT_NAME,
            max_connections=settings.redis_max_connections,
        )  # fmt: skip
        # Pub/sub holds its connection for good: a pool of its own keeps it out of the way.
        pubsub_redis = async_client(target, name=API_CLIENT_NAME, max_connections=1, retries=0)
        # Writes that wait for replicas, on a pool of their own (see JobService).
        acked_redis = None
        if settings.replica_ack is not None:
            acked_redis = async_client(
                target, timeout_s=settings.redis_timeout_s, name=API_CLIENT_NAME,
                max_connections=settings.redis_max_connections,
            )  # fmt: skip
        # RQ's cancel API is synchronous; it is used rarely and gives its connection back.
        sync_redis = sync_client(target, timeout_s=settings.redis_timeout_s, name=API_CLIENT_NAME, max_connections=1)
        broadcast = Broadcast(
            pubsub_redis, timeout_s=settings.redis_timeout_s, health_check_s=settings.pubsub_health_check_s
        )
        await broadcast.start()
        # Start-up objects live as long as the process: freeze them out of the collector's
        # scans, and collect the young generation less often on this allocation-heavy path
        # (measured: about +8 % submitText throughput).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        app.state.redis = redis
        app.state.broadcast = broadcast
        history = None
        if settings.database_url:
            # Opened in the background: the API starts, and submits, while PostgreSQL is down.
            history = history_db.pool(settings.database_url, timeout_s=settings.redis_timeout_s)
            await history.open(wait=False)
        app.state.jobs = JobService(
            redis=redis, sync_redis=sync_redis, broadcast=broadcast, settings=settings, history=history,
            acked_redis=acked_redis,
        )  # fmt: skip
        try:
            yield
        finally:
            if history is not None:
                await history.close()
            await broadcast.stop()
            await redis.aclose()
            if acked_redis is not None:
                await acked_redis.aclose()
            await pubsub_redis.aclose()
            sync_redis.close()
            tracing.shutdown()  # uvicorn's SIGTERM and Ctrl-C end here: what is queued is sent

    view = GraphQLView(keys=keys, settings=settings)
    routes: list[Any] = [
        Route("/", console),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        Route("/graphql", view),
        WebSocketRoute("/graphql", view),
    ]
    middleware = [
        Middleware(LimitBodySize, max_bytes=settings.max_body_bytes),
        Middleware(RequireApiKey, keys=keys),
    ]
    # OTEL_* variables, once per process (uvicorn's `--workers N` start fresh ones).
    if tracing.setup(tracing.API_SERVICE):
        middleware.insert(0, Middleware(TraceRequests))  # outermost: the span covers the rest
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)


def _give_large_buffers_back() -> None:
    """Bodies of up to MAX_BODY_BYTES pass through the API. glibc raises its mmap threshold
    each time such a buffer is freed, so later ones come from the heap, which it rarely
    gives back: measured, 600 requests of 500 KB left the API at 162 MiB and climbing (the
    Python objects alive had grown by 0.3 MiB). A fixed threshold keeps large buffers
    mmapped and returned on free (86 MiB after the same 600)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)


M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


def app_from_env() -> Starlette:
    """uvicorn's factory: the settings from the environment (`gql-service serve`)."""
    settings = load_settings()
    logs.configure(settings.log_format, settings.log_level)  # again: `--workers N` starts fresh processes
    _give_large_buffers_back()
    return create_app(settings)
