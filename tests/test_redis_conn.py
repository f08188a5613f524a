"""What gql_service.redis_conn relies on in redis-py's internals, pinned: an upgrade of redis-py
that changes it fails here, not in production."""

from __future__ import annotations

from redis.asyncio import Redis as AsyncRedis

from gql_service import redis_conn


async def test_run_once_runs_a_pipelines_commands_once_whatever_resends_them(async_redis: AsyncRedis) -> None:
    async def write() -> list[object]:
        async with async_redis.pipeline(transaction=True) as pipe:
            pipe.hset("once:record", mapping={"v": 1, "d": "{}"})
            pipe.incr("once:counter")
            pipe.rpush("once:queue", "job-1")
            pipe.zadd("once:index", {"job-1": 1.5})
            # A script can't run inside the guard's: it runs after it (RQ queues one).
            pipe.eval("return redis.call('SET', 'once:script', 'ran')", 0)
            assert len(pipe.command_stack) == 5  # redis-py keeps queued commands here, as (args, options)
            redis_conn.run_once(pipe, "once:record")
            return list(await pipe.execute())

    assert await write() == [1, b"OK"]
    assert await write() == [0, b"OK"]  # a resend of the same write: nothing happens but the script
    assert await async_redis.get("once:counter") == b"1"
    assert await async_redis.lrange("once:queue", 0, -1) == [b"job-1"]
    assert await async_redis.zscore("once:index", "job-1") == 1.5
    assert await async_redis.hgetall("once:record") == {b"v": b"1", b"d": b"{}"}
    assert await async_redis.get("once:script") == b"ran"
