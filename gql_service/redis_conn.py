"""Redis clients, configured once.

* Short timeouts, so an outage fails fast instead of hanging.
* Two quick retries, so a connection left stale by a Redis restart is replaced silently.
* A blocking pool with a bound: a burst of requests waits for a free connection instead
  of failing ("Too many connections") or opening hundreds of them.
"""

from __future__ import annotations

from redis import BlockingConnectionPool, Redis
from redis.asyncio import BlockingConnectionPool as AsyncBlockingConnectionPool
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

DEFAULT_URL = "redis://127.0.0.1:6379/0"
CONNECT_TIMEOUT_S = 2.0
RETRIES = 2


def _backoff() -> ExponentialBackoff:
    return ExponentialBackoff(cap=0.2, base=0.02)


def async_client(
    url: str, *, timeout_s: float | None = None, name: str | None = None, max_connections: int = 32
) -> AsyncRedis:
    # Pub/sub reads block regardless of socket_timeout (redis-py passes its own "no timeout").
    pool = AsyncBlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=timeout_s,
        health_check_interval=30,
        retry=AsyncRetry(_backoff(), RETRIES),
        client_name=name,
    )
    return AsyncRedis.from_pool(pool)


def sync_client(
    url: str, *, timeout_s: float | None = None, name: str | None = None, max_connections: int = 32
) -> Redis:
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=timeout_s,
        health_check_interval=30,
        retry=Retry(_backoff(), RETRIES),
        client_name=name,
    )
    return Redis(connection_pool=pool)
