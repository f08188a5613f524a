"""The pub/sub fan-out: one connection, confirmed subscriptions, bounded queues, resync, and a
link that drops as a subscriber leaves."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any

import uvloop
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from gql_service import store
from gql_service.api.jobs import JobService
from gql_service.api.schema import Context, schema
from gql_service.broadcast import RESYNC, Broadcast, Subscription
from gql_service.models import JobRecord, JobStage, JobStatus, utcnow
from gql_service.redis_conn import async_client
from gql_service.settings import Settings

from . import records


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


async def test_a_subscriber_with_a_backlog_lets_the_loop_run_between_its_events() -> None:
    """A mailbox that already holds events must still give the loop a turn per event: its
    subscription would otherwise render and send its whole backlog in one turn, and every
    other request waited behind it (measured: /healthz at 2.8 s behind 9 such subscribers)."""
    sub = Subscription([f"job-{i}" for i in range(100)], per_channel=8)
    for i in range(100):
        sub.push(f"job-{i}", b"event")
    turns = 0

    async def other_work() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(other_work())
    await asyncio.sleep(0)  # the ticker is running
    seen = []
    for _ in range(100):
        before = turns
        await sub.get()
        seen.append(turns - before)
    ticker.cancel()
    assert min(seen) >= 1, "an event was taken without the loop running anything else"


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


# -- a link that drops right at a job's end -----------------------------------------------
# The service runs on uvloop (uvicorn's default with uvicorn[standard]), whose transports
# raise RuntimeError when written to after they closed; asyncio's own loop drops the write
# and reports the loss later, as an OSError. These tests run on uvloop, as the API does.
UPDATES = "subscription($id: ID!) { jobUpdates(id: $id) { version status } }"


def cut_under(hub: Broadcast) -> None:
    """Close the pub/sub socket under the hub, as a connection killed by Redis is closed,
    before its listener has had a chance to notice."""
    pubsub = hub._pubsub
    assert pubsub is not None and pubsub.connection is not None
    writer = pubsub.connection._writer
    assert writer is not None
    writer.transport.abort()


def on_uvloop(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


def test_leaving_when_the_link_broke_under_us_raises_nothing(redis_url: str) -> None:
    async def scenario() -> None:
        client = async_client(redis_url, max_connections=1, retries=0)
        hub = Broadcast(client, health_check_s=1.0)
        await hub.start()
        try:
            async with asyncio.timeout(10):
                async with hub.subscribe("ch"):
                    cut_under(hub)
                # The UNSUBSCRIBE found the socket closed (it raised RuntimeError out of the
                # block); the link comes back with nobody to resync.
                while not hub.connected or hub.reconnects == 0:
                    await asyncio.sleep(0.05)  # the listener's state: no event to await
                assert hub.subscriber_count == 0
        finally:
            await hub.stop()
            await client.aclose()

    on_uvloop(scenario)


def test_a_link_dropping_right_at_a_jobs_end_sends_nothing_after_the_end(redis_url: str, settings: Settings) -> None:
    """2 of 180 subscriptions got one more `next`, an error ("unable to perform operation on
    <TCPTransport closed=True>"), after FINISHED when the pub/sub connection was killed as the
    job ended: the subscription's UNSUBSCRIBE raised into the stream."""

    async def scenario() -> None:
        client = async_client(redis_url, max_connections=1, retries=0)
        hub = Broadcast(client, health_check_s=1.0)
        redis, sync_redis = AsyncRedis.from_url(redis_url), Redis.from_url(redis_url)
        await hub.start()
        try:
            jobs = JobService(redis=redis, sync_redis=sync_redis, broadcast=hub, settings=settings)
            context = Context(jobs=jobs)
            records.create_job(sync_redis, "ends-as-the-link-drops")
            stream = await schema.subscribe(UPDATES, {"id": "ends-as-the-link-drops"}, context_value=context)
            assert isinstance(stream, AsyncGenerator)
            async with asyncio.timeout(10), contextlib.aclosing(stream):
                frames = [await anext(stream)]
                await store.update_job(redis, "ends-as-the-link-drops", _finished, ttl_s=60)
                frames.append(await anext(stream))
                cut_under(hub)  # the end arrived; the link drops before anything else happens
                frames += [result async for result in stream]
            shown = [(f.data, f.errors) for f in frames]
            assert shown == [
                ({"jobUpdates": {"version": 1, "status": "QUEUED"}}, None),
                ({"jobUpdates": {"version": 2, "status": "FINISHED"}}, None),
            ]
        finally:
            await hub.stop()
            await client.aclose()
            await redis.aclose()
            sync_redis.close()

    on_uvloop(scenario)


def _finished(job: JobRecord) -> JobRecord:
    return job.model_copy(update={"status": JobStatus.FINISHED, "stage": JobStage.DONE, "finished_at": utcnow()})
