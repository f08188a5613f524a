"""What gql_service.redis_conn relies on in redis-py's internals, pinned: an upgrade of redis-py
that changes it fails here, not in production."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.connection import Connection as AsyncConnection
from redis.exceptions import DataError

from gql_service import redis_conn, redis_packing


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
            return await redis_conn.run_once(async_redis, pipe, "once:record")

    assert await write() == [1, b"OK"]
    assert await write() == [0, b"OK"]  # a resend of the same write: nothing happens but the script
    assert await async_redis.get("once:counter") == b"1"
    assert await async_redis.lrange("once:queue", 0, -1) == [b"job-1"]
    assert await async_redis.zscore("once:index", "job-1") == 1.5
    assert await async_redis.hgetall("once:record") == {b"v": b"1", b"d": b"{}"}
    assert await async_redis.get("once:script") == b"ran"


async def test_run_once_sends_the_script_alone_when_it_is_all_there_is(async_redis: AsyncRedis) -> None:
    async def write() -> list[object]:
        async with async_redis.pipeline(transaction=True) as pipe:
            pipe.multi()
            pipe.hset("alone:record", "v", 1)
            pipe.rpush("alone:queue", "job-1")
            return await redis_conn.run_once(async_redis, pipe, "alone:record")

    await async_redis.config_resetstat()
    assert await write() == [1]
    assert await write() == [0]
    assert await async_redis.lrange("alone:queue", 0, -1) == [b"job-1"]
    stats = await async_redis.info("commandstats")
    assert stats["cmdstat_eval"]["calls"] == 2
    assert "cmdstat_multi" not in stats and "cmdstat_exec" not in stats  # no MULTI/EXEC around it


@pytest.mark.parametrize(
    "args",
    [
        ("SET", "k", "value"),
        ("CONFIG GET", "maxmemory"),  # a command name of two words
        (b"ZADD", "index", 1.5, "job-1"),
        ("SET", "k", 0.1),
        ("SET", "k", 1e20),
        ("INCRBY", "k", -3),
        ("SET", "k", "é\x00\u2603"),
        ("SET", "k", b"\xff\x00"),
        ("SET", "k", memoryview(b"view")),
        ("SET", "k", bytearray(b"array")),
    ],
)
def test_hiredis_packing_sends_the_bytes_redis_py_would(args: tuple[object, ...]) -> None:
    ours = b"".join(redis_packing.PackedConnection().pack_command(*args))
    assert ours == b"".join(AsyncConnection().pack_command(*args))


@pytest.mark.parametrize("value", [True, None])
def test_hiredis_packing_refuses_what_redis_py_refuses_with_its_error(value: object) -> None:
    with pytest.raises(DataError):
        AsyncConnection().pack_command("SET", "k", value)
    with pytest.raises(DataError):
        redis_packing.PackedConnection().pack_command("SET", "k", value)


@pytest.mark.parametrize(
    ("url", "expected", "db"),
    [
        ("redis://127.0.0.1:6379/3", redis_packing.PackedConnection, 3),
        ("rediss://user:secret@127.0.0.1:6379/0", redis_packing.PackedSSLConnection, 0),
        ("unix:///tmp/redis.sock?db=2", redis_packing.PackedUnixConnection, 2),
    ],
)
def test_every_async_client_packs_with_hiredis_whatever_the_url(url: str, expected: type, db: int) -> None:
    pool = redis_conn.async_client(url).connection_pool
    assert pool.connection_class is expected
    assert pool.connection_kwargs["db"] == db


async def test_a_packed_client_round_trips_every_kind_of_value(redis_url: str) -> None:
    client = redis_conn.async_client(redis_url)
    try:
        async with client.pipeline(transaction=True) as pipe:
            pipe.set("packed:text", "é\u2603").set("packed:bytes", b"\xff\x00").set("packed:float", 0.1)
            pipe.zadd("packed:index", {"job-1": 1.5}).get("packed:text").zscore("packed:index", "job-1")
            replies = await pipe.execute()
        assert replies[-2:] == [b"\xc3\xa9\xe2\x98\x83", 1.5]
        assert await client.get("packed:bytes") == b"\xff\x00"
        assert await client.get("packed:float") == b"0.1"
    finally:
        await client.aclose()
