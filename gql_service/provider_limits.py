"""Limits on LLM calls shared by every worker process on every host, kept in Redis.

* `LLM_MAX_IN_FLIGHT`: at most this many calls open at once, cluster-wide. A call holds a
  lease (a member of a sorted set scored by its expiry), taken and released by Lua so the
  count and the check are one step. A lease outlives a killed process only until it
  expires (the call's timeout plus a margin), so a crash never shrinks the pool for good.
* A 429 with `Retry-After` pauses the provider for every worker until then, instead of
  each worker retrying into the wall on its own schedule.

Waiting for a slot or for a pause to end is not an attempt: it happens inside the attempt,
before the call, and does not count against `LLM_MAX_ATTEMPTS`. With no limit set and no
pause in force, a call costs one Redis round trip (the pause check).

Not here yet: `LLM_RPM` / `LLM_TPM` (requests and tokens per minute).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from redis import Redis

from . import keys

log = logging.getLogger(__name__)

# KEYS[1] the leases; ARGV: now (ms), lease expiry (ms), limit, lease id.
_ACQUIRE_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) - tonumber(ARGV[1]))
  return 1
end
return 0
"""
POLL_S = 0.05  # how often a waiting call looks for a free slot again


@dataclass(frozen=True)
class ProviderLimits:
    redis: Redis
    endpoint: str  # the provider's endpoint and model: limits belong to it
    max_in_flight: int | None
    call_timeout_s: float

    def wait_out_pause(self) -> float:
        """Sleep until no pause is in force; returns the seconds waited."""
        waited = 0.0
        while (left_ms := self.redis.pttl(keys.llm_paused(self.endpoint))) > 0:
            time.sleep(left_ms / 1000)
            waited += left_ms / 1000
        return waited

    def pause(self, seconds: float) -> None:
        """Pause every worker's calls to this provider for `seconds` (never shortening one)."""
        key = keys.llm_paused(self.endpoint)
        ms = max(1, int(seconds * 1000))
        if self.redis.pttl(key) < ms:
            self.redis.set(key, 1, px=ms)
            log.warning("LLM endpoint asked us to wait: every worker pauses its calls for %.1f s", seconds)

    @contextmanager
    def slot(self) -> Iterator[float]:
        """Hold one of the cluster's LLM_MAX_IN_FLIGHT call slots for the duration; gives the
        seconds spent waiting for it."""
        if self.max_in_flight is None:
            yield 0.0
            return
        key = keys.llm_in_flight(self.endpoint)
        lease = uuid.uuid4().hex
        acquire = self.redis.register_script(_ACQUIRE_LUA)
        lease_ms = int((self.call_timeout_s + 30) * 1000)
        started = time.monotonic()
        while True:
            now_ms = int(time.time() * 1000)
            if acquire(keys=[key], args=[now_ms, now_ms + lease_ms, self.max_in_flight, lease]):
                break
            # Polling, not a blocking pop: a lease must expire on its own when its holder is
            # killed, which a token list would not do.
            time.sleep(POLL_S)
        try:
            yield time.monotonic() - started
        finally:
            self.redis.zrem(key, lease)
