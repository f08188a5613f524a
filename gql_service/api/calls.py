"""Bounded calls to Redis and to the PostgreSQL history: an outage is the client's
SERVICE_UNAVAILABLE within a deadline, never a hang and never a stack trace."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import psycopg
from psycopg_pool import PoolTimeout
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gql_service.api.errors import ServiceUnavailable
from gql_service.broadcast import BroadcastUnavailable
from gql_service.redis_conn import NotReplicated

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def redis_call(timeout_s: float) -> AsyncIterator[None]:
    """One bounded piece of Redis work: an outage, a hung server (SIGSTOP) or a pool with no
    free connection is the client's SERVICE_UNAVAILABLE within `timeout_s`, never a hang
    and never a stack trace."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except NotReplicated as exc:
        # Written on the primary, not yet on enough replicas: not acknowledged, since a
        # failover now could lose it. A retry with the same idempotencyKey finds the job.
        log.warning("redis replicas did not confirm a write: %s", exc)
        raise ServiceUnavailable(
            f"the job store did not confirm the write on its replicas in time ({exc}); "
            "try again shortly (with the same idempotencyKey, if you gave one)"
        ) from None
    except (RedisConnectionError, RedisTimeoutError, BroadcastUnavailable, TimeoutError) as exc:
        log.warning("redis unavailable: %s", exc or type(exc).__name__)
        raise ServiceUnavailable("the job store is unavailable; try again shortly") from None


@contextlib.asynccontextmanager
async def history_call(timeout_s: float) -> AsyncIterator[None]:
    """One read of the PostgreSQL history, within `timeout_s`: a history that does not
    answer is the client's SERVICE_UNAVAILABLE (the job may be there), never a wrong
    NOT_FOUND or a page with a gap."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except (psycopg.Error, OSError, TimeoutError, PoolTimeout) as exc:
        log.warning("job history unavailable: %s", exc or type(exc).__name__)
        raise ServiceUnavailable("the job history is unavailable; try again shortly") from None
