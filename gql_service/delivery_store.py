"""A job's webhook delivery state, kept in field `w` of its record's hash (gql_service.store):
it lives and expires with its job."""

from __future__ import annotations

from collections.abc import Callable

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from gql_service import keys
from gql_service.models import WebhookDelivery

# Written only while the record exists: the delivery lives and expires with its job. A
# compare-and-set on the state the writer read (ARGV[1], '' for none): two attempts at once
# (a lost one's failure callback and its retry) can't overwrite each other's count; the
# second re-reads and applies its change again.
_SAVE_DELIVERY_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if (redis.call('HGET', KEYS[1], 'w') or '') ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'w', ARGV[2])
return 1
"""

DeliveryChange = Callable[[WebhookDelivery], WebhookDelivery | None]
"""Returns the changed delivery, or None to leave it as it is."""


async def get_deliveries(redis: AsyncRedis, job_ids: list[str]) -> list[WebhookDelivery | None]:
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(keys.job(job_id), "w")
        raws = await pipe.execute()
    return [WebhookDelivery.model_validate_json(raw) if raw else None for raw in raws]


def _delivery_of(raw: bytes | str | None, url: str) -> WebhookDelivery:
    return WebhookDelivery.model_validate_json(raw) if raw else WebhookDelivery(url=url)


async def update_delivery(redis: AsyncRedis, job_id: str, url: str, change: DeliveryChange) -> WebhookDelivery:
    """Apply `change` to the job's delivery state atomically; returns the state after."""
    while True:
        raw = await redis.hget(keys.job(job_id), "w")
        new = change(_delivery_of(raw, url))
        if new is None:
            return _delivery_of(raw, url)
        if await redis.eval(_SAVE_DELIVERY_LUA, 1, keys.job(job_id), raw or "", new.model_dump_json()) != -1:
            return new


def get_delivery_sync(redis: Redis, job_id: str) -> WebhookDelivery | None:
    raw = redis.hget(keys.job(job_id), "w")
    return WebhookDelivery.model_validate_json(raw) if raw else None


def update_delivery_sync(redis: Redis, job_id: str, url: str, change: DeliveryChange) -> WebhookDelivery:
    """`update_delivery`, from RQ's synchronous callbacks."""
    while True:
        raw: bytes | None = redis.hget(keys.job(job_id), "w")  # type: ignore[assignment]
        new = change(_delivery_of(raw, url))
        if new is None:
            return _delivery_of(raw, url)
        if redis.eval(_SAVE_DELIVERY_LUA, 1, keys.job(job_id), raw or "", new.model_dump_json()) != -1:
            return new
