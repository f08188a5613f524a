"""Redis clients, configured once.

* Short timeouts, so an outage fails fast instead of hanging.
* Two quick retries, so a connection left stale by a Redis restart is replaced silently.
* A blocking pool with a bound: a burst of requests waits for a free connection instead
  of failing ("Too many connections") or opening hundreds of them.
"""

from __future__ import annotations

from typing import Any

from redis import BlockingConnectionPool, Redis
from redis.asyncio import BlockingConnectionPool as AsyncBlockingConnectionPool
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

DEFAULT_URL = "redis://127.0.0.1:6379/0"
CONNECT_TIMEOUT_S = 2.0
RETRIES = 2


def _pool_options(timeout_s: float | None, name: str | None, max_connections: int) -> dict[str, Any]:
    return {
        "max_connections": max_connections,
        "timeout": timeout_s,  # how long a request waits for a free connection
        "socket_connect_timeout": min(CONNECT_TIMEOUT_S, timeout_s or CONNECT_TIMEOUT_S),
        "socket_timeout": timeout_s,
        "socket_keepalive": True,  # the kernel notices a peer that vanished without a FIN
        "health_check_interval": 30,
        "client_name": name,
    }


def _backoff() -> ExponentialBackoff:
    return ExponentialBackoff(cap=0.2, base=0.02)


def async_client(
    url: str,
    *,
    timeout_s: float | None = None,
    name: str | None = None,
    max_connections: int = 32,
    retries: int = RETRIES,
) -> AsyncRedis:
    """`retries=0` for pub/sub: its owner must see every drop to resync (gql_service.broadcast)."""
    options = _pool_options(timeout_s, name, max_connections)
    pool = AsyncBlockingConnectionPool.from_url(url, retry=AsyncRetry(_backoff(), retries), **options)
    return AsyncRedis.from_pool(pool)


def sync_client(
    url: str, *, timeout_s: float | None = None, name: str | None = None, max_connections: int = 32
) -> Redis:
    options = _pool_options(timeout_s, name, max_connections)
    pool = BlockingConnectionPool.from_url(url, retry=Retry(_backoff(), RETRIES), **options)
    return Redis(connection_pool=pool)
