"""Limits on LLM calls shared by every worker process on every host, kept in Redis.

* `LLM_MAX_IN_FLIGHT`: at most this many calls open at once, cluster-wide. A call holds a
  lease (a member of a sorted set scored by its expiry), taken and released by Lua so the
  count and the check are one step. A lease outlives a killed process only until it
  expires (the call's timeout plus a margin), so a crash never shrinks the pool for good.
* `LLM_RPM` / `LLM_TPM`: requests and tokens per minute, kept in Redis by the `limits`
  library and shared by every process. Requests use its moving window (exact: one entry per
  request); tokens its sliding window counter (two counters, whatever the budget: a moving
  window would keep one entry per token), which weighs the previous minute as if spread
  evenly, so a burst at a minute's end can be over- or under-counted a little. Requests are also spread
  over the minute (at most RPM/60 a second), because providers enforce a minute's budget
  over shorter periods too, and a burst of a whole minute's calls at once draws 429s. The
  minute window is 61 s: a second of margin, so that network delay and clock skew never
  let the provider count one call more in its own minute than we did in ours. Tokens are
  estimated before the call (prompt characters / 4, plus an allowance for the answer) and
  the excess charged after with the reported usage; the moving window cannot refund, so
  an answer shorter than the allowance costs the difference for that minute.
* A 429 with `Retry-After` pauses the provider for every worker until then, instead of
  each worker retrying into the wall on its own schedule.

Waiting for a slot or for a pause to end is not an attempt: it happens inside the attempt,
before the call, and does not count against `LLM_MAX_ATTEMPTS`. The pause is checked last,
in the same step that takes the slot (`slot`): a call that waited for the minute's budget
or for a slot while a pause began does not go out. With no limit set and no pause in
force, a call costs one Redis round trip (the pause check).

Waiting jobs of one process line up behind one of them (an asyncio lock per limit), so a
process polls Redis once per freed slot, not once per waiting job.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter, RateLimiter, SlidingWindowCounterRateLimiter
from redis.asyncio import Redis

from gql_service import keys

log = logging.getLogger(__name__)

# KEYS[1] the leases, KEYS[2] the pause; ARGV: now (ms), lease expiry (ms), limit, lease id.
# Answers 1 (taken), 0 (all taken) or minus the pause's milliseconds left: the check that
# no pause is in force and the slot a call goes out on are one step.
_ACQUIRE_LUA = """
local paused = redis.call('PTTL', KEYS[2])
if paused > 0 then return -paused end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) - tonumber(ARGV[1]))
  return 1
end
return 0
"""
POLL_S = 0.05  # how often a waiting call looks for a free slot again
WINDOW_S = 61  # the minute of LLM_RPM / LLM_TPM, with a second of margin (see above)

# Per event loop: the limiter over its Redis client, and the line each limit's waiters form.
_limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[int, str], RateLimiter]] = (
    weakref.WeakKeyDictionary()
)
_lines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = weakref.WeakKeyDictionary()


# Sets the pause to ARGV[1] ms unless one at least that long is already in force.
_EXTEND_PAUSE_LUA = """
if redis.call('PTTL', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], 1, 'PX', ARGV[1])
return 1
"""


@dataclass(frozen=True)
class ProviderLimits:
    redis: Redis
    endpoint: str  # the provider's endpoint and model: limits belong to it
    max_in_flight: int | None
    call_timeout_s: float
    rpm: int | None = None
    tpm: int | None = None

    async def take_budget(self, tokens: int) -> float:
        """Wait until this minute's LLM_RPM / LLM_TPM budget has room for one call of about
        `tokens` tokens, and take it; returns the seconds waited."""
        waited = 0.0
        if self.rpm is not None:
            per_second = RateLimitItemPerSecond(math.ceil(self.rpm / 60), 1)
            waited += await self._take("requests", per_second)
            waited += await self._take("requests", RateLimitItemPerSecond(self.rpm, WINDOW_S))
        if self.tpm is not None:
            waited += await self._take("tokens", self._tokens(), min(tokens, self.tpm))
        return waited

    async def charge_tokens(self, estimated: int, used: int) -> None:
        """Charge what a call used beyond its estimate (if the minute still has room)."""
        if self.tpm is not None and used > estimated:
            extra = min(used - estimated, self.tpm)
            await self._limiter("tokens").hit(self._tokens(), self._ident("tokens"), cost=extra)

    def _tokens(self) -> RateLimitItem:
        return RateLimitItemPerSecond(self.tpm or 1, WINDOW_S)

    def _ident(self, kind: str) -> str:
        return keys.llm_budget(self.endpoint, kind)

    def _limiter(self, kind: str) -> RateLimiter:
        per_loop = _limiters.setdefault(asyncio.get_running_loop(), {})
        key = (id(self.redis.connection_pool), kind)
        if key not in per_loop:
            storage = RedisStorage(
                "async+redis://",
                implementation="redispy",
                connection_pool=self.redis.connection_pool,  # type: ignore[arg-type]
                key_prefix="",
            )
            strategy = MovingWindowRateLimiter if kind == "requests" else SlidingWindowCounterRateLimiter
            per_loop[key] = strategy(storage)
        return per_loop[key]

    async def _take(self, kind: str, item: RateLimitItem, cost: int = 1) -> float:
        limiter, ident = self._limiter(kind), self._ident(kind)
        started = time.monotonic()
        line = _lines.setdefault(asyncio.get_running_loop(), {}).setdefault(f"{ident}:{item}", asyncio.Lock())
        async with line:
            while not await limiter.hit(item, ident, cost=cost):
                stats = await limiter.get_window_stats(item, ident)
                # Jitter: the first in line in each process don't all ask at the same instant.
                await asyncio.sleep(max(stats.reset_time - time.time(), POLL_S) + random.uniform(0, POLL_S))
        return time.monotonic() - started

    async def wait_out_pause(self) -> float:
        """Sleep until no pause is in force; returns the seconds waited."""
        waited = 0.0
        while (left_ms := await self.redis.pttl(keys.llm_paused(self.endpoint))) > 0:
            await asyncio.sleep(left_ms / 1000)
            waited += left_ms / 1000
        return waited

    async def pause(self, seconds: float) -> None:
        """Pause every worker's calls to this provider for `seconds` (never shortening one)."""
        ms = max(1, int(seconds * 1000))
        # Compare and extend in one step: two workers' 429s at once must not let the
        # shorter pause overwrite the longer one.
        if await self.redis.eval(_EXTEND_PAUSE_LUA, 1, keys.llm_paused(self.endpoint), ms):
            log.warning("LLM endpoint asked us to wait: every worker pauses its calls for %.1f s", seconds)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Clearance for one call, the last step before it goes out: no pause in force, and
        one of the cluster's LLM_MAX_IN_FLIGHT slots held for the duration. Gives the seconds
        spent waiting. A call that waited for a slot or the minute's budget while a 429 paused
        the provider looks again here, so none goes out during a pause."""
        if self.max_in_flight is None:
            yield await self.wait_out_pause()
            return
        key, paused = keys.llm_in_flight(self.endpoint), keys.llm_paused(self.endpoint)
        lease = uuid.uuid4().hex
        acquire = self.redis.register_script(_ACQUIRE_LUA)
        lease_ms = int((self.call_timeout_s + 30) * 1000)
        started = time.monotonic()
        while True:
            now_ms = int(time.time() * 1000)
            got = await acquire(keys=[key, paused], args=[now_ms, now_ms + lease_ms, self.max_in_flight, lease])
            if got == 1:
                break
            # Polling, not a blocking pop: a lease must expire on its own when its holder is
            # killed, which a token list would not do.
            await asyncio.sleep(-got / 1000 if got < 0 else POLL_S)
        try:
            yield time.monotonic() - started
        finally:
            await self.redis.zrem(key, lease)
