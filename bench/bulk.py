"""12. A file of texts to a file of results: `gql-service submit --file … --output …`
beside the same work done by hand with `submitTexts` (chunks of 100, then the results read
back with `nodes(ids:)` as the jobs end), with the LLM stub at `bulk_llm_s` and one async
worker process at concurrency 256, in the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import httpx

from tests.openai_stub import OpenAIStub
from tests.service import Service, wait_until

from .harness import progress
from .scenarios import Sizes, stub_env

TEXT = "Review {n}: the courier was late, but the support team sorted it out the same day."
SUBMIT = "mutation($inputs: [SubmitTextInput!]!) { submitTexts(inputs: $inputs) { job { id } } }"
NODES = "query($ids: [ID!]!) { nodes(ids: $ids) { ... on Job { id status result { summary } error { code } } } }"


def _env(queue: str, stub: OpenAIStub) -> dict[str, str]:
    return stub_env(queue, stub) | {"WORKER_CONCURRENCY": "256"}


def _with_the_cli(redis_url: str, stub: OpenAIStub, jobs: int, tmp: Path) -> dict[str, Any]:
    source, results = tmp / "texts.txt", tmp / "results.jsonl"
    source.write_text("".join(TEXT.format(n=n) + "\n" for n in range(jobs)))
    with Service(redis_url, workers=0, env=_env("bench-bulk-cli", stub)) as svc:
        worker = svc.start_worker(1)
        wait_until(lambda: "Listening on" in worker.output(), timeout_s=90, what="the worker to listen")
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "gql_service", "submit", "--file", str(source), "--output", str(results)],
            env={**os.environ, "GQLS_URL": svc.http_url}, capture_output=True, text=True, timeout=jobs + 300,
        )  # fmt: skip
        wall = time.monotonic() - started
    lines = results.read_text().splitlines()
    assert done.returncode == 0 and len(lines) == jobs, done.stderr[-2000:]
    return {"wall_s": wall, "jobs_per_s": jobs / wall}


def _by_hand(redis_url: str, stub: OpenAIStub, jobs: int, tmp: Path) -> dict[str, Any]:
    results = tmp / "by-hand.jsonl"
    with Service(redis_url, workers=0, env=_env("bench-bulk-hand", stub)) as svc:
        worker = svc.start_worker(1)
        wait_until(lambda: "Listening on" in worker.output(), timeout_s=90, what="the worker to listen")
        started = time.monotonic()
        with httpx.Client(timeout=60) as client, results.open("w") as out:
            pending: list[str] = []
            for start in range(0, jobs, 100):
                inputs = [{"text": TEXT.format(n=n)} for n in range(start, min(jobs, start + 100))]
                body = client.post(svc.http_url, json={"query": SUBMIT, "variables": {"inputs": inputs}}).json()
                pending += [p["job"]["id"] for p in body["data"]["submitTexts"]]
            while pending:
                still = []
                for start in range(0, len(pending), 100):
                    ids = pending[start : start + 100]
                    found = client.post(svc.http_url, json={"query": NODES, "variables": {"ids": ids}}).json()
                    for job in found["data"]["nodes"]:
                        if job["status"] in ("FINISHED", "FAILED", "CANCELED"):
                            out.write(json.dumps(job) + "\n")
                        else:
                            still.append(job["id"])
                pending = still
                if pending:
                    time.sleep(0.5)
        wall = time.monotonic() - started
    return {"wall_s": wall, "jobs_per_s": jobs / wall}


def bulk(redis_url: str, stub: OpenAIStub, sizes: Sizes) -> dict[str, Any]:
    jobs = sizes.bulk_jobs
    progress(f"12. {jobs} texts from a file to a file of results, LLM {sizes.bulk_llm_s * 1000:.0f} ms")
    stub.reset()
    stub.latency_s = sizes.bulk_llm_s
    with TemporaryDirectory() as tmp:
        cli = _with_the_cli(redis_url, stub, jobs, Path(tmp))
        progress(f"    submit --file --output: {cli['wall_s']:.1f} s, {cli['jobs_per_s']:.1f} jobs/s")
        hand = _by_hand(redis_url, stub, jobs, Path(tmp))
        progress(f"    submitTexts by hand, then nodes(ids:): {hand['wall_s']:.1f} s, {hand['jobs_per_s']:.1f} jobs/s")
    stub.latency_s = 0.0
    return {"jobs": jobs, "llm_ms": sizes.bulk_llm_s * 1000, "cli": cli, "by_hand": hand,
            "ratio": cli["jobs_per_s"] / hand["jobs_per_s"]}  # fmt: skip
