"""8. The PostgreSQL job history: how fast ended jobs reach it, what it costs the workers,
and `jobs(first: 50)` over a large history.

Archive: `jobs` queued, then one async worker (concurrency 256, LLM at 0 ms) drains them
with DATABASE_URL set; rows/s is from the first job's end to the moment the last row is
committed (the table polled every 50 ms). Beside it, the same batch with the history off.

Listing: `rows` ended jobs of one tenant written straight into the table (COPY), then
`jobs(first: 50)` requests against one API process: the first page, and pages deep in the
history (from cursors spread over it), one request at a time.
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
from redis import Redis

from gql_service.api.listing import created_ms
from gql_service.api.schema import encode_cursor
from gql_service.cli import migrate
from gql_service.models import JobRecord, JobStage, JobStatus
from tests.embedded_postgres import EmbeddedPostgres
from tests.openai_stub import OpenAIStub
from tests.service import Service

from .async_worker import run_workers
from .harness import pct, progress
from .scenarios import Sizes

LIST = (
    "query($after: String) { jobs(first: 50, after: $after) { edges { node { id status } } pageInfo { endCursor } } }"
)


def job_history(redis_url: str, stub: OpenAIStub, sizes: Sizes) -> dict[str, Any]:
    progress("8. the PostgreSQL job history")
    with EmbeddedPostgres() as pg:
        migrate.upgrade(pg.url)
        archive = _archive(redis_url, stub, sizes, pg)
        listing = _listing(redis_url, sizes, pg)
    return {"archive": archive, "listing": listing}


def _rows(pg: EmbeddedPostgres) -> int:
    with psycopg.connect(pg.url) as conn:
        found = conn.execute("SELECT count(*) FROM jobs").fetchone()
        return int(found[0]) if found else 0


def _archive(redis_url: str, stub: OpenAIStub, sizes: Sizes, pg: EmbeddedPostgres) -> dict[str, Any]:
    redis = Redis.from_url(redis_url)
    stub.reset()
    jobs = sizes.archive_jobs
    off = run_workers(redis, redis_url, stub, worker_class="async", workers=1, concurrency=256, jobs=jobs)
    on = run_workers(redis, redis_url, stub, worker_class="async", workers=1, concurrency=256, jobs=jobs,
                     settings={"DATABASE_URL": pg.url}, until=lambda: _rows(pg) >= jobs)  # fmt: skip
    rows_per_s = jobs / (on["until_at"] - on["first_end_at"])
    progress(f"    {jobs} jobs: {rows_per_s:.0f} rows/s into PostgreSQL; jobs/s with the history "
             f"{on['jobs_per_s']:.1f}, without {off['jobs_per_s']:.1f}")  # fmt: skip
    return {"jobs": jobs, "rows_per_s": rows_per_s, "on": on, "off": off}


def _listing(redis_url: str, sizes: Sizes, pg: EmbeddedPostgres) -> dict[str, Any]:
    n, tenant = sizes.history_rows, "public"
    start = datetime.now(UTC) - timedelta(days=20)
    records = [
        JobRecord(id=f"h{i:07d}", tenant=tenant, status=JobStatus.FINISHED, stage=JobStage.DONE,
                  created_at=start + timedelta(seconds=i * 10), finished_at=start + timedelta(seconds=i * 10 + 2))
        for i in range(n)
    ]  # fmt: skip
    with psycopg.connect(pg.url) as conn, conn.cursor() as cur:
        with cur.copy("COPY jobs (id, tenant, status, stage, version, created_at, updated_at, finished_at, "
                      "attempts) FROM STDIN") as copy:  # fmt: skip
            for r in records:
                copy.write_row((r.id, r.tenant, r.status.value, r.stage.value, 4, r.created_at, r.created_at,
                                r.finished_at, 1))  # fmt: skip
        cur.execute("ANALYZE jobs")
    progress(f"    {n} archived rows written; jobs(first: 50), first and deep pages")
    cursors = [encode_cursor(created_ms(r), r.id) for r in random.Random(1).sample(records, k=sizes.list_requests)]
    env = {"DATABASE_URL": pg.url, "RQ_QUEUE": "bench-history-list"}
    first_ms, deep_ms = [], []
    with Service(redis_url, workers=0, env=env) as svc, httpx.Client(timeout=30) as client:
        for i in range(sizes.list_requests + 10):  # the first 10 of each warm up
            for after, into in ((None, first_ms), (cursors[i % len(cursors)], deep_ms)):
                started = time.perf_counter()
                answer = client.post(svc.http_url, json={"query": LIST, "variables": {"after": after}}).json()
                took = (time.perf_counter() - started) * 1000
                assert len(answer["data"]["jobs"]["edges"]) > 0, answer
                if i >= 10:
                    into.append(took)
    row = {
        "rows": n, "requests": sizes.list_requests,
        "first_p50_ms": pct(first_ms, 50), "first_p99_ms": pct(first_ms, 99),
        "deep_p50_ms": pct(deep_ms, 50), "deep_p99_ms": pct(deep_ms, 99),
    }  # fmt: skip
    progress(f"    first page p50 {row['first_p50_ms']:.1f} ms p99 {row['first_p99_ms']:.1f} ms; deep pages "
             f"p50 {row['deep_p50_ms']:.1f} ms p99 {row['deep_p99_ms']:.1f} ms")  # fmt: skip
    return row
