"""The five scenarios of BENCHMARKS.md. Each returns a dict of figures for the report."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import websockets
from redis import Redis

from gql_service import keys, store
from gql_service.cli.embedded_redis import free_port
from gql_service.models import JobRecord, JobStage, JobStatus
from tests import records as job_records
from tests.openai_stub import OpenAIStub
from tests.service import Proc, Service, answers, wait_until

from .harness import api_pid, api_redis_connections, loadgen, median, parked_jobs, pct, progress, rss_mib

SUBMIT_BODY = {
    "query": "mutation($t: String!) { submitText(input: {text: $t}) { job { id } } }",
    "variables": {"t": "I loved the clinic. Dr. Rao was kind. Waiting time was 10 minutes."},
}
REST_BODY = {"text": "I loved the clinic. Dr. Rao was kind. Waiting time was 10 minutes."}


@dataclass
class Sizes:
    submit_seconds: float
    submit_rounds: int
    concurrency: int
    subscribers: tuple[int, ...]
    one_job_samples: int
    pipeline_jobs: int
    worker_counts: tuple[int, ...]
    slow_llm_s: float
    rounds_per_worker: int
    e2e_jobs: int
    async_jobs: int = 1000
    async_llm_s: float = 1.0
    async_sweep: tuple[int, ...] = (16, 64, 256, 1024)
    rpm: int = 600
    rpm_seconds: float = 60.0
    rpm_jobs: int = 2000
    profile: bool = True  # py-spy on the async worker (needs ptrace; not in the smoke run)
    ceiling_rounds: int = 3  # the async worker against the SDK alone, alternating
    pool_workers: int = 8  # the fork and simple workers beside one async worker
    partial_subscribers: int = 1000
    partial_chunks: int = 400
    partial_seconds: float = 2.0
    archive_jobs: int = 1000
    history_rows: int = 100_000
    list_requests: int = 200
    webhook_jobs: int = 1000
    sentinel_seconds: float = 5.0
    sentinel_rounds: int = 3
    stream_subscribers: int = 1000
    bulk_jobs: int = 10_000
    bulk_llm_s: float = 1.0
    hostile_rounds: int = 50
    tracing_rounds: int = 5
    priority_low_jobs: int = 10_000
    priority_high_jobs: int = 10
    priority_llm_s: float = 0.5
    breaker_jobs: int = 2000
    breaker_rounds: int = 3
    economy_jobs: int = 10_000
    economy_llm_s: float = 1.0
    garbage_jobs: int = 1600
    garbage_clients: int = 9
    garbage_window: int = 100
    garbage_chunks: int = 40
    garbage_stream_s: float = 2.0

    @classmethod
    def only_subscribers(cls, counts: tuple[int, ...]) -> Sizes:
        full = cls.full()
        full.subscribers = counts
        return full

    @classmethod
    def full(cls) -> Sizes:
        return cls(5.0, 3, 32, (1000, 5000, 10000), 200, 200, (1, 4, 8), 0.5, 4, 200)

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(
            submit_seconds=0.5, submit_rounds=1, concurrency=4, subscribers=(10, 20), one_job_samples=5,
            pipeline_jobs=5, worker_counts=(1, 2), slow_llm_s=0.05, rounds_per_worker=2, e2e_jobs=5,
            async_jobs=20, async_llm_s=0.05, async_sweep=(8,), rpm=60, rpm_seconds=3.0, rpm_jobs=20,
            profile=False, partial_subscribers=20, partial_chunks=40, partial_seconds=0.5, archive_jobs=20,
            history_rows=500, list_requests=20, webhook_jobs=20, sentinel_seconds=0.5, sentinel_rounds=1,
            stream_subscribers=20, bulk_jobs=50, bulk_llm_s=0.05, hostile_rounds=2, tracing_rounds=1,
            priority_low_jobs=200, priority_high_jobs=3, priority_llm_s=0.05, breaker_jobs=20, breaker_rounds=1,
            economy_jobs=50, economy_llm_s=0.05, garbage_jobs=20, garbage_clients=2, garbage_window=10,
            garbage_chunks=20, garbage_stream_s=0.3, ceiling_rounds=1, pool_workers=2,
        )  # fmt: skip


def offline_env(queue: str) -> dict[str, str]:
    return {"RQ_QUEUE": queue, "LLM_PROVIDER": "offline"}


def stub_env(queue: str, stub: OpenAIStub) -> dict[str, str]:
    return {"RQ_QUEUE": queue, "LLM_PROVIDER": "openai", "OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": stub.base_url}


# -- 1. submitText against the REST baseline ----------------------------------------------
def submit_throughput(redis_url: str, sizes: Sizes) -> dict[str, Any]:
    """submitText beside the REST baseline, and the same mutation named by `documentId` (a
    trusted document, looked up in the manifest loaded at start-up), in alternating rounds."""
    progress("1. submitText vs the REST baseline: starting both APIs (no workers)")
    rest_port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "RQ_QUEUE": "bench-rest"}
    rest = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench.rest_baseline:app",
         "--port", str(rest_port), "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    rest_url = f"http://127.0.0.1:{rest_port}/llm/submit"
    results: dict[str, list[dict[str, float]]] = {"graphql": [], "rest": [], "by_id": [], "job": []}
    digest = hashlib.sha256(SUBMIT_BODY["query"].encode()).hexdigest()
    by_id = {"documentId": f"sha256:{digest}", "variables": SUBMIT_BODY["variables"]}
    try:
        with tempfile.TemporaryDirectory() as folder:
            manifest = Path(folder) / "persisted-documents.json"
            manifest.write_text(json.dumps({digest: SUBMIT_BODY["query"]}))
            env = {**offline_env("bench-gql"), "TRUSTED_DOCUMENTS": str(manifest)}
            with Service(redis_url, workers=0, env=env) as svc:
                wait_until(lambda: answers(rest_url.replace("/llm/submit", "/docs")), what="the REST baseline")
                rounds = (("graphql", svc.http_url, SUBMIT_BODY), ("rest", rest_url, REST_BODY),
                          ("by_id", svc.http_url, by_id))  # fmt: skip
                # One unmeasured round each: the first seconds of either server are slower.
                for _, url, body in rounds:
                    loadgen(url, body, concurrency=sizes.concurrency, duration=sizes.submit_seconds / 2)
                for round_ in range(sizes.submit_rounds):
                    # Alternate, so all see the same machine conditions.
                    for name, url, body in rounds:
                        stats = loadgen(url, body, concurrency=sizes.concurrency, duration=sizes.submit_seconds)
                        results[name].append(stats)
                        progress(
                            f"    round {round_ + 1} {name:8s} {stats['rps']:7.0f} req/s  p50 {stats['p50_ms']:.1f} ms"
                        )
                job_id = httpx.post(svc.http_url, json=SUBMIT_BODY).json()["data"]["submitText"]["job"]["id"]
                job_body = {
                    "query": "query($id: ID!) { job(id: $id) { id status stage version } }",
                    "variables": {"id": job_id},
                }
                stats = loadgen(svc.http_url, job_body, concurrency=sizes.concurrency, duration=sizes.submit_seconds)
                results["job"].append(stats)
                progress(f"    job query {stats['rps']:7.0f} req/s")
    finally:
        rest.terminate()
        rest.wait(10)

    def summary(runs: list[dict[str, float]]) -> dict[str, float]:
        return {k: median(r[k] for r in runs) for k in ("rps", "p50_ms", "p99_ms")} | {
            "errors": sum(r["errors"] for r in runs)
        }

    def ratios(name: str) -> list[float]:
        return [g["rps"] / r["rps"] for g, r in zip(results[name], results["rest"], strict=True)]

    return {
        "graphql": summary(results["graphql"]), "rest": summary(results["rest"]), "by_id": summary(results["by_id"]),
        "job": summary(results["job"]), "ratio": median(ratios("graphql")), "ratios": ratios("graphql"),
        "by_id_ratio": median(ratios("by_id")), "by_id_ratios": ratios("by_id"),
    }  # fmt: skip


# -- 2. subscription fan-out ----------------------------------------------------------------
class Subscribers:
    """N websockets, one jobUpdates subscription each, timestamps of every update received."""

    def __init__(self, ws_url: str) -> None:
        self.ws_url = ws_url
        self.sockets: list[Any] = []
        self.received: dict[str, list[tuple[float, int]]] = {}
        self.ready = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def open(self, job_ids: list[str], parallel: int = 50) -> None:
        sem = asyncio.Semaphore(parallel)
        first: dict[str, asyncio.Event] = {j: asyncio.Event() for j in job_ids}

        async def one(job_id: str) -> None:
            # At most `parallel` subscriptions wait for their snapshot at once, as a client
            # pool would: the API bounds a tenant's snapshot reads, and a burst of 10,000
            # would be answered SERVICE_UNAVAILABLE past REDIS_TIMEOUT_S.
            async with sem:
                ws = await websockets.connect(self.ws_url, subprotocols=["graphql-transport-ws"], max_queue=None)  # type: ignore[list-item]
                await ws.send('{"type":"connection_init"}')
                await ws.recv()
                query = 'subscription { jobUpdates(id: "%s") { version } }' % job_id
                await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": query}}))
                self.sockets.append(ws)
                self.received[job_id] = []
                self._tasks.append(asyncio.create_task(self._listen(ws, job_id, first[job_id])))
                async with asyncio.timeout(60):
                    await first[job_id].wait()

        await asyncio.gather(*(one(j) for j in job_ids))

    async def _listen(self, ws: Any, job_id: str, first: asyncio.Event) -> None:
        retries = 0
        async for raw in ws:
            now = time.perf_counter()
            message = json.loads(raw)
            if message.get("type") == "error" or (message.get("payload") or {}).get("errors"):
                # SERVICE_UNAVAILABLE ("try again shortly") while thousands subscribe at
                # once: subscribe again, as a client would.
                retries += 1
                if retries > 5:
                    raise RuntimeError(f"subscription to {job_id} failed: {message}")
                await asyncio.sleep(0.5 * retries)
                query = 'subscription { jobUpdates(id: "%s") { version } }' % job_id
                await ws.send(json.dumps({"id": f"r{retries}", "type": "subscribe", "payload": {"query": query}}))
                continue
            if message.get("type") == "next":
                self.received[job_id].append((now, message["payload"]["data"]["jobUpdates"]["version"]))
                first.set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)


def _bump(job: JobRecord) -> JobRecord:
    stage = JobStage.VALIDATING if job.stage is JobStage.CALLING_LLM else JobStage.CALLING_LLM
    return job.model_copy(update={"status": JobStatus.STARTED, "stage": stage})


async def _wait_version(subs: Subscribers, job_ids: list[str], version: int, timeout: float = 60) -> None:
    deadline = time.perf_counter() + timeout
    while any(not subs.received[j] or subs.received[j][-1][1] < version for j in job_ids):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"updates to version {version} did not all arrive")
        await asyncio.sleep(0.005)


async def _fanout_one_size(
    svc: Service, redis: Redis, n: int, samples: int, subscribers: Callable[[Service], Any] | None = None
) -> dict[str, float]:
    """`subscribers(svc)`: the clients (default: graphql-transport-ws, a socket each)."""
    with parked_jobs(redis, n, f"fan{n}-{time.monotonic_ns()}") as job_ids:
        pid = api_pid(svc)
        base_rss = rss_mib(pid)
        subs = subscribers(svc) if subscribers else Subscribers(svc.ws_url)
        t0 = time.perf_counter()
        await subs.open(job_ids)
        opened_s = time.perf_counter() - t0
        await asyncio.sleep(1.0)  # let allocations settle before reading memory
        per_sub_kib = (rss_mib(pid) - base_rss) * 1024 / n
        connections = api_redis_connections(redis)
        progress(
            f"    {n} subscriptions open in {opened_s:.1f} s; {per_sub_kib:.1f} KiB each; "
            f"{connections} Redis connections"
        )

        # One job changes while every other subscription idles.
        one: list[float] = []
        target = job_ids[n // 2]
        for _ in range(samples):
            before = len(subs.received[target])
            start = time.perf_counter()
            await asyncio.to_thread(job_records.update_job, redis, target, _bump, ttl_s=3600)
            while len(subs.received[target]) == before:
                await asyncio.sleep(0)
            one.append((subs.received[target][-1][0] - start) * 1000)

        # Every job changes at once: one pipeline of N transitions.
        version = 2 + 0  # parked jobs are at version 1 (the target is higher; it is excluded)
        others = [j for j in job_ids if j != target]
        script = redis.register_script(store._CAS_LUA)
        start = time.perf_counter()
        with redis.pipeline(transaction=False) as pipe:
            for job_id in others:
                current = JobRecord(id=job_id)
                new = _bump(current).model_copy(update={"version": 2})
                keys_, args = store.cas_args(current, new, 3600, f"bench-{job_id}")
                script(keys=keys_, args=args, client=pipe)
            await asyncio.to_thread(pipe.execute)
        await _wait_version(subs, others, version)
        everyone = [(subs.received[j][-1][0] - start) * 1000 for j in others]
        await subs.close()
        wait_until(lambda: svc_subscriptions(redis) == 0, timeout_s=60, what="subscriptions to close")
        return {
            "subscribers": n,
            "open_s": opened_s,
            "kib_per_sub": per_sub_kib,
            "rss_mib": base_rss + per_sub_kib * n / 1024,
            "redis_connections": connections,
            "one_p50_ms": pct(one, 50),
            "one_p99_ms": pct(one, 99),
            "all_p50_ms": pct(everyone, 50),
            "all_p99_ms": pct(everyone, 99),
        }


def svc_subscriptions(redis: Redis) -> int:
    channels = redis.pubsub_channels("gqls:job:*")
    return len(channels)


def fanout(redis_url: str, sizes: Sizes) -> list[dict[str, float]]:
    progress("2. subscription fan-out on one API process")
    redis = Redis.from_url(redis_url)
    rows = []
    # One tenant holds every subscription here: let it watch that many jobs.
    env = offline_env("bench-fanout") | {"MAX_WATCHED_JOBS_PER_TENANT": str(max(sizes.subscribers))}
    with Service(redis_url, workers=0, env=env) as svc:
        for n in sizes.subscribers:
            rows.append(asyncio.run(_fanout_one_size(svc, redis, n, sizes.one_job_samples)))
            p = rows[-1]
            progress(
                f"    one job p50 {p['one_p50_ms']:.2f} ms p99 {p['one_p99_ms']:.2f} ms; "
                f"all at once p99 {p['all_p99_ms']:.0f} ms"
            )
    return rows


# -- 3. worker pipeline -----------------------------------------------------------------------
def _submit_many(svc: Service, count: int) -> list[str]:
    with httpx.Client() as client:
        return [
            client.post(svc.http_url, json=SUBMIT_BODY).json()["data"]["submitText"]["job"]["id"] for _ in range(count)
        ]


def _wait_all_terminal(redis: Redis, ids: list[str], timeout: float) -> list[JobRecord]:
    """Every job's record once all have ended. Polled lightly, in one pipeline for the jobs not
    yet ended, each record's status read with orjson: this process also runs the stub, and a
    poll that read and validated every record (1,000 of them every 50 ms) held the GIL from
    the stub and a core from the workers measured, which the SDK alone never had to share."""
    pending, deadline = list(ids), time.monotonic() + timeout
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for all jobs to end ({len(pending)} of {len(ids)} still running)")
        with redis.pipeline(transaction=False) as pipe:
            for job_id in pending:
                pipe.hget(keys.job(job_id), "d")
            raws = pipe.execute()
        pending = [i for i, raw in zip(pending, raws, strict=True) if raw is None or not _ended(raw)]
        if pending:
            time.sleep(0.1)
    done = [r for r in (store.get_job_sync(redis, i) for i in ids) if r is not None]
    failed = [r for r in done if r.status is not JobStatus.FINISHED]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs failed, e.g. {failed[0].error}")
    return done


def _ended(raw: bytes) -> bool:
    return JobStatus(orjson.loads(raw)["status"]).terminal


def _llm_round_trip_ms(stub: OpenAIStub, samples: int = 50) -> float:
    from gql_service.worker.llm.openai_provider import OpenAIProvider, make_client

    provider = OpenAIProvider(make_client(api_key="k", base_url=stub.base_url, timeout_s=10), model="bench")
    times = []

    async def calls() -> None:
        for _ in range(samples):
            t0 = time.perf_counter()
            await provider.extract("I loved the clinic.")
            times.append((time.perf_counter() - t0) * 1000)
        await provider.aclose()

    asyncio.run(calls())
    return median(times)


def _pipeline_env(queue: str, stub: OpenAIStub, worker_class: str) -> dict[str, str]:
    return stub_env(queue, stub) | {"WORKER_CLASS": worker_class}


def _one_worker(
    redis: Redis, redis_url: str, stub: OpenAIStub, sizes: Sizes, worker_class: str, rtt_ms: float
) -> dict[str, Any]:
    with Service(redis_url, workers=0, env=_pipeline_env(f"bench-pipe-{worker_class}", stub, worker_class)) as svc:
        ids = _submit_many(svc, sizes.pipeline_jobs)
        svc.start_worker(1)
        done = _wait_all_terminal(redis, ids, timeout=120)
    finished = sorted(r.finished_at.timestamp() for r in done if r.finished_at)
    started = min(r.started_at.timestamp() for r in done if r.started_at)
    gaps_ms = [(b - a) * 1000 for a, b in zip(finished, finished[1:], strict=False)]
    overhead = [g - rtt_ms for g in gaps_ms]
    row = {
        "worker_class": worker_class, "jobs": len(done), "jobs_per_s": len(done) / (finished[-1] - started),
        "llm_rtt_ms": rtt_ms, "overhead_p50_ms": pct(overhead, 50), "overhead_p99_ms": pct(overhead, 99),
    }  # fmt: skip
    progress(
        f"    {worker_class:6s} 1 worker, LLM 0 ms: {row['jobs_per_s']:.1f} jobs/s, "
        f"overhead p50 {row['overhead_p50_ms']:.1f} ms"
    )
    return row


def _scaling(
    redis: Redis, redis_url: str, stub: OpenAIStub, sizes: Sizes, worker_class: str, workers: int
) -> dict[str, Any]:
    count = workers * sizes.rounds_per_worker
    env = _pipeline_env(f"bench-scale-{worker_class}-{workers}", stub, worker_class)
    with Service(redis_url, workers=0, env=env) as svc:
        ids = _submit_many(svc, count)
        svc.start_worker(workers)
        done = _wait_all_terminal(redis, ids, timeout=120)
    first = min(r.started_at.timestamp() for r in done if r.started_at)
    last = max(r.finished_at.timestamp() for r in done if r.finished_at)
    rate = count / (last - first)
    ideal = workers / sizes.slow_llm_s
    progress(
        f"    {worker_class:6s} {workers} workers, LLM {sizes.slow_llm_s * 1000:.0f} ms: {rate / ideal:.0%} of ideal"
    )
    return {"worker_class": worker_class, "workers": workers, "jobs": count, "jobs_per_s": rate, "ideal": ideal,
            "efficiency": rate / ideal}  # fmt: skip


def worker_pipeline(redis_url: str, stub: OpenAIStub, sizes: Sizes) -> dict[str, Any]:
    """RQ's forking Worker (the default) and SimpleWorker (WORKER_CLASS=simple), side by side."""
    progress("3. worker pipeline")
    redis = Redis.from_url(redis_url)
    stub.latency_s = 0.0
    rtt_ms = _llm_round_trip_ms(stub)
    classes = ("fork", "simple")
    one = [_one_worker(redis, redis_url, stub, sizes, c, rtt_ms) for c in classes]
    stub.latency_s = sizes.slow_llm_s
    scaling = [_scaling(redis, redis_url, stub, sizes, c, w) for c in classes for w in sizes.worker_counts]
    stub.latency_s = 0.0
    return {"one_worker": one, "scaling": scaling, "slow_llm_ms": sizes.slow_llm_s * 1000}


# -- 4. end to end ----------------------------------------------------------------------------
async def _e2e_client(svc: Service, count: int, latencies: list[float]) -> None:
    async with websockets.connect(svc.ws_url, subprotocols=["graphql-transport-ws"]) as ws, httpx.AsyncClient() as http:  # type: ignore[list-item]
        await ws.send('{"type":"connection_init"}')
        await ws.recv()
        for n in range(count):
            start = time.perf_counter()
            reply = await http.post(svc.http_url, json=SUBMIT_BODY)
            job_id = reply.json()["data"]["submitText"]["job"]["id"]
            query = 'subscription { jobUpdates(id: "%s") { stage } }' % job_id
            await ws.send(json.dumps({"id": str(n), "type": "subscribe", "payload": {"query": query}}))
            while True:
                message = json.loads(await ws.recv())
                if message["type"] == "next" and message["payload"]["data"]["jobUpdates"]["stage"] == "DONE":
                    latencies.append((time.perf_counter() - start) * 1000)
                if message["type"] == "complete" and message["id"] == str(n):
                    break


def end_to_end(
    redis_url: str, stub: OpenAIStub, sizes: Sizes, llm_ms: float = 100.0, clients: int = 4
) -> dict[str, float]:
    progress(f"4. end to end: submit -> DONE on a subscription, {clients} clients, LLM {llm_ms:.0f} ms")
    stub.latency_s = llm_ms / 1000
    latencies: list[float] = []
    with Service(redis_url, workers=clients, env=stub_env("bench-e2e", stub)) as svc:

        async def run() -> None:
            await asyncio.gather(*(_e2e_client(svc, sizes.e2e_jobs // clients or 1, latencies) for _ in range(clients)))

        asyncio.run(run())
    stub.latency_s = 0.0
    result = {"jobs": len(latencies), "llm_ms": llm_ms, "p50_ms": pct(latencies, 50), "p99_ms": pct(latencies, 99)}
    result |= {"p50_minus_llm_ms": result["p50_ms"] - llm_ms, "p99_minus_llm_ms": result["p99_ms"] - llm_ms}
    progress(f"    p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms (LLM {llm_ms:.0f} ms of it)")
    return result


# -- 5. scale-out -----------------------------------------------------------------------------
def scale_out(redis_url: str, sizes: Sizes) -> dict[str, Any]:
    progress("5. scale-out: two API processes and a worker pool on one Redis")
    with Service(redis_url, workers=2, env=offline_env("bench-scale-out")) as a:
        b_port = free_port()
        b = Proc("api-b", ["serve", "--port", str(b_port)], a.env)
        a.procs.append(b)
        b_url = f"http://127.0.0.1:{b_port}/graphql"
        wait_until(lambda: answers(b_url.replace("/graphql", "/healthz")), what="the second API")

        async def cross() -> list[str]:
            job_id = httpx.post(a.http_url, json=SUBMIT_BODY).json()["data"]["submitText"]["job"]["id"]
            stages = []
            async with websockets.connect(b_url.replace("http", "ws"), subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
                await ws.send('{"type":"connection_init"}')
                await ws.recv()
                query = 'subscription { jobUpdates(id: "%s") { stage } }' % job_id
                await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": query}}))
                while (message := json.loads(await ws.recv()))["type"] == "next":
                    stages.append(message["payload"]["data"]["jobUpdates"]["stage"])
            return stages

        stages = asyncio.run(cross())
        progress(f"    submitted on A, followed on B: {' -> '.join(stages)}")
        one = loadgen(a.http_url, SUBMIT_BODY, concurrency=sizes.concurrency, duration=sizes.submit_seconds)

        def both() -> list[dict[str, float]]:
            with concurrent_futures() as pool:
                futures = [
                    pool.submit(
                        loadgen, url, SUBMIT_BODY, concurrency=sizes.concurrency // 2, duration=sizes.submit_seconds
                    )
                    for url in (a.http_url, b_url)
                ]
                return [f.result() for f in futures]

        two = both()
    total_two = sum(s["rps"] for s in two)
    progress(f"    one API {one['rps']:.0f} req/s; two APIs {total_two:.0f} req/s ({total_two / one['rps']:.2f}x)")
    return {
        "cross_stages": stages,
        "one_api_rps": one["rps"],
        "two_api_rps": total_two,
        "ratio": total_two / one["rps"],
    }


def concurrent_futures() -> Any:
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=2)
