"""The live path under production faults, through real processes: a subscriber gets every
newer version and never misses the end, and a broken or hung Redis is a fast, typed error.

Each test drives a real `gql-service serve` against a real Redis that it cuts, stops,
restarts or denies; the job is "parked" (QUEUED, no worker) and ended by the test itself,
so the moment of the end is chosen exactly: inside the gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from gql_service import keys, redis_conn, store
from gql_service.api.calls import redis_call
from gql_service.api.errors import ServiceUnavailable
from gql_service.cli.embedded_redis import EmbeddedRedis, redis_server_binary
from gql_service.models import JobRecord, JobStage, JobStatus, utcnow

from . import records
from .clients import SUBMIT, TEXT, follow, post
from .service import Service, wait_until

AOF = ("--appendonly", "yes", "--appendfsync", "always")
FAST = {"PUBSUB_HEALTH_CHECK_S": "1", "REDIS_TIMEOUT_S": "1.5"}


def park(redis: Redis, tenant: str = "public") -> str:
    """A QUEUED job no worker will take."""
    record = JobRecord(id=uuid.uuid4().hex, tenant=tenant)
    with redis.pipeline() as pipe:
        store.create_job(pipe, record, text="parked", ttl_s=600)
        store.index_job(pipe, record, ttl_s=600)
        pipe.execute()
    return record.id


def finished(redis: Redis, job_id: str) -> JobRecord:
    current = store.get_job_sync(redis, job_id)
    assert current is not None
    return current.model_copy(
        update={
            "version": current.version + 1,
            "status": JobStatus.FINISHED,
            "stage": JobStage.DONE,
            "finished_at": utcnow(),
        }
    )


def finish(redis: Redis, job_id: str) -> None:
    def change(job: JobRecord) -> JobRecord:
        return job.model_copy(update={"status": JobStatus.FINISHED, "stage": JobStage.DONE, "finished_at": utcnow()})

    records.update_job(redis, job_id, change, ttl_s=600)


def start_loading(server: EmbeddedRedis, data_dir: Path, *extra: str) -> bool:
    """Start `server`'s Redis again on its port and data; True once it answered LOADING
    (EmbeddedRedis.start would wait for the end of loading)."""
    args = [redis_server_binary(), "--port", str(server.port), "--bind", "127.0.0.1", "--dir", str(data_dir), *extra]
    server.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # No retries: redis-py would otherwise retry the LOADING answer until loading ends.
    client = Redis(port=server.port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            try:
                client.ping()
                return False  # loaded already: the test would prove nothing
            except RedisConnectionError as exc:  # BusyLoadingError, or raised while connecting
                if isinstance(exc, BusyLoadingError) or "loading" in str(exc).lower():
                    return True
                time.sleep(0.01)  # not listening yet: an outside state, polled
        return False
    finally:
        client.close()


def readyz(svc: Service) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"http://127.0.0.1:{svc.port}/readyz", timeout=10)
    return response.status_code, response.json()


async def open_subscription(svc: Service, job_id: str) -> asyncio.Task[list[dict[str, Any]]]:
    """A jobUpdates subscription that has received its snapshot."""
    got_first = asyncio.Event()
    task = asyncio.create_task(follow(svc, job_id, first_seen=got_first))
    await asyncio.wait_for(got_first.wait(), 10)
    return task


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(data_dir=str(tmp_path), extra_args=AOF).start()
    yield server
    if server.process is not None and server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)  # in case a test left it stopped
    server.stop()


async def test_an_end_published_while_pubsub_was_cut_still_reaches_the_subscriber(
    own_redis: EmbeddedRedis,
) -> None:
    redis = Redis.from_url(own_redis.url)
    with Service(own_redis.url, workers=0, env=FAST) as svc:
        job_id = park(redis)
        subscription = await open_subscription(svc, job_id)
        end = finished(redis, job_id)
        # One MULTI/EXEC: cut the API's pub/sub link, then end the job into the gap.
        with redis.pipeline(transaction=True) as pipe:
            pipe.client_kill_filter(_type="pubsub")
            pipe.hset(keys.job(job_id), mapping={"v": end.version, "d": store.encode(end)})
            pipe.publish(keys.job_events(job_id), store.encode(end))
            killed, _, receivers = pipe.execute()
        assert (killed, receivers) == (1, 0)
        events = await asyncio.wait_for(subscription, 15)
        assert [e["status"] for e in events] == ["QUEUED", "FINISHED"]


async def test_pubsub_recovers_from_a_restart_that_is_still_loading(own_redis: EmbeddedRedis, tmp_path: Path) -> None:
    redis = Redis.from_url(own_redis.url)
    with Service(own_redis.url, workers=0, env=FAST) as svc:
        job_id = park(redis)
        subscription = await open_subscription(svc, job_id)
        # Enough data (and a per-key delay) that the restarted Redis loads for seconds.
        redis.execute_command("DEBUG", "POPULATE", "30000", "filler", "300")
        redis.config_set("rdbcompression", "no")  # > 2 MB on disk: Redis serves clients while loading
        redis.bgrewriteaof()
        wait_until(lambda: redis.info("persistence")["aof_rewrite_in_progress"] == 0, what="the AOF rewrite")
        redis.close()
        own_redis.stop()
        assert start_loading(own_redis, tmp_path, *AOF, "--key-load-delay", "30")
        redis = Redis.from_url(own_redis.url)
        wait_until(lambda: readyz(svc)[0] == 200, timeout_s=30, what="readiness after loading")
        finish(redis, job_id)
        events = await asyncio.wait_for(subscription, 15)
        assert events[-1]["status"] == "FINISHED"
        # And new subscriptions work (they failed with SERVICE_UNAVAILABLE for good before).
        later = await asyncio.wait_for(follow(svc, job_id), 10)
        assert [e["status"] for e in later] == ["FINISHED"]


async def test_a_hung_redis_fails_fast_everywhere_then_everything_resumes(own_redis: EmbeddedRedis) -> None:
    redis = Redis.from_url(own_redis.url)
    with Service(own_redis.url, workers=0, env=FAST) as svc:
        job_id = park(redis)
        subscription = await open_subscription(svc, job_id)
        # Each path once while Redis answers: what is timed below is the outage, not a first
        # request's lazy imports (seconds when the machine's disk is busy).
        assert "errors" not in post(svc, SUBMIT, text=TEXT).json()
        assert readyz(svc)[0] == 200
        warm = park(redis)  # cancelJob's, job's and /metrics' paths too (cancelJob took 6.2 s once here)
        assert "errors" not in post(svc, "mutation($id: ID!) { cancelJob(id: $id) { id } }", id=warm).json()
        assert "errors" not in post(svc, "query($id: ID!) { job(id: $id) { id } }", id=warm).json()
        assert httpx.get(f"http://127.0.0.1:{svc.port}/metrics").status_code == 200
        assert own_redis.process is not None
        os.kill(own_redis.process.pid, signal.SIGSTOP)
        try:
            base = f"http://127.0.0.1:{svc.port}"
            graphql = {
                "submitText": {"query": SUBMIT, "variables": {"text": TEXT}},
                "job": {"query": "query($id: ID!) { job(id: $id) { id } }", "variables": {"id": job_id}},
                "cancelJob": {"query": "mutation($id: ID!) { cancelJob(id: $id) { id } }", "variables": {"id": job_id}},
            }

            async def timed(name: str, method: str, path: str, body: Any = None) -> tuple[str, float, httpx.Response]:
                started = time.monotonic()
                async with httpx.AsyncClient(timeout=30) as client:
                    response = await client.request(method, base + path, json=body)
                return name, time.monotonic() - started, response

            results = await asyncio.gather(
                *(timed(name, "POST", "/graphql", body) for name, body in graphql.items()),
                timed("readyz", "GET", "/readyz"),
                timed("metrics", "GET", "/metrics"),
            )
            took_s = {name: round(took, 1) for name, took, _ in results}
            print(f"during the outage: {took_s}")
            for name, took, response in results:
                assert took < 3.5, f"{name} took {took:.1f} s (all: {took_s})"
                if name in graphql:
                    assert response.json()["errors"][0]["extensions"]["code"] == "SERVICE_UNAVAILABLE", name
                elif name == "readyz":
                    assert response.status_code == 503
                else:
                    assert response.status_code == 200 and "gqls_redis_up 0.0" in response.text
            # The half-open pub/sub link is noticed by its health check, too.
            wait_until(lambda: readyz(svc)[1].get("pubsub") is not True, timeout_s=10, what="pub/sub marked down")
        finally:
            os.kill(own_redis.process.pid, signal.SIGCONT)
        wait_until(lambda: readyz(svc)[0] == 200, timeout_s=15, what="readiness after SIGCONT")
        finish(redis, job_id)
        events = await asyncio.wait_for(subscription, 15)
        assert events[0]["status"] == "QUEUED" and events[-1]["status"] == "FINISHED"
        assert "errors" not in post(svc, SUBMIT, text=TEXT).json()


async def test_readiness_is_false_while_subscriptions_cannot_work(own_redis: EmbeddedRedis) -> None:
    redis = Redis.from_url(own_redis.url)
    with Service(own_redis.url, workers=0, env=FAST) as svc:
        wait_until(lambda: readyz(svc)[0] == 200, what="readiness")
        # Commands still work, but SUBSCRIBE is refused: the listener fails (not with a
        # connection error) and must keep trying, with readiness saying so meanwhile.
        redis.acl_setuser("default", enabled=True, nopass=True, commands=["-subscribe"])
        redis.client_kill_filter(_type="pubsub")
        wait_until(lambda: readyz(svc)[0] == 503, what="readiness to turn false")
        assert readyz(svc)[1] == {"status": "unavailable", "redis": "ok", "pubsub": False}
        redis.acl_setuser("default", enabled=True, nopass=True, commands=["+subscribe"])
        wait_until(lambda: readyz(svc)[0] == 200, what="readiness to come back")
        job_id = park(redis)
        finish(redis, job_id)
        assert (await asyncio.wait_for(follow(svc, job_id), 10))[-1]["status"] == "FINISHED"


async def test_one_tenant_flooding_subscriptions_starves_nobody(redis_url: str, sync_redis: Redis) -> None:
    api_keys = {"key-tenant-a": "a", "key-tenant-b": "b"}
    env = {"API_KEYS": json.dumps(api_keys), "MAX_WATCHED_JOBS_PER_TENANT": "1000"}
    with Service(redis_url, workers=0, env=env) as svc:
        ids = [park(sync_redis, tenant="a") for _ in range(100)]
        query = "subscription($ids: [ID!]!) { jobsUpdates(ids: $ids) { id version } }"
        auth = {"Authorization": "Bearer key-tenant-a"}

        async def flood() -> tuple[int, list[str]]:
            """One socket, 100 jobsUpdates of 100 ids: snapshots received, error codes."""
            nexts: dict[str, int] = {}
            codes: dict[str, str] = {}
            async with websockets.connect(svc.ws_url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
                await ws.send(json.dumps({"type": "connection_init", "payload": auth}))
                assert json.loads(await ws.recv())["type"] == "connection_ack"
                for n in range(100):
                    message = {
                        "id": str(n),
                        "type": "subscribe",
                        "payload": {"query": query, "variables": {"ids": ids}},
                    }
                    await ws.send(json.dumps(message))
                # Every operation either gets its 100 snapshots (and stays open) or one error.
                while len(codes) + sum(1 for count in nexts.values() if count == 100) < 100:
                    reply = json.loads(await ws.recv())
                    errors = reply.get("payload", {}).get("errors") if reply["type"] == "next" else reply.get("payload")
                    if errors:
                        codes[reply["id"]] = errors[0]["extensions"]["code"]
                    elif reply["type"] == "next":
                        nexts[reply["id"]] = nexts.get(reply["id"], 0) + 1
            return sum(nexts.values()), list(codes.values())

        async def other_tenant() -> float:
            started = time.monotonic()
            async with httpx.AsyncClient(timeout=30) as client:
                response = await client.post(
                    svc.http_url,
                    json={"query": SUBMIT, "variables": {"text": TEXT}},
                    headers={"Authorization": "Bearer key-tenant-b"},
                )
            assert "errors" not in response.json(), response.text
            return time.monotonic() - started

        async with asyncio.timeout(60):
            floods = [asyncio.create_task(flood()) for _ in range(3)]
            took = await asyncio.gather(*(other_tenant() for _ in range(5)))
            results = await asyncio.gather(*floods)
        snapshots = sum(s for s, _ in results)
        codes = [c for _, cs in results for c in cs]
        # Up to the cap is served in full; the rest is refused as a limit, never as an outage.
        assert snapshots == 1000
        assert codes == ["RATE_LIMITED"] * 290
        assert max(took) < 3.0


def test_redis_connection_of_cancel_is_kept_not_cut(redis_url: str, sync_redis: Redis) -> None:
    with Service(redis_url, workers=0) as svc:
        before = None
        for n in range(3):
            job_id = park(sync_redis)
            body = post(svc, "mutation($id: ID!) { cancelJob(id: $id) { status } }", id=job_id).json()
            assert body["data"]["cancelJob"]["status"] == "CANCELED"
            received = int(sync_redis.info("stats")["total_connections_received"])
            if n == 0:
                before = received
        # The first cancel opens RQ's connection; later ones reuse it (the shared pool used
        # to be disconnected after every cancel, cutting whatever else was using it).
        assert received == before


async def test_every_call_on_a_hung_redis_ends_at_its_deadline(own_redis: EmbeddedRedis) -> None:
    """In-process, hundreds of times: a deadline that redis-py swallows shows as a call that
    outlives it by its own retries (on Python 3.11, asyncio.wait_for around a socket write
    can eat the cancellation; the live test above saw a request take 16 s instead of 1.5).
    The deadlines vary, so they land anywhere in redis-py's reconnect-and-retry sequence."""
    timeout_s, bursts = 0.2, 100
    redis = redis_conn.async_client(own_redis.url, timeout_s=timeout_s, name="gqls-api", max_connections=2)
    await redis.ping()
    assert own_redis.process is not None
    os.kill(own_redis.process.pid, signal.SIGSTOP)
    deadlines = random.Random(7)

    async def call(n: int) -> tuple[float, float]:
        deadline_s = deadlines.uniform(0.02, 0.4)
        started = time.monotonic()
        with contextlib.suppress(ServiceUnavailable):
            async with redis_call(deadline_s):
                await redis.get(f"key-{n}")
        return time.monotonic() - started, deadline_s

    async def busy_neighbour() -> None:  # the API's other requests: loop turns of a millisecond
        while True:
            until = time.perf_counter() + 0.001
            while time.perf_counter() < until:
                pass
            await asyncio.sleep(0)

    neighbour = asyncio.create_task(busy_neighbour())
    try:
        took: list[tuple[float, float]] = []
        for burst in range(bursts):  # as many at once as the live test sends, over a pool of 2
            took += await asyncio.gather(*(call(burst * 5 + n) for n in range(5)))
    finally:
        neighbour.cancel()
        os.kill(own_redis.process.pid, signal.SIGCONT)
    await redis.aclose()
    late = sorted(round(t - deadline, 2) for t, deadline in took if t > deadline + 0.5)
    assert not late, f"{len(late)} of {len(took)} calls outlived their deadline, by (s): {late[-5:]}"
