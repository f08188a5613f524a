"""The asyncio clients' connection pool: redis-py's blocking pool, with a quick checkout.

redis-py's `BlockingConnectionPool` hands out every connection under an asyncio.Condition,
with a deadline timer, and records observability events (collected by nothing here) on each
checkout and return. A worker's pool has a connection for every job it runs at once, so a
free one is almost always there: `QuickCheckout` takes it directly while nobody is queued for
one, and returns it directly while nobody waits. Anything else (no free connection, a caller
already queued, a connection to reconnect, Redis's maintenance mode) goes redis-py's own way,
so the bound, the wait's deadline and the order of those queued stay redis-py's
(tests/test_redis_pool.py).

Both quick paths run without suspending, so nothing else runs between their check and their
change: a caller that queues counts itself before it first suspends, and from then on every
return goes through the condition and wakes it.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool
from redis.asyncio.connection import AbstractConnection


class QuickCheckout(BlockingConnectionPool):
    """The pool itself, or a base after Sentinel's pool class (gql_service.redis_conn), which
    overrides neither of these two methods."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queued = 0  # callers gone redis-py's way (waiting for a connection, or about to)

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        if self._available_connections and not self._queued and not self._in_maintenance:
            connection: AbstractConnection = self._available_connections.pop()
            self._in_use_connections.add(connection)
            try:
                await self.ensure_connection(connection)  # as redis-py: connected, nothing unread
            except BaseException:
                await self.release(connection)
                raise
            return connection
        self._queued += 1
        try:
            return await super().get_connection()  # type: ignore[no-any-return]
        finally:
            self._queued -= 1

    async def release(self, connection: AbstractConnection) -> None:
        if self._queued or self._in_maintenance or connection.should_reconnect():
            await super().release(connection)  # under the condition, waking who waits
            return
        self._in_use_connections.remove(connection)
        self._available_connections.append(connection)
