"""Redis clients, configured once: one server (REDIS_URL) or the primary that Sentinel names.

* Short timeouts, so an outage fails fast instead of hanging: the socket's own for the
  synchronous clients; for the asyncio ones, the caller's deadline (asyncio.timeout) alone.
* Two quick retries, so a connection left stale by a Redis restart is replaced silently.
* A blocking pool with a bound: a burst of requests waits for a free connection instead
  of failing ("Too many connections") or opening hundreds of them (asyncio: with a quick
  checkout while a connection is free, gql_service.redis_pool).
* With Sentinel (REDIS_SENTINELS), every new connection asks the sentinels where the
  primary is, so a client follows a failover without a restart. A primary demoted to a
  replica answers writes with READONLY, inside a Lua script too: that counts as a dropped
  connection (the next one finds the new primary), never as the command's own error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis import BlockingConnectionPool, Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline as AsyncPipeline
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelConnectionPool
from redis.asyncio.sentinel import SentinelManagedConnection as AsyncSentinelManagedConnection
from redis.backoff import EqualJitterBackoff, ExponentialBackoff
from redis.connection import parse_url
from redis.exceptions import ConnectionError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection

from gql_service.redis_packing import HiredisPacking, url_options
from gql_service.redis_pool import QuickCheckout
from gql_service.settings import RedisTarget, ReplicaAck

CONNECT_TIMEOUT_S = 2.0
RETRIES = 2
# A sentinel that does not answer this fast is skipped for the next one.
SENTINEL_TIMEOUT_S = 0.5


Where = RedisTarget | str


def _target(where: Where) -> RedisTarget:
    return RedisTarget(url=where) if isinstance(where, str) else where


def _pool_options(
    timeout_s: float | None, name: str | None, max_connections: int, *, socket_timeout: bool = True
) -> dict[str, Any]:
    return {
        "max_connections": max_connections,
        "timeout": timeout_s,  # how long a request waits for a free connection
        "socket_connect_timeout": min(CONNECT_TIMEOUT_S, timeout_s or CONNECT_TIMEOUT_S),
        "socket_timeout": timeout_s if socket_timeout else None,
        "socket_keepalive": True,  # the kernel notices a peer that vanished without a FIN
        "health_check_interval": 30,
        "client_name": name,
    }


def _backoff() -> ExponentialBackoff:
    return ExponentialBackoff(cap=0.2, base=0.02)


def _demoted(exc: ResponseError) -> bool:
    """A write refused by a primary that became a replica (a script's error wraps it)."""
    return str(exc).startswith("READONLY") or "-READONLY" in str(exc)


class _FollowingConnection(SentinelManagedConnection):
    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if not _demoted(exc):
                raise
            self.disconnect()
            raise ConnectionError("the Redis primary became a replica (a failover)") from None


class _AsyncFollowingConnection(HiredisPacking, AsyncSentinelManagedConnection):
    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if not _demoted(exc):
                raise
            await self.disconnect()
            raise ConnectionError("the Redis primary became a replica (a failover)") from None


# Sentinel's pools, bounded and blocking like the plain ones.
class _SentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    pass


class _AsyncSentinelPool(AsyncSentinelConnectionPool, QuickCheckout):
    pass


def _sentinel_options(target: RedisTarget) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the sentinels' connection options, the primary's credentials and database)."""
    to_sentinels: dict[str, Any] = {
        "socket_timeout": SENTINEL_TIMEOUT_S,
        "socket_connect_timeout": SENTINEL_TIMEOUT_S,
    }
    if target.sentinel_password:
        to_sentinels["password"] = target.sentinel_password
    parts = parse_url(target.url)
    to_primary = {k: parts[k] for k in ("username", "password", "db") if parts.get(k) is not None}
    return to_sentinels, to_primary


def async_client(
    where: Where,
    *,
    timeout_s: float | None = None,
    name: str | None = None,
    max_connections: int = 32,
    retries: int = RETRIES,
) -> AsyncRedis:
    """`retries=0` for pub/sub: its owner must see every drop to resync (gql_service.broadcast).

    No socket timeout: every caller bounds its Redis work with asyncio.timeout
    (jobs.redis_call), and with one redis-py wraps each write in asyncio.wait_for, which on
    Python 3.11 can swallow that deadline's cancellation when the write completes in the
    same instant. The request then went on through redis-py's retries and answered after
    16 s instead of 1.5 (about one outage in ten, under load: see
    tests/test_live_path_faults.py's hung-Redis test)."""
    target = _target(where)
    options = _pool_options(timeout_s, name, max_connections, socket_timeout=False)
    retry = AsyncRetry(_backoff(), retries)
    if not target.sentinels:
        pool = QuickCheckout(retry=retry, **url_options(target.url), **options)
        return AsyncRedis.from_pool(pool)
    to_sentinels, to_primary = _sentinel_options(target)
    sentinel = AsyncSentinel(list(target.sentinels), sentinel_kwargs=to_sentinels)
    redis: AsyncRedis = sentinel.master_for(
        target.master,
        redis_class=AsyncRedis,
        connection_pool_class=_AsyncSentinelPool,
        connection_class=_AsyncFollowingConnection,
        retry=retry,
        **to_primary,
        **options,
    )
    return redis


def sync_client(
    where: Where, *, timeout_s: float | None = None, name: str | None = None, max_connections: int = 32
) -> Redis:
    target = _target(where)
    options = _pool_options(timeout_s, name, max_connections)
    retry = Retry(_backoff(), RETRIES)
    if not target.sentinels:
        pool = BlockingConnectionPool.from_url(target.url, retry=retry, **options)
        return Redis(connection_pool=pool)
    to_sentinels, to_primary = _sentinel_options(target)
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=to_sentinels)
    redis: Redis = sentinel.master_for(
        target.master,
        redis_class=Redis,
        connection_pool_class=_SentinelPool,
        connection_class=_FollowingConnection,
        retry=retry,
        **to_primary,
        **options,
    )
    return redis


# -- waiting out an outage -----------------------------------------------------------------
T = TypeVar("T")
# What "Redis is away" looks like from a caller: redis-py's errors (the synchronous client
# wraps the socket's in them), and on asyncio also the socket's and deadlines' own.
OUTAGE_ERRORS: tuple[type[RedisError], ...] = (ConnectionError, RedisTimeoutError)
ASYNC_OUTAGE_ERRORS: tuple[type[Exception], ...] = (*OUTAGE_ERRORS, TimeoutError, OSError)


class Outage:
    """The one policy for work that waits for Redis to come back: redis-py's `Retry` with
    jittered exponential backoff, bounded by a deadline (`give_up_after_s`; None: never) or
    by `give_up_when()` turning true (a stop request), one warning when the wait starts (or
    one per attempt, `every_attempt`).

    A long-lived listener runs its whole session (connect, then listen until the link is
    lost) as the retried call, with `errors=(Exception,)` and its own `on_failure` (the
    log line, and what the listener undoes when its link goes): a session that ends too
    soon, again and again, is spaced out by the same backoff as a refused connection."""

    def __init__(
        self,
        what: str,
        log: logging.Logger,
        *,
        give_up_after_s: float | None = None,
        give_up_when: Callable[[], bool] | None = None,
        base_s: float = 0.05,
        cap_s: float = 2.0,
        every_attempt: bool = False,
        errors: tuple[type[Exception], ...] | None = None,
        on_failure: Callable[[Exception, int], None] | None = None,
    ) -> None:
        self.what, self.log, self.every_attempt = what, log, every_attempt
        self.give_up_after_s, self.give_up_when = give_up_after_s, give_up_when
        self.errors, self.on_failure = errors, on_failure
        self._backoff = (base_s, cap_s)

    def _failed(self, started: float) -> Callable[[Exception, int], None]:
        def failed(error: Exception, attempt: int) -> None:
            if self.give_up_after_s is not None and time.monotonic() - started >= self.give_up_after_s:
                raise error
            if self.give_up_when is not None and self.give_up_when():
                raise error
            if self.on_failure is not None:
                self.on_failure(error, attempt)
            elif attempt == 1 or self.every_attempt:
                self.log.warning("%s: Redis is unreachable (%s); attempt %d, waiting for it", self.what, error, attempt)

        return failed

    async def call(self, do: Callable[[], Awaitable[T]]) -> T:
        backoff = EqualJitterBackoff(cap=self._backoff[1], base=self._backoff[0])
        # Typed for redis-py's errors only, though its own default holds the builtin TimeoutError.
        retry = AsyncRetry(backoff, -1, self.errors or ASYNC_OUTAGE_ERRORS)  # type: ignore[arg-type]
        failed = self._failed(time.monotonic())

        async def fail(error: Exception, attempt: int) -> None:
            failed(error, attempt)

        return await retry.call_with_retry(do, fail, with_failure_count=True)

    def call_sync(self, do: Callable[[], T]) -> T:
        backoff = EqualJitterBackoff(cap=self._backoff[1], base=self._backoff[0])
        retry = Retry(backoff, -1, self.errors or OUTAGE_ERRORS)
        return retry.call_with_retry(do, self._failed(time.monotonic()), with_failure_count=True)


# -- writes that wait for replicas -------------------------------------------------------
class NotReplicated(RedisError):
    """The primary has the write, but fewer replicas than asked confirmed it in time: a
    failover now could lose it."""


class _Waiting(AsyncPipeline):
    """A pipeline (or MULTI/EXEC) followed by WAIT on the very same connection: Redis counts
    the replicas that have that connection's writes, so it can't be asked on another one.

    Whatever goes wrong with the WAIT itself (the connection drops, a demoted primary
    answers UNBLOCKED) leaves the write unconfirmed, never repeated: redis-py retries a
    pipeline that failed on a connection error, and this one's writes are already applied.
    """

    def __init__(
        self, redis: AsyncRedis, ack: ReplicaAck, *, transaction: bool, wait_if: Callable[[Any], bool] | None
    ) -> None:
        super().__init__(redis.connection_pool, redis.response_callbacks, transaction, None)
        self.ack = ack
        self.wait_if = wait_if  # whether the results wrote anything to wait for
        self.acked: int | None = None  # replicas that confirmed, once executed
        self.failure: str | None = None

    async def _wait(self, connection: Any, result: Any) -> None:
        if self.wait_if is not None and not self.wait_if(result):
            self.acked = self.ack.replicas
            return
        try:
            await connection.send_command("WAIT", self.ack.replicas, self.ack.timeout_ms)
            self.acked = int(await connection.read_response())
        except (RedisError, OSError) as exc:
            await connection.disconnect()
            self.acked, self.failure = 0, f"{type(exc).__name__}: {exc}"

    async def _execute_transaction(self, connection: Any, commands: Any, raise_on_error: Any) -> Any:
        result = await super()._execute_transaction(connection, commands, raise_on_error)
        await self._wait(connection, result)
        return result

    async def _execute_pipeline(self, connection: Any, commands: Any, raise_on_error: bool) -> Any:
        result = await super()._execute_pipeline(connection, commands, raise_on_error)
        await self._wait(connection, result)
        return result

    def check(self) -> None:
        """Raise NotReplicated unless enough replicas confirmed."""
        if self.failure is not None:
            raise NotReplicated(f"no replica confirmed it: the wait failed ({self.failure})")
        if self.acked is None or self.acked < self.ack.replicas:
            confirmed, wanted = self.acked or 0, self.ack.replicas
            raise NotReplicated(f"{confirmed} of {wanted} replica(s) confirmed it within {self.ack.timeout_ms} ms")


def pipeline(
    redis: AsyncRedis,
    ack: ReplicaAck | None,
    *,
    transaction: bool = True,
    wait_if: Callable[[Any], bool] | None = None,
) -> AsyncPipeline:
    """`redis.pipeline()`, or with `ack` one whose `check()` says whether replicas have it
    (`wait_if(results)`: whether there is a write to wait for)."""
    if ack is None:
        return redis.pipeline(transaction=transaction)
    return _Waiting(redis, ack, transaction=transaction, wait_if=wait_if)


def check_replicated(pipe: AsyncPipeline) -> None:
    if isinstance(pipe, _Waiting):
        pipe.check()


# -- writes applied once, whatever the network does ---------------------------------------
# redis-py sends a MULTI/EXEC (or a script) again when its connection drops before the reply:
# if Redis had run it, it runs twice (a job queued twice, a batch counted twice). Guarded, the
# commands run only while `guard` (a key they create, named by a token made once per logical
# write and the same on every retry) does not exist yet: a repeat is a no-op.
#
# `within` (KEYS[2..], their limits first in ARGV): counters the commands may run only while
# each is below its limit (tenant budgets, gql_service.budgets); -i says the i-th is not, and
# nothing ran. Checked in the same script, so a submission costs no round trip more.
_ONCE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 2, #KEYS do
  if tonumber(redis.call('GET', KEYS[i]) or '0') >= tonumber(ARGV[i - 1]) then return 1 - i end
end
local at = #KEYS
while at <= #ARGV do
  local n = tonumber(ARGV[at])
  redis.call(unpack(ARGV, at + 1, at + n))
  at = at + n + 1
end
return 1
"""


async def run_once(
    redis: AsyncRedis, pipe: AsyncPipeline, guard: str, *, within: Sequence[tuple[str, float]] = ()
) -> list[Any]:
    """Turn the commands queued on `pipe` (which `redis` made) into one script that runs them
    all only if `guard` does not exist, and each counter of `within` (key, limit) is below its
    limit, and run it; one of the commands must create `guard`. The replies: the script's
    first, 1 when the commands ran, 0 when they had run before, -i when the i-th counter of
    `within` stopped them. (Reads redis-py's queued commands: this module is where the
    service relies on redis-py's internals; tests/test_redis_conn.py pins them.)

    When the script is all there is to send (nothing watched, no replicas to wait for), it
    goes on its own: a MULTI/EXEC around one script adds two replies to read and redis-py's
    transaction path (measured: 6 % of a submitText's CPU) and changes nothing, as a script
    runs whole anyway.

    Scripts can't run inside a script: a queued EVAL/EVALSHA (RQ's, promoting the jobs a
    concurrency limit held back) stays a command of its own, after the guarded ones, in the
    pipeline's MULTI, and must be safe to run twice (RQ's promotion is: it moves only jobs
    still waiting)."""
    flat: list[Any] = []
    scripts: list[tuple[Any, Any]] = []
    for args, options in pipe.command_stack:
        if str(args[0]).upper() in ("EVAL", "EVALSHA"):
            scripts.append((args, options))
        else:
            flat += [len(args), *args]
    pipe.command_stack = []
    once = ("EVAL", _ONCE_LUA, 1 + len(within), guard, *(k for k, _ in within), *(repr(n) for _, n in within), *flat)
    if not scripts and not pipe.watching and type(pipe) is AsyncPipeline:
        return [await redis.execute_command(*once)]
    pipe.execute_command(*once)
    for args, options in scripts:
        pipe.execute_command(*args, **options)
    return list(await pipe.execute())
