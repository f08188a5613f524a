"""gql_service/redis_pool.py: the quick checkout keeps redis-py's bound, deadline and order."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ConnectionError as RedisConnectionError

from gql_service.redis_conn import async_client
from gql_service.redis_pool import QuickCheckout


async def _pending(task: asyncio.Task[object]) -> bool:
    for _ in range(20):  # turns of the loop: anything runnable has run by then
        await asyncio.sleep(0)
    return not task.done()


async def test_the_service_s_clients_use_it(redis_url: str) -> None:
    client = async_client(redis_url, max_connections=2)
    try:
        assert isinstance(client.connection_pool, QuickCheckout)
        assert await client.ping()
    finally:
        await client.aclose()


async def test_a_free_connection_is_reused_and_the_bound_holds(redis_url: str, async_redis: AsyncRedis) -> None:
    pool = QuickCheckout.from_url(redis_url, max_connections=2, timeout=5)
    try:
        first = await pool.get_connection()
        await pool.release(first)
        assert await pool.get_connection() is first  # taken back, not a new one
        second = await pool.get_connection()
        third = asyncio.create_task(pool.get_connection())
        assert await _pending(third)  # two out: the third waits
        await pool.release(second)
        assert await asyncio.wait_for(third, 5) is second
        clients = await async_redis.client_list()
        assert len(clients) == 3  # the pool's two and this test's own
    finally:
        await pool.aclose()


async def test_those_queued_are_served_first_and_in_order(redis_url: str) -> None:
    pool = QuickCheckout.from_url(redis_url, max_connections=1, timeout=5)
    try:
        held = await pool.get_connection()
        a = asyncio.create_task(pool.get_connection())
        assert await _pending(a)
        b = asyncio.create_task(pool.get_connection())
        assert await _pending(b)
        await pool.release(held)
        late = asyncio.create_task(pool.get_connection())  # after the release: must not overtake a or b
        assert await asyncio.wait_for(a, 5) is held
        assert await _pending(b) and await _pending(late)
        await pool.release(held)
        assert await asyncio.wait_for(b, 5) is held
        assert await _pending(late)
        await pool.release(held)
        assert await asyncio.wait_for(late, 5) is held
    finally:
        await pool.aclose()


async def test_a_wait_past_the_deadline_is_redis_pys_error_and_costs_nothing(redis_url: str) -> None:
    pool = QuickCheckout.from_url(redis_url, max_connections=1, timeout=0.2)
    try:
        held = await pool.get_connection()
        with pytest.raises(RedisConnectionError, match="No connection available"):
            await pool.get_connection()
        await pool.release(held)
        assert await pool.get_connection() is held  # the quick way again: nobody is queued
    finally:
        await pool.aclose()
