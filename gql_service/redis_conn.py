"""Redis clients, configured once: short timeouts so an outage fails fast instead of hanging,
and two quick retries so a connection left stale by a Redis restart is replaced silently."""

from __future__ import annotations

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

DEFAULT_URL = "redis://127.0.0.1:6379/0"
CONNECT_TIMEOUT_S = 2.0
RETRIES = 2


def _backoff() -> ExponentialBackoff:
    return ExponentialBackoff(cap=0.2, base=0.02)


def async_client(url: str, *, timeout_s: float | None = None) -> AsyncRedis:
    # Pub/sub reads block regardless of socket_timeout (redis-py passes its own "no timeout").
    return AsyncRedis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=timeout_s,
        health_check_interval=30,
        retry=AsyncRetry(_backoff(), RETRIES),
    )


def sync_client(url: str, *, timeout_s: float | None = None) -> Redis:
    return Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=timeout_s,
        health_check_interval=30,
        retry=Retry(_backoff(), RETRIES),
    )
