"""Redis clients, configured once: short timeouts so an outage fails fast instead of hanging."""

from __future__ import annotations

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

DEFAULT_URL = "redis://127.0.0.1:6379/0"
CONNECT_TIMEOUT_S = 2.0


def async_client(url: str, *, timeout_s: float | None = None) -> AsyncRedis:
    # Pub/sub reads block without this timeout (redis-py passes its own "no timeout").
    return AsyncRedis.from_url(
        url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=timeout_s, health_check_interval=30
    )


def sync_client(url: str, *, timeout_s: float | None = None) -> Redis:
    return Redis.from_url(
        url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=timeout_s, health_check_interval=30
    )
