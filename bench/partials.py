"""7. Streamed partial results: one job's interim frames to many `partial: true` subscribers,
and what streaming costs a worker when nobody watches.

Fan-out: one API process, N websockets subscribed with `partial: true` to one queued job,
then one async worker starts and the stub streams its answer in `chunks` pieces over
`seconds`. A Redis subscriber of the job's frame channel notes when each frame was
published; each websocket, when it arrived. The API's CPU is read around the stream.

Cost: one attempt in this process (the worker's pipeline, real SDK, real Redis of its own,
statistics reset before), streamed and not, with nobody subscribed: every command the
server ran for it, from INFO commandstats.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

import httpx
import psutil
import websockets
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from gql_service import keys, partials, store
from gql_service.cli.embedded_redis import EmbeddedRedis
from gql_service.worker.llm.openai_provider import OpenAIProvider, make_client
from gql_service.worker.pipeline import Attempt
from tests.openai_stub import OpenAIStub
from tests.records import create_job
from tests.service import Service

from .async_worker import run_workers
from .harness import api_pid, pct, progress
from .scenarios import Sizes, stub_env

SUBMIT = "mutation($t: String!) { submitText(input: {text: $t}) { job { id } } }"
FOLLOW = 'subscription { jobUpdates(id: "%s", partial: true) { version stage partialSeq } }'
TEXT = "I loved the clinic. Dr. Rao was kind. Waiting time was 10 minutes at Springfield General Hospital."
INTERVAL_S = 0.1  # PARTIAL_INTERVAL_MS's default


def partial_results(redis_url: str, stub: OpenAIStub, sizes: Sizes) -> dict[str, Any]:
    progress("7. streamed partial results")
    fan_out = asyncio.run(_fan_out(redis_url, stub, sizes))
    cost = asyncio.run(_commands_per_job(stub, sizes))
    stub.reset()
    cpu = _cpu_per_job(redis_url, stub, sizes)
    return {"fan_out": fan_out, "commands": cost, "cpu": cpu}


def _cpu_per_job(redis_url: str, stub: OpenAIStub, sizes: Sizes) -> dict[str, Any]:
    """What streaming costs the worker: one async process, concurrency 256, LLM at 0 ms,
    the stub's answer in 8 chunks, nobody watching; LLM_STREAM on and off side by side."""
    redis = Redis.from_url(redis_url)
    rows = {}
    for stream in ("true", "false"):
        rows[stream] = run_workers(redis, redis_url, stub, worker_class="async", workers=1, concurrency=256,
                                   jobs=sizes.async_jobs, settings={"LLM_STREAM": stream})  # fmt: skip
    return {"on": rows["true"], "off": rows["false"]}


async def _subscriber(ws_url: str, job_id: str, frames: list[tuple[float, int]], ready: asyncio.Event) -> None:
    async with websockets.connect(ws_url, subprotocols=["graphql-transport-ws"], max_queue=None) as ws:  # type: ignore[list-item]
        await ws.send('{"type":"connection_init"}')
        await ws.recv()
        await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": FOLLOW % job_id}}))
        async for raw in ws:
            now = time.perf_counter()
            message = json.loads(raw)
            if message["type"] == "complete":
                return
            if message["type"] != "next" or message["payload"].get("errors"):
                raise RuntimeError(f"subscription failed: {message}")
            ready.set()
            seq = message["payload"]["data"]["jobUpdates"]["partialSeq"]
            if seq is not None:
                frames.append((now, seq))


async def _published(redis_url: str, job_id: str, at: dict[int, float], subscribed: asyncio.Event) -> None:
    redis = AsyncRedis.from_url(redis_url)
    async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
        await pubsub.subscribe(keys.job_partials(job_id))
        subscribed.set()
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None:
                at[partials.decode_frame(message["data"])[2]] = time.perf_counter()


async def _fan_out(redis_url: str, stub: OpenAIStub, sizes: Sizes) -> dict[str, Any]:
    n, chunks, seconds = sizes.partial_subscribers, sizes.partial_chunks, sizes.partial_seconds
    stub.reset()
    stub.stream_chunks, stub.stream_seconds = chunks, seconds
    with Service(redis_url, workers=0, env=stub_env("bench-partials", stub)) as svc:
        job_id = httpx.post(svc.http_url, json={"query": SUBMIT, "variables": {"t": TEXT}}).json()
        job_id = job_id["data"]["submitText"]["job"]["id"]
        published: dict[int, float] = {}
        subscribed = asyncio.Event()
        listener = asyncio.create_task(_published(redis_url, job_id, published, subscribed))
        await subscribed.wait()
        received: list[list[tuple[float, int]]] = [[] for _ in range(n)]
        readies = [asyncio.Event() for _ in range(n)]
        clients = []
        for start in range(0, n, 50):  # 50 at a time, as a client pool would connect
            clients += [asyncio.create_task(_subscriber(svc.ws_url, job_id, received[i], readies[i]))
                        for i in range(start, min(n, start + 50))]  # fmt: skip
            await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies[start : start + 50])), 60)
        api = psutil.Process(api_pid(svc))
        cpu_before = sum(api.cpu_times()[:2])
        svc.start_worker(1)
        await asyncio.wait_for(asyncio.gather(*clients), 120)
        cpu_s = sum(api.cpu_times()[:2]) - cpu_before
        listener.cancel()
    counts = [len(frames) for frames in received]
    delays = [(t - published[seq]) * 1000 for frames in received for t, seq in frames if seq in published]
    bound = seconds / INTERVAL_S + 2
    row = {
        "subscribers": n, "chunks": chunks, "stream_s": seconds, "published": len(published),
        "frames_min": min(counts), "frames_median": statistics.median(counts), "frames_max": max(counts),
        "bound": bound, "delivered": sum(counts), "p50_ms": pct(delays, 50), "p99_ms": pct(delays, 99),
        "api_cpu_s": cpu_s, "api_cpu_ms_per_1000_frames": cpu_s * 1e6 / max(sum(counts), 1),
    }  # fmt: skip
    progress(
        f"    {n} subscribers, {chunks} chunks over {seconds:.1f} s: {len(published)} frames published, "
        f"{row['frames_min']}-{row['frames_max']} per subscriber (bound {bound:.0f}), publish -> client "
        f"p50 {row['p50_ms']:.1f} ms p99 {row['p99_ms']:.1f} ms, API CPU {cpu_s:.2f} s"
    )
    return row


async def _attempt_commands(url: str, stub: OpenAIStub, *, stream: bool, watched: bool) -> dict[str, int]:
    sync = Redis.from_url(url)
    redis = AsyncRedis.from_url(url)
    job = create_job(sync, f"cost-{stream}-{watched}", TEXT)
    watcher = sync.pubsub()
    if watched:
        watcher.subscribe(keys.job_partials(job.id))
        watcher.get_message(timeout=1)
    provider = OpenAIProvider(make_client(api_key="k", base_url=stub.base_url, timeout_s=30), model="m", stream=stream)
    stream_of = partials.PartialStream(redis, job.id, interval_s=INTERVAL_S)
    await redis.ping()  # the connection is open and the script loaded before the count starts
    sync.script_load(store._CAS_LUA)
    sync.config_resetstat()
    await Attempt(redis, provider, job.id, ttl_s=600, partials=stream_of).run(retries_left=0)
    stats = sync.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    calls.pop("config", None)
    calls.pop("info", None)
    await provider.aclose()
    await redis.aclose()
    watcher.close()
    sync.close()
    return calls


async def _commands_per_job(stub: OpenAIStub, sizes: Sizes) -> dict[str, Any]:
    stub.reset()
    rows = {}
    with EmbeddedRedis() as redis:
        for name, stream, watched in (("off", False, False), ("on", True, False), ("on, watched", True, True)):
            # The same time on the LLM either way: a 2 s stream, or a 2 s wait for a whole answer.
            stub.stream_chunks, stub.stream_seconds = sizes.partial_chunks, sizes.partial_seconds
            stub.latency_s = 0.0 if stream else sizes.partial_seconds
            calls = await _attempt_commands(redis.url, stub, stream=stream, watched=watched)
            rows[name] = {"total": sum(calls.values()), "by_command": dict(sorted(calls.items()))}
    stub.latency_s = 0.0
    progress("    Redis commands per job: " + ", ".join(f"streaming {k} {v['total']}" for k, v in rows.items()))
    return rows
