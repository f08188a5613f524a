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
* With fallbacks (LLM_FALLBACKS), each endpoint+model's circuit breaker
  (gql_service.worker.breaker) is checked in the step that checks the pause and takes the
  slot, and counted in the step that gives the slot back.

Every endpoint+model has limits of its own: a fallback's calls count against its own slots,
minute and pause, never the primary's.

Waiting for a slot or for a pause to end is not an attempt: it happens inside the attempt,
before the call, and does not count against `LLM_MAX_ATTEMPTS`. The pause is checked last,
in the same step that takes the slot (`slot`): a call that waited for the minute's budget
or for a slot while a pause began does not go out. With no limit set and no pause in
force, a call costs one Redis round trip (the pause check, with the breaker's beside it).

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
from gql_service.worker import breaker as breakers
from gql_service.worker.breaker import Breaker, BreakerOpen, Outcome

log = logging.getLogger(__name__)

# KEYS[1] the leases, KEYS[2] the pause, KEYS[3] the breaker; ARGV: now (ms), lease expiry
# (ms), limit (0: none), lease id, breaker on (1/0), a trial call's lease (ms). Answers
# {code, value, breaker recorded}: code 1 go (value 1: as the breaker's one trial call), 0 all
# slots taken, -1 paused (value: ms left), 2 breaker open (value: ms left, 0: half-open with
# its trial call out). The pause, the breaker and the slot a call goes out on are one step.
_ACQUIRE_LUA = """
local paused = redis.call('PTTL', KEYS[2])
if paused > 0 then return {-1, paused, 0} end
local trial, recorded = 0, 0
local now = 0
if ARGV[5] == '1' then
  local b = redis.call('HMGET', KEYS[3], 'open_until', 'trial')
  recorded = redis.call('EXISTS', KEYS[3])
  if b[1] then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local left = tonumber(b[1]) - now
    if left > 0 then return {2, left, 1} end
    if b[2] and tonumber(b[2]) > now then return {2, 0, 1} end
    trial = 1
  end
end
local limit = tonumber(ARGV[3])
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
  if redis.call('ZCARD', KEYS[1]) >= limit then return {0, 0, recorded} end
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) - tonumber(ARGV[1]))
end
if trial == 1 then redis.call('HSET', KEYS[3], 'trial', now + tonumber(ARGV[6])) end
return {1, trial, recorded}
"""
# KEYS[1] the leases, KEYS[2] the breaker; ARGV: lease id ('' for none), outcome (ok, fail,
# none), failures that open it, how long it stays open (ms), whether this was the trial call.
# Gives the slot back and counts the call in one step; answers 1 when this call opened it.
_RELEASE_LUA = """
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
if ARGV[2] == 'ok' then
  redis.call('DEL', KEYS[2])
  return 0
end
if ARGV[2] == 'fail' then
  local failures = redis.call('HINCRBY', KEYS[2], 'failures', 1)
  redis.call('PEXPIRE', KEYS[2], 86400000)
  if ARGV[5] == '1' or failures >= tonumber(ARGV[3]) then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    redis.call('HSET', KEYS[2], 'open_until', now + tonumber(ARGV[4]), 'failures', 0)
    redis.call('HDEL', KEYS[2], 'trial')
    redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]) + 86400000)
    return 1
  end
  return 0
end
if ARGV[5] == '1' then redis.call('HDEL', KEYS[2], 'trial') end
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
    breaker: Breaker | None = None  # on when there are fallbacks (LLM_FALLBACKS)

    def skip_if_open(self) -> None:
        """Raise BreakerOpen if this process already knows the breaker is open: no round trip,
        and none of the minute's budget taken for a call that will not go out."""
        if self.breaker is not None and breakers.known_open(self.endpoint):
            raise BreakerOpen(self.endpoint)

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
        """Clearance for one call, the last step before it goes out: no pause in force, the
        breaker not open, and one of the cluster's LLM_MAX_IN_FLIGHT slots held for the
        duration. Gives the seconds spent waiting; raises BreakerOpen to skip the endpoint. A
        call that waited for a slot or the minute's budget while a 429 paused the provider
        looks again here, so none goes out during a pause. Leaving it counts the call's
        outcome for the breaker (an LLMError raised inside says how it went)."""
        if self.max_in_flight is None and self.breaker is None:
            yield await self.wait_out_pause()
            return
        key, paused = keys.llm_in_flight(self.endpoint), keys.llm_paused(self.endpoint)
        breaker_key = keys.llm_breaker(self.endpoint)
        lease = uuid.uuid4().hex if self.max_in_flight is not None else ""
        acquire = self.redis.register_script(_ACQUIRE_LUA)
        lease_ms = int((self.call_timeout_s + 30) * 1000)
        started = time.monotonic()
        while True:
            now_ms = int(time.time() * 1000)
            args: list[int | str] = [
                now_ms, now_ms + lease_ms, self.max_in_flight or 0, lease, int(self.breaker is not None), lease_ms
            ]  # fmt: skip
            code, value, recorded = await acquire(keys=[key, paused, breaker_key], args=args)
            if code == 1:
                break
            if code == 2:
                if value > 0:
                    breakers.note_open(self.endpoint, value)
                raise BreakerOpen(self.endpoint)
            # Polling, not a blocking pop: a lease must expire on its own when its holder is
            # killed, which a token list would not do.
            await asyncio.sleep(value / 1000 if code == -1 else POLL_S)
        outcome = Outcome.NEITHER
        try:
            yield time.monotonic() - started
            outcome = Outcome.ANSWERED
        except BaseException as exc:
            outcome = breakers.outcome_of(exc)
            raise
        finally:
            await self._release(lease, outcome, trial=value == 1, recorded=bool(recorded))

    async def _release(self, lease: str, outcome: Outcome, *, trial: bool, recorded: bool) -> None:
        """Give the slot back and count the call for the breaker, in one step; nothing at all
        for an answer from an endpoint with no failures on record and no slot to give back."""
        breaker = self.breaker
        if breaker is None:
            outcome = Outcome.NEITHER
        elif outcome is Outcome.ANSWERED and not recorded:
            outcome = Outcome.NEITHER  # nothing to reset
        if not lease and outcome is Outcome.NEITHER and not trial:
            return
        failures, open_ms = (breaker.failures, int(breaker.open_s * 1000)) if breaker else (0, 0)
        release = self.redis.register_script(_RELEASE_LUA)
        keys_ = [keys.llm_in_flight(self.endpoint), keys.llm_breaker(self.endpoint)]
        if await release(keys=keys_, args=[lease, outcome.value, failures, open_ms, int(trial)]) and breaker:
            breakers.opened(self.endpoint, breaker)
