"""The pub/sub fan-out: one connection, confirmed subscriptions, bounded queues, resync."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis as AsyncRedis

from gql_service.broadcast import RESYNC, Broadcast, Subscription
from gql_service.redis_conn import async_client


async def pubsub_clients(redis: AsyncRedis) -> int:
    clients = await redis.client_list()
    return sum(1 for c in clients if int(c.get("sub", 0)) > 0 or int(c.get("psub", 0)) > 0)


async def test_a_message_published_after_subscribe_arrives(broadcast: Broadcast, async_redis: AsyncRedis) -> None:
    async with broadcast.subscribe("ch") as sub:
        # subscribe() returned: Redis has processed the SUBSCRIBE, so this publish is seen.
        assert await async_redis.publish("ch", b"one") == 1
        assert await asyncio.wait_for(sub.get(), 5) == ("ch", b"one")


async def test_many_subscribers_share_one_connection(broadcast: Broadcast, async_redis: AsyncRedis) -> None:
    async with asyncio.timeout(10):
        contexts = [broadcast.subscribe(f"ch{i % 50}") for i in range(200)]
        subs = [await c.__aenter__() for c in contexts]
        assert broadcast.subscriber_count == 200
        assert await pubsub_clients(async_redis) == 1
        numsub = dict(await async_redis.pubsub_numsub("ch0", "ch49"))
        assert numsub == {b"ch0": 1, b"ch49": 1}
        await async_redis.publish("ch7", b"x")
        got = await asyncio.gather(*(s.get() for s in subs if s.channels == ("ch7",)))
        assert got == [("ch7", b"x")] * 4
        for c in contexts:
            await c.__aexit__(None, None, None)
        assert broadcast.subscriber_count == 0


async def test_last_subscriber_leaving_unsubscribes(broadcast: Broadcast, async_redis: AsyncRedis) -> None:
    async with broadcast.subscribe("ch") as first:
        async with broadcast.subscribe("ch"):
            pass
        await async_redis.publish("ch", b"still here")
        assert await asyncio.wait_for(first.get(), 5) == ("ch", b"still here")
    # The UNSUBSCRIBE was sent on leaving; a barrier proves Redis has processed it.
    async with broadcast.subscribe("other"):
        pass
    assert dict(await async_redis.pubsub_numsub("ch")) == {b"ch": 0}


def test_mailbox_is_bounded_per_channel_and_latest_wins() -> None:
    sub = Subscription(["a", "b"], per_channel=3)
    sub.push("b", b"b-terminal")
    for i in range(10):
        sub.push("a", str(i).encode())
    # A busy channel drops its own oldest events, never another channel's (latest) one.
    assert list(sub._items) == [("b", b"b-terminal"), ("a", b"7"), ("a", b"8"), ("a", b"9")]


def test_resync_supersedes_queued_events_and_is_never_dropped() -> None:
    sub = Subscription(["ch"], per_channel=2)
    sub.push("ch", b"1")
    sub.resync()
    for i in range(5):
        sub.push("ch", str(i).encode())
    assert list(sub._items) == [RESYNC, ("ch", b"3"), ("ch", b"4")]


async def test_one_mailbox_watches_many_channels(broadcast: Broadcast, async_redis: AsyncRedis) -> None:
    async with asyncio.timeout(10), broadcast.subscribe("x", "y", "x") as sub:
        assert sub.channels == ("x", "y")
        assert dict(await async_redis.pubsub_numsub("x", "y")) == {b"x": 1, b"y": 1}
        await async_redis.publish("y", b"1")
        await async_redis.publish("x", b"2")
        assert [await sub.get(), await sub.get()] == [("y", b"1"), ("x", b"2")]
    async with broadcast.subscribe("other"):
        pass  # its barrier proves the UNSUBSCRIBE of x and y was processed
    assert dict(await async_redis.pubsub_numsub("x", "y")) == {b"x": 0, b"y": 0}


async def test_lost_connection_reconnects_and_resyncs(broadcast: Broadcast, async_redis: AsyncRedis) -> None:
    async with asyncio.timeout(10), broadcast.subscribe("ch") as sub:
        killed = await async_redis.client_kill_filter(_type="pubsub")
        assert killed == 1
        assert await sub.get() is RESYNC
        assert broadcast.connected
        assert await async_redis.publish("ch", b"after") == 1
        assert await sub.get() == ("ch", b"after")


async def test_an_event_lost_while_the_link_was_down_leads_to_a_resync(
    broadcast: Broadcast, async_redis: AsyncRedis
) -> None:
    async with asyncio.timeout(10), broadcast.subscribe("ch") as sub:
        # In one MULTI/EXEC: the link is cut, then the event is published into the gap.
        async with async_redis.pipeline(transaction=True) as pipe:
            pipe.client_kill_filter(_type="pubsub")
            pipe.publish("ch", b"lost")
            killed, receivers = await pipe.execute()
        assert (killed, receivers) == (1, 0)
        # Whichever layer reconnects, the subscriber hears that it must re-read.
        assert await sub.get() is RESYNC
        assert broadcast.reconnects == 1


async def test_a_hung_redis_is_a_drop_then_a_resync(broadcast: Broadcast, async_redis: AsyncRedis) -> None:
    async with asyncio.timeout(15), broadcast.subscribe("ch") as sub:
        # CLIENT PAUSE ALL: Redis keeps the sockets open and answers nothing, like a
        # SIGSTOPped server or a half-open connection. The health check (1 s here) notices.
        await async_redis.execute_command("CLIENT", "PAUSE", "3500", "ALL")
        while broadcast.connected:
            await asyncio.sleep(0.05)  # polling an outside state: no event to await
        assert await sub.get() is RESYNC  # once Redis answers again
        assert broadcast.connected


class _FailsOnce(Broadcast):
    failed = False

    def _dispatch(self, message: dict[str, Any], *, resync: bool) -> bool:
        if message["type"] == "message" and not self.failed:
            self.failed = True
            raise RuntimeError("a bug in the listener")
        return super()._dispatch(message, resync=resync)


async def test_a_listener_that_fails_for_any_reason_recovers(redis_url: str, async_redis: AsyncRedis) -> None:
    client = async_client(redis_url, max_connections=1, retries=0)
    hub = _FailsOnce(client)
    await hub.start()
    try:
        async with asyncio.timeout(10), hub.subscribe("ch") as sub:
            await async_redis.publish("ch", b"boom")
            assert await sub.get() is RESYNC
            assert hub.connected
            await async_redis.publish("ch", b"fine")
            assert await sub.get() == ("ch", b"fine")
    finally:
        await hub.stop()
        await client.aclose()
