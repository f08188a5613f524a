"""The pub/sub fan-out: one connection, confirmed subscriptions, bounded queues, resync."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis as AsyncRedis

from gql_service.broadcast import RESYNC, Broadcast, Subscription


async def pubsub_clients(redis: AsyncRedis) -> int:
    clients = await redis.client_list()
    return sum(1 for c in clients if int(c.get("sub", 0)) > 0 or int(c.get("psub", 0)) > 0)


async def test_a_message_published_after_subscribe_arrives(broadcast: Broadcast, async_redis: AsyncRedis) -> None:
    async with broadcast.subscribe("ch") as sub:
        # subscribe() returned: Redis has processed the SUBSCRIBE, so this publish is seen.
        assert await async_redis.publish("ch", b"one") == 1
        assert await asyncio.wait_for(sub.get(), 5) == b"one"


async def test_many_subscribers_share_one_connection(broadcast: Broadcast, async_redis: AsyncRedis) -> None:
    async with asyncio.timeout(10):
        contexts = [broadcast.subscribe(f"ch{i % 50}") for i in range(200)]
        subs = [await c.__aenter__() for c in contexts]
        assert broadcast.subscriber_count == 200
        assert await pubsub_clients(async_redis) == 1
        numsub = dict(await async_redis.pubsub_numsub("ch0", "ch49"))
        assert numsub == {b"ch0": 1, b"ch49": 1}
        await async_redis.publish("ch7", b"x")
        got = await asyncio.gather(*(s.get() for s in subs if s.channel == "ch7"))
        assert got == [b"x"] * 4
        for c in contexts:
            await c.__aexit__(None, None, None)
        assert broadcast.subscriber_count == 0


async def test_last_subscriber_leaving_unsubscribes(broadcast: Broadcast, async_redis: AsyncRedis) -> None:
    async with broadcast.subscribe("ch") as first:
        async with broadcast.subscribe("ch"):
            pass
        await async_redis.publish("ch", b"still here")
        assert await asyncio.wait_for(first.get(), 5) == b"still here"
    # The UNSUBSCRIBE was sent on leaving; a barrier proves Redis has processed it.
    async with broadcast.subscribe("other"):
        pass
    assert dict(await async_redis.pubsub_numsub("ch")) == {b"ch": 0}


def test_queue_is_bounded_and_latest_wins() -> None:
    sub = Subscription("ch", maxsize=3)
    for i in range(10):
        sub.push(str(i).encode())
    assert list(sub._items) == [b"7", b"8", b"9"]


def test_resync_supersedes_queued_events_and_is_never_dropped() -> None:
    sub = Subscription("ch", maxsize=2)
    sub.push(b"1")
    sub.push(RESYNC)
    for i in range(5):
        sub.push(str(i).encode())
    assert list(sub._items) == [RESYNC, b"4"]


async def test_lost_connection_reconnects_and_resyncs(broadcast: Broadcast, async_redis: AsyncRedis) -> None:
    async with asyncio.timeout(10), broadcast.subscribe("ch") as sub:
        killed = await async_redis.client_kill_filter(_type="pubsub")
        assert killed == 1
        assert await sub.get() is RESYNC
        assert broadcast.connected
        assert await async_redis.publish("ch", b"after") == 1
        assert await sub.get() == b"after"
