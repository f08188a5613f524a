"""19. ECONOMY batches beside INTERACTIVE ones: the same `economy_jobs` texts as one batch,
through the provider's Batch API (the stub answering the whole provider batch at its first
poll) and through ordinary calls (the stub at `economy_llm_s` a call), each drained by one
async worker process at concurrency 256, in the same run. Measured: the worker's CPU per job
(its economy loop included), the Redis memory each waiting job takes before any worker runs
(`used_memory` before and after the submissions), and the wall time.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
from redis import Redis

from tests.openai_stub import OpenAIStub
from tests.service import Service, wait_until

from .async_worker import _Group
from .harness import progress
from .scenarios import Sizes, _wait_all_terminal, stub_env

TEXT = "Review {n}: the courier was late, but the support team sorted it out the same day."
CREATE = 'mutation($mode: BatchMode!) { createBatch(input: {name: "bench", mode: $mode}) { id } }'
ADD = "mutation($b: ID!, $inputs: [SubmitTextInput!]!) { submitTexts(batchId: $b, inputs: $inputs) { job { id } } }"
CLOSE = "mutation($id: ID!) { closeBatch(id: $id) { status } }"
CONCURRENCY = 256


def _gql(client: httpx.Client, svc: Service, query: str, **variables: Any) -> dict[str, Any]:
    body = client.post(svc.http_url, json={"query": query, "variables": variables}).json()
    assert "errors" not in body, body
    return body["data"]  # type: ignore[no-any-return]


def _run(redis_url: str, stub: OpenAIStub, mode: str, jobs: int, llm_s: float) -> dict[str, Any]:
    redis = Redis.from_url(redis_url)
    stub.reset()
    stub.latency_s = llm_s
    stub.batches.instant = True  # the provider answers a whole batch at its first poll
    env = stub_env(f"bench-economy-{mode.lower()}", stub) | {
        "WORKER_CONCURRENCY": str(CONCURRENCY), "LLM_STREAM": "false", "ECONOMY_POLL_S": "0.5",
    }  # fmt: skip
    try:
        with Service(redis_url, workers=0, env=env) as svc, httpx.Client(timeout=60) as client:
            batch_id = _gql(client, svc, CREATE, mode=mode)["createBatch"]["id"]
            before = int(redis.info("memory")["used_memory"])
            ids: list[str] = []
            for start in range(0, jobs, 100):
                inputs = [{"text": TEXT.format(n=n)} for n in range(start, min(jobs, start + 100))]
                ids += [a["job"]["id"] for a in _gql(client, svc, ADD, b=batch_id, inputs=inputs)["submitTexts"]]
            per_job = (int(redis.info("memory")["used_memory"]) - before) / jobs
            worker = svc.start_worker(1)
            wait_until(lambda: "Listening on" in worker.output(), timeout_s=90, what="the worker to listen")
            group = _Group(worker.popen.pid)
            started = time.monotonic()
            _gql(client, svc, CLOSE, id=batch_id)  # due: an ECONOMY batch is sent now
            done = _wait_all_terminal(redis, ids, timeout=jobs * max(llm_s, 0.01) + 600)
            wall = time.monotonic() - started
            group.stop()
    finally:
        stub.latency_s = 0.0
        redis.close()
    finished = sum(1 for r in done if r.status.value == "FINISHED")
    row = {
        "mode": mode, "jobs": jobs, "finished": finished, "wall_s": wall, "cpu_ms_per_job": group.cpu_s * 1000 / jobs,
        "redis_bytes_per_waiting_job": per_job, "peak_rss_mib": group.peak_mib,
        "provider_batches": len(stub.batches.created), "interactive_calls": stub.batches.calls_interactive,
    }  # fmt: skip
    progress(
        f"    {mode}: {finished}/{jobs} FINISHED in {wall:.1f} s, {row['cpu_ms_per_job']:.2f} CPU ms/job, "
        f"{per_job:.0f} Redis bytes per waiting job, {row['provider_batches']} provider batch(es), "
        f"{row['interactive_calls']} interactive calls"
    )
    return row


def economy(redis_url: str, stub: OpenAIStub, sizes: Sizes) -> dict[str, Any]:
    jobs, llm_s = sizes.economy_jobs, sizes.economy_llm_s
    progress(f"19. {jobs} texts as an ECONOMY batch beside an INTERACTIVE one (LLM {llm_s * 1000:.0f} ms a call)")
    rows = {mode: _run(redis_url, stub, mode, jobs, llm_s if mode == "INTERACTIVE" else 0.0)
            for mode in ("ECONOMY", "INTERACTIVE")}  # fmt: skip
    eco, inter = rows["ECONOMY"], rows["INTERACTIVE"]
    return {"jobs": jobs, "llm_ms": llm_s * 1000, "concurrency": CONCURRENCY, "rows": rows,
            "cpu_ratio": eco["cpu_ms_per_job"] / inter["cpu_ms_per_job"],
            "memory_ratio": eco["redis_bytes_per_waiting_job"] / inter["redis_bytes_per_waiting_job"]}  # fmt: skip


def report(e: dict[str, Any]) -> list[str]:
    rows = e["rows"]
    eco, inter = rows["ECONOMY"], rows["INTERACTIVE"]
    return [
        "## 19. ECONOMY batches: the provider's Batch API beside ordinary calls",
        "",
        f"{e['jobs']} texts as one batch, then closed, drained by one async worker process (concurrency "
        f"{e['concurrency']}): `ECONOMY` through the stub's Batch API (the whole provider batch answered at its",
        f"first poll) and `INTERACTIVE` through ordinary calls at {e['llm_ms']:.0f} ms each, in the same run. The",
        "Redis memory is `used_memory` after the submissions less before, per job, with no worker running yet.",
        "",
        "| mode | jobs FINISHED | wall s | worker CPU ms per job | Redis bytes per waiting job | provider batches "
        "| interactive calls |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| `{r['mode']}` | {r['finished']} | {r['wall_s']:.1f} | {r['cpu_ms_per_job']:.2f} "
            f"| {r['redis_bytes_per_waiting_job']:.0f} | {r['provider_batches']} | {r['interactive_calls']} |"
            for r in (eco, inter)
        ),
        "",
        f"An `ECONOMY` job took {e['cpu_ratio']:.2f}x the worker CPU of an `INTERACTIVE` one (its economy loop: the",
        "upload, the polls, the output read line by line, then the ordinary attempt that validates the answer) and",
        f"{e['memory_ratio']:.2f}x the Redis memory while it waits (no RQ job yet, only its place in the batch's",
        "waiting set). Its wall time here is the worker's CPU, as the stub answers at once; at a real provider it",
        "is the provider's: minutes to 24 h.",
        "",
    ]
