"""20. Fan-out without garbage: many streamed frames to a few subscribers, the API's memory and
its event loop's longest stall.

One API process. `jobs` jobs are queued, then `clients` websockets each follow them `window`
at a time with `jobsUpdates(ids: [...], partial: true)` (the next window once the last has
ended), while one async worker (concurrency `window`) runs them against the stub, which
streams each answer in `chunks` pieces over `stream_s` seconds. Every frame a client gets is
counted; the API's resident memory is sampled every 100 ms; a probe in a process of its own
(bench/stall_probe.py) times a `/healthz` every 20 ms, so a collector's pause (or any other
stall of the API's loop) shows as its slowest answer.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from typing import Any

import psutil
import websockets

from tests.openai_stub import OpenAIStub
from tests.service import Service

from .async_worker import _submit_texts
from .harness import api_pid, progress
from .scenarios import Sizes, stub_env

FOLLOW = (
    "subscription($ids: [ID!]!) { jobsUpdates(ids: $ids, partial: true) "
    "{ id version stage partialSeq partial { summary sentiment tags } } }"
)
MIB = 1024 * 1024
# The load of the issue that found the garbage: 9 clients, windows of 100, about 1,600 jobs.
TARGET_GROWTH_MIB = 100
TARGET_STALL_MS = 250


class _Rss:
    """The API process's resident memory, sampled every 100 ms from a thread."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.start = self.peak = self.proc.memory_info().rss / MIB
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.1):
            self.peak = max(self.peak, self.proc.memory_info().rss / MIB)

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return self.proc.memory_info().rss / MIB


async def _client(ws_url: str, windows: list[list[str]], counts: dict[str, int]) -> None:
    async with websockets.connect(ws_url, subprotocols=["graphql-transport-ws"], max_queue=None) as ws:  # type: ignore[list-item]
        await ws.send('{"type":"connection_init"}')
        await ws.recv()
        for n, ids in enumerate(windows):
            payload = {"query": FOLLOW, "variables": {"ids": ids}}
            await ws.send(json.dumps({"id": f"w{n}", "type": "subscribe", "payload": payload}))
            async for raw in ws:
                message = json.loads(raw)
                if message["type"] == "complete":
                    break
                if message["type"] != "next" or message["payload"].get("errors"):
                    raise RuntimeError(f"subscription failed: {str(message)[:300]}")
                counts["frames"] += 1
                if message["payload"]["data"]["jobsUpdates"]["partialSeq"] is not None:
                    counts["partial"] += 1


def fanout_memory(redis_url: str, stub: OpenAIStub, sizes: Sizes) -> dict[str, Any]:
    jobs, clients, window = sizes.garbage_jobs, sizes.garbage_clients, sizes.garbage_window
    progress(f"20. fan-out without garbage: {clients} clients, {jobs} streamed jobs, {window} at a time")
    stub.reset()
    stub.stream_chunks, stub.stream_seconds = sizes.garbage_chunks, sizes.garbage_stream_s
    with Service(redis_url, workers=0, env=stub_env("bench-garbage", stub)) as svc:
        ids = _submit_texts(svc, jobs)
        windows = [ids[i : i + window] for i in range(0, len(ids), window)]
        api = psutil.Process(api_pid(svc))
        rss = _Rss(api.pid)
        cpu_before = sum(api.cpu_times()[:2])
        probe = subprocess.Popen(
            [sys.executable, "-m", "bench.stall_probe", "--url", svc.http_url.replace("/graphql", "/healthz")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        counts = {"frames": 0, "partial": 0}

        async def follow() -> float:
            tasks = [asyncio.create_task(_client(svc.ws_url, windows, counts)) for _ in range(clients)]
            svc.start_worker(1, env={"WORKER_CLASS": "async", "WORKER_CONCURRENCY": str(window)})
            start = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*tasks), 600)
            return time.perf_counter() - start

        seconds = asyncio.run(follow())
        stall = json.loads(probe.communicate("", timeout=60)[0])
        cpu_s = sum(api.cpu_times()[:2]) - cpu_before
        end = rss.stop()
    row = {
        "jobs": jobs, "clients": clients, "window": window, "chunks": sizes.garbage_chunks,
        "stream_s": sizes.garbage_stream_s, "seconds": seconds, "frames": counts["frames"],
        "partial_frames": counts["partial"], "frames_per_s": counts["frames"] / seconds,
        "rss_start_mib": rss.start, "rss_peak_mib": rss.peak, "rss_end_mib": end,
        "growth_mib": rss.peak - rss.start, "healthz": stall, "api_cpu_s": cpu_s,
        "api_cpu_us_per_frame": cpu_s * 1e6 / max(counts["frames"], 1),
    }  # fmt: skip
    progress(
        f"    {counts['frames']} frames in {seconds:.1f} s ({row['frames_per_s']:.0f}/s), API RSS "
        f"{rss.start:.0f} -> peak {rss.peak:.0f} MiB, slowest /healthz {stall['max_ms']:.0f} ms"
    )
    return row


def report(r: dict[str, Any]) -> list[str]:
    h = r["healthz"]
    return [
        "## 20. Fan-out without garbage: streamed frames, the API's memory and its longest stall",
        "",
        f"One API process; {r['jobs']} jobs queued, then {r['clients']} websockets each follow them "
        f"{r['window']} at a time with `jobsUpdates(ids: [...], partial: true)` while one async worker "
        f"(concurrency {r['window']}) runs them against the stub, which streams each answer in {r['chunks']} "
        f"pieces over {r['stream_s']:.1f} s. RSS is sampled every 100 ms; a probe in its own process "
        "(`bench/stall_probe.py`) times a `/healthz` every 20 ms: its slowest answer is the longest stall "
        "of the API's event loop (a collector's pause shows there).",
        "",
        "| frames delivered | of them partial | seconds | frames/s | API RSS start / peak / end MiB | growth MiB "
        "| `/healthz` p50 / p99 / max ms | API CPU µs per frame |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {r['frames']:,} | {r['partial_frames']:,} | {r['seconds']:.1f} | {r['frames_per_s']:,.0f} "
        f"| {r['rss_start_mib']:.0f} / {r['rss_peak_mib']:.0f} / {r['rss_end_mib']:.0f} | {r['growth_mib']:.0f} "
        f"| {h['p50_ms']:.1f} / {h['p99_ms']:.1f} / {h['max_ms']:.0f} | {r['api_cpu_us_per_frame']:.0f} |",
        "",
        f"Targets: memory growth <= {TARGET_GROWTH_MIB} MiB: {_mark(r['growth_mib'] <= TARGET_GROWTH_MIB)}; "
        f"no `/healthz` over {TARGET_STALL_MS} ms: {_mark(h['max_ms'] <= TARGET_STALL_MS)}. Before "
        "`gql_service/api/executor.py` (graphql-core's per-event executors kept every frame alive until "
        "the subscription ended, then left them to the cycle collector), the same load took the API from "
        "80 to 330 MiB with a 279 ms `/healthz`.",
        "",
    ]


def _mark(ok: bool) -> str:
    return "met" if ok else "**missed**"
