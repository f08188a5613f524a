"""11. Subscriptions over HTTP: GraphQL over Server-Sent Events beside graphql-transport-ws.

The same measurement as section 2, at 1,000 subscriptions on a fresh API process each: the
API's memory per idle subscription (one HTTP connection, or one websocket, each), one job
changing while the others idle (publish to client, p50/p99), and every job changing at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
from redis import Redis

from tests.service import Service

from .harness import progress
from .scenarios import Sizes, Subscribers, _fanout_one_size, offline_env


class SseSubscribers:
    """N Server-Sent Events streams (distinct connections mode), one jobUpdates each."""

    def __init__(self, http_url: str) -> None:
        self.http_url = http_url
        self.received: dict[str, list[tuple[float, int]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def open(self, job_ids: list[str], parallel: int = 50) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
        )
        sem = asyncio.Semaphore(parallel)
        first = {j: asyncio.Event() for j in job_ids}

        async def one(job_id: str) -> None:
            async with sem:
                self.received[job_id] = []
                self._tasks.append(asyncio.create_task(self._listen(job_id, first[job_id])))
                async with asyncio.timeout(60):
                    await first[job_id].wait()

        await asyncio.gather(*(one(j) for j in job_ids))

    async def _listen(self, job_id: str, first: asyncio.Event) -> None:
        assert self._session is not None
        query = 'subscription { jobUpdates(id: "%s") { version } }' % job_id
        async with self._session.post(
            self.http_url, json={"query": query}, headers={"accept": "text/event-stream"}
        ) as response:
            async for raw in response.content:
                now = time.perf_counter()
                line = raw.decode().strip()
                if line.startswith("data:") and len(line) > 5:
                    data = json.loads(line[5:])
                    if "errors" in data:
                        raise RuntimeError(f"subscription to {job_id} failed: {data}")
                    self.received[job_id].append((now, data["data"]["jobUpdates"]["version"]))
                    first.set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()


def http_streams(redis_url: str, sizes: Sizes) -> dict[str, Any]:
    progress(f"11. subscriptions over Server-Sent Events beside graphql-transport-ws, {sizes.stream_subscribers}")
    redis = Redis.from_url(redis_url)
    n = sizes.stream_subscribers
    env = offline_env("bench-streams") | {"MAX_WATCHED_JOBS_PER_TENANT": str(n)}
    rows = {}
    for name, subscribers in (
        ("graphql-transport-ws", lambda svc: Subscribers(svc.ws_url)),
        ("sse", lambda svc: SseSubscribers(svc.http_url)),
    ):
        with Service(redis_url, workers=0, env=env) as svc:
            row = asyncio.run(_fanout_one_size(svc, redis, n, sizes.one_job_samples, subscribers))
        rows[name] = row
        progress(f"    {name}: {row['kib_per_sub']:.1f} KiB per subscription; one job p50 {row['one_p50_ms']:.2f} ms "
                 f"p99 {row['one_p99_ms']:.2f} ms; all at once p99 {row['all_p99_ms']:.0f} ms")  # fmt: skip
    return {"subscribers": n, "rows": rows}
