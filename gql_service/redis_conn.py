"""Redis clients, configured once: short timeouts so an outage fails fast instead of hanging."""

from __future__ import annotations

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

DEFAULT_URL = "redis://127.0.0.1:6379/0"
CONNECT_TIMEOUT_S = 2.0


def async_client(url: str) -> AsyncRedis:
    return AsyncRedis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S, health_check_interval=30)


def sync_client(url: str) -> Redis:
    return Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S, health_check_interval=30)
