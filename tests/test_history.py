"""The PostgreSQL job history (DATABASE_URL): a real PostgreSQL server of the tests' own,
real uvicorn and RQ worker processes, and the outbox that loses no ended job on the way."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
from gql import Client, GraphQLRequest, gql
from gql.transport.websockets import WebsocketsTransport
from redis import Redis

from gql_service import history, keys
from gql_service.cli import migrate
from gql_service.cli.embedded_redis import EmbeddedRedis
from gql_service.models import JobRecord, JobStage, JobStatus

from .clients import post, submit
from .embedded_postgres import EmbeddedPostgres
from .service import Service, wait_until

KEY_A, KEY_B, KEY_C = "key-aaaaaaaa", "key-bbbbbbbb", "key-cccccccc"
API_KEYS = json.dumps({KEY_A: "tenant-a", KEY_B: "tenant-b", KEY_C: "tenant-c"})
JOB = "query($id: ID!) { job(id: $id) { id status stage version result { summary sentiment tags } } }"
AS_A, AS_B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
AS_C = {"Authorization": f"Bearer {KEY_C}"}
LIST = """query($first: Int!, $after: String, $from: DateTime, $to: DateTime) {
  jobs(first: $first, after: $after, createdAfter: $from, createdBefore: $to) {
    edges { node { id status createdAt } } pageInfo { hasNextPage endCursor }
  }
}"""


def rows(pg: EmbeddedPostgres, *job_ids: str) -> dict[str, dict[str, object]]:
    with psycopg.connect(pg.url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute("SELECT id, status, version, text, result, priority FROM jobs WHERE id = ANY(%s)", (list(job_ids),))
        return {r["id"]: r for r in cur.fetchall()}


def forget_in_redis(redis: Redis, job_id: str) -> None:
    """As if RESULT_TTL_S had passed."""
    assert redis.delete(keys.job(job_id)) == 1


@pytest.fixture(scope="module")
def archived_service(e2e_redis: str, postgres: EmbeddedPostgres) -> Iterator[Service]:
    env = {"DATABASE_URL": postgres.url, "API_KEYS": API_KEYS, "RQ_QUEUE": "llm-history"}
    with Service(e2e_redis, workers=1, env=env) as svc:
        yield svc


def finished(svc: Service, job_id: str, headers: dict[str, str]) -> dict[str, object]:
    def ended() -> bool:
        job = post(svc, JOB, headers=headers, id=job_id).json()["data"]["job"]
        return job is not None and job["status"] in ("FINISHED", "FAILED")

    wait_until(ended, timeout_s=30, what=f"job {job_id} to end")
    job: dict[str, object] = post(svc, JOB, headers=headers, id=job_id).json()["data"]["job"]
    return job


def test_an_ended_job_is_read_from_the_history_once_redis_has_forgotten_it(
    archived_service: Service, postgres: EmbeddedPostgres, e2e_redis: str
) -> None:
    job_id = submit(archived_service, "I loved the clinic. Dr. Rao was kind.", headers=AS_A)
    live = finished(archived_service, job_id, AS_A)
    wait_until(lambda: job_id in rows(postgres, job_id), timeout_s=30, what="the job's row")
    row = rows(postgres, job_id)[job_id]
    assert (row["status"], row["version"]) == ("FINISHED", live["version"])
    assert row["text"] == "I loved the clinic. Dr. Rao was kind."  # ARCHIVE_TEXT defaults to true
    forget_in_redis(Redis.from_url(e2e_redis), job_id)
    assert post(archived_service, JOB, headers=AS_A, id=job_id).json()["data"]["job"] == live
    # Another tenant's archived job is as missing as one that never was.
    assert post(archived_service, JOB, headers=AS_B, id=job_id).json()["data"]["job"] is None
    # A subscription to it gets the final state and completes, as for a late subscriber.
    follow = "subscription($id: ID!) { jobUpdates(id: $id) { id version status } }"

    async def frames() -> list[dict[str, object]]:
        transport = WebsocketsTransport(
            url=archived_service.ws_url, subprotocols=[WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL],
            init_payload={"Authorization": f"Bearer {KEY_A}"},
        )  # fmt: skip
        async with asyncio.timeout(20), Client(transport=transport) as session:
            request = GraphQLRequest(gql(follow), variable_values={"id": job_id})
            return [data["jobUpdates"] async for data in session.subscribe(request)]

    assert asyncio.run(frames()) == [{"id": job_id, "version": live["version"], "status": "FINISHED"}]
    # Cancelling it says it has ended, as for a job Redis still holds.
    cancel = post(archived_service, "mutation($id: ID!) { cancelJob(id: $id) { id } }", headers=AS_A, id=job_id)
    assert cancel.json()["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"


def only_in_the_history(svc: Service, pg: EmbeddedPostgres, redis_url: str, text: str) -> tuple[str, dict[str, object]]:
    """A job that ended, reached the history, and is gone from Redis: (its id, as it ended)."""
    job_id = submit(svc, text, headers=AS_A)
    live = finished(svc, job_id, AS_A)
    wait_until(lambda: job_id in rows(pg, job_id), timeout_s=30, what="the job's row")
    forget_in_redis(Redis.from_url(redis_url), job_id)
    return job_id, live


def test_the_first_history_read_after_a_postgres_restart_answers(
    archived_service: Service, postgres: EmbeddedPostgres, e2e_redis: str
) -> None:
    # The API's pool kept the connection of the read before the restart: the server closed
    # it, and nothing has been read from it since. The next read must not be handed it.
    job_id, live = only_in_the_history(archived_service, postgres, e2e_redis, "The clinic was closed on Sunday.")
    assert post(archived_service, JOB, headers=AS_A, id=job_id).json() == {"data": {"job": live}}
    postgres.restart()
    answer = post(archived_service, JOB, headers=AS_A, id=job_id).json()
    assert answer == {"data": {"job": live}}, answer


def test_the_first_history_read_after_a_restart_answers_when_the_pool_had_grown(
    archived_service: Service, postgres: EmbeddedPostgres, e2e_redis: str
) -> None:
    # Concurrent reads grow the API's pool: after the restart it holds several dead
    # connections, and the read must not spend its timeout checking them one at a time.
    job_id, live = only_in_the_history(archived_service, postgres, e2e_redis, "The waiting room was full on Monday.")

    def grown() -> bool:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: post(archived_service, JOB, headers=AS_A, id=job_id).json(), range(64)))
        assert all(answer == {"data": {"job": live}} for answer in answers), answers
        return other_connections(postgres) >= 4  # the worker's archiver's, and 3 or more of the API's

    wait_until(grown, timeout_s=30, what="the API's pool to grow")
    postgres.restart()
    answer = post(archived_service, JOB, headers=AS_A, id=job_id).json()
    assert answer == {"data": {"job": live}}, answer


def other_connections(pg: EmbeddedPostgres) -> int:
    with psycopg.connect(pg.url) as conn:
        found = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchone()
        return int(found[0]) if found else 0


@pytest.fixture
def own_redis() -> Iterator[str]:
    """A Redis of the test's own: the module's service drains the shared one's outbox."""
    with EmbeddedRedis() as server:
        yield server.url


def test_postgres_down_while_50_jobs_end_then_every_row_appears_once(own_redis: str) -> None:
    with EmbeddedPostgres() as pg:
        migrate.upgrade(pg.url)
        env = {"DATABASE_URL": pg.url, "RQ_QUEUE": "llm-history-down", "ARCHIVE_CLAIM_AFTER_S": "2"}
        with Service(own_redis, workers=1, env=env) as svc:
            pg.stop()
            ids = [submit(svc, f"Text {i}: the clinic in Boston was fine.") for i in range(50)]
            for job_id in ids:
                assert finished(svc, job_id, {})["status"] == "FINISHED"  # the outage stops no job
            assert rows_or_none(pg) is None  # (the server is down)
            # Said where operators look, without turning traffic away.
            metrics = httpx.get(f"http://127.0.0.1:{svc.port}/metrics").text
            assert "gqls_archive_outbox_depth 50.0" in metrics, metrics
            wait_until(lambda: readyz(svc) == (200, "lagging"), timeout_s=30, what="readyz to say the archive lags")
            pg.start()
            wait_until(lambda: len(rows(pg, *ids)) == 50, timeout_s=30, what="all 50 rows")
            wait_until(lambda: readyz(svc) == (200, "ok"), timeout_s=10, what="readyz to say the archive is ok")
        with psycopg.connect(pg.url) as conn:
            assert conn.execute("SELECT count(*), count(DISTINCT id) FROM jobs").fetchone() == (50, 50)
    assert Redis.from_url(own_redis).xlen(keys.ARCHIVE_OUTBOX) == 0


def readyz(svc: Service) -> tuple[int, object]:
    answer = httpx.get(f"http://127.0.0.1:{svc.port}/readyz")
    return answer.status_code, answer.json().get("archive")


def rows_or_none(pg: EmbeddedPostgres) -> int | None:
    try:
        with psycopg.connect(pg.url, connect_timeout=1) as conn:
            found = conn.execute("SELECT count(*) FROM jobs").fetchone()
            return int(found[0]) if found else 0
    except psycopg.OperationalError:
        return None


def test_a_worker_killed_before_the_archive_write_loses_no_row(own_redis: str, postgres: EmbeddedPostgres) -> None:
    # The worker ends the job (the outbox entry is written with the terminal transition),
    # but its archiver can't reach PostgreSQL (a wrong port), and it is SIGKILLed: the
    # entry is pending under a dead consumer. The next worker takes it over.
    env = {"RQ_QUEUE": "llm-history-kill", "ARCHIVE_CLAIM_AFTER_S": "2"}
    unreachable = postgres.url.replace(f":{postgres.port}/", ":1/")
    with Service(own_redis, workers=0, env={**env, "DATABASE_URL": postgres.url}) as svc:
        doomed = svc.start_worker(1, env={"DATABASE_URL": unreachable})
        job_id = submit(svc, "Killed before its row was written.")
        assert finished(svc, job_id, {})["status"] == "FINISHED"
        redis = Redis.from_url(own_redis)
        wait_until(lambda: _pending(redis) > 0, timeout_s=30, what="the dead drainer to hold the entry")
        os.kill(doomed.popen.pid, signal.SIGKILL)
        doomed.popen.wait(10)
        assert job_id not in rows(postgres, job_id)
        svc.start_worker(1)
        wait_until(lambda: job_id in rows(postgres, job_id), timeout_s=30, what="the row, by the next worker")


def _pending(redis: Redis) -> int:
    return int(redis.xpending(keys.ARCHIVE_OUTBOX, "archivers")["pending"])


async def test_retention_deletes_only_rows_older_than_the_setting(postgres: EmbeddedPostgres) -> None:
    now = datetime.now(UTC)
    old = JobRecord(id="old-one", status=JobStatus.FINISHED, stage=JobStage.DONE, finished_at=now - timedelta(days=31))
    young = JobRecord(
        id="young-one", status=JobStatus.FINISHED, stage=JobStage.DONE, finished_at=now - timedelta(days=29)
    )
    async with await psycopg.AsyncConnection.connect(postgres.url) as conn:
        await history.upsert(conn, [history.row(old, None), history.row(young, None)])
        assert await history.delete_older(conn, days=30) == 1
    assert set(rows(postgres, "old-one", "young-one")) == {"young-one"}


def test_migrate_is_a_command_and_says_what_is_missing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    with EmbeddedPostgres() as pg:
        for _ in range(2):  # twice: the second finds nothing to do
            done = subprocess.run([sys.executable, "-m", "gql_service", "migrate"], env={**env, "DATABASE_URL": pg.url},
                                  cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
            assert done.returncode == 0, done.stderr
        with psycopg.connect(pg.url) as conn:
            assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
    missing = subprocess.run([sys.executable, "-m", "gql_service", "migrate"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert missing.returncode == 2 and "DATABASE_URL is not set" in missing.stderr
    unreachable = subprocess.run([sys.executable, "-m", "gql_service", "migrate"], cwd=tmp_path,
                                 env={**env, "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/postgres"},
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
    assert unreachable.returncode == 2 and "cannot reach the job history's PostgreSQL" in unreachable.stderr


def list_all(svc: Service, first: int, **bounds: str) -> list[str]:
    ids, after = [], None
    while True:
        answer = post(svc, LIST, headers=AS_C, first=first, after=after, **bounds).json()
        assert "errors" not in answer, answer
        page = answer["data"]["jobs"]
        ids += [edge["node"]["id"] for edge in page["edges"]]
        if not page["pageInfo"]["hasNextPage"]:
            return ids
        after = page["pageInfo"]["endCursor"]


async def test_jobs_pages_through_redis_and_the_history_as_one_list(
    archived_service: Service, postgres: EmbeddedPostgres
) -> None:
    # 250 ended jobs only the history holds, a minute apart over the past days (ids out of
    # step with time, so the order can't come from them), and another tenant's.
    start = datetime.now(UTC) - timedelta(days=2)
    ended = {"tenant": "tenant-c", "status": JobStatus.FINISHED, "stage": JobStage.DONE}
    archived = [
        JobRecord(id=f"old-{(i * 7919) % 1000:03d}", **ended, created_at=start + timedelta(minutes=i),
                  finished_at=start + timedelta(minutes=i))
        for i in range(250)
    ]  # fmt: skip
    theirs = JobRecord(id="not-yours", tenant="tenant-b", status=JobStatus.FINISHED, stage=JobStage.DONE)
    async with await psycopg.AsyncConnection.connect(postgres.url) as conn:
        await history.upsert(conn, [history.row(r, None) for r in [*archived, theirs]])
    # And jobs of now, in Redis (and, once they end, in the history too: shown once).
    live = [submit(archived_service, f"Live text {i}.", headers=AS_C) for i in range(3)]
    newest_first = [*reversed(live), *(r.id for r in reversed(archived))]
    assert list_all(archived_service, 50) == newest_first
    for job_id in live:
        finished(archived_service, job_id, AS_C)
    wait_until(lambda: len(rows(postgres, *live)) == 3, timeout_s=30, what="the live jobs' rows")
    assert list_all(archived_service, 50) == newest_first  # in both stores now: still once each
    assert list_all(archived_service, 7) == newest_first  # page size changes nothing
    # A window in time: createdAfter inclusive, createdBefore exclusive.
    window = {"from": archived[100].created_at.isoformat(), "to": archived[150].created_at.isoformat()}
    assert list_all(archived_service, 20, **window) == [r.id for r in reversed(archived[100:150])]
    naive = post(archived_service, LIST, headers=AS_C, first=5, **{"from": "2026-01-01T00:00:00"}).json()
    assert naive["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"


def test_an_archived_job_keeps_its_priority(
    archived_service: Service, postgres: EmbeddedPostgres, e2e_redis: str
) -> None:
    submit_high = "mutation($t: String!) { submitText(input: {text: $t, priority: HIGH}) { job { id } } }"
    body = post(archived_service, submit_high, headers=AS_A, t="Urgent: the clinic was kind.").json()
    job_id = body["data"]["submitText"]["job"]["id"]
    finished(archived_service, job_id, AS_A)
    wait_until(lambda: job_id in rows(postgres, job_id), timeout_s=30, what="the job's row")
    assert rows(postgres, job_id)[job_id]["priority"] == "HIGH"
    forget_in_redis(Redis.from_url(e2e_redis), job_id)
    job = post(archived_service, "query($id: ID!) { job(id: $id) { priority } }", headers=AS_A, id=job_id).json()
    assert job["data"]["job"] == {"priority": "HIGH"}
