"""The command line: help, bad input and settings, export-schema, `dev` starting and stopping."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
from gql import Client, GraphQLRequest, gql
from gql.transport.websockets import WebsocketsTransport
from redis import Redis
from rq import Queue, Worker
from standardwebhooks import Webhook

from gql_service import keys, store
from gql_service.cli.embedded_redis import free_port
from gql_service.settings import load_settings

from .embedded_postgres import EmbeddedPostgres
from .service import answers

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_", "REDIS_"))}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gql_service", *args], env=full_env, capture_output=True, text=True, timeout=60, cwd=cwd
    )


def test_bad_settings_stop_start_up_with_one_line_each(tmp_path: Path) -> None:
    result = run_cli("worker", env={"JOB_TIMEOUT_S": "soon", "LLM_PROVIDER": "magic"}, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert any(line.startswith("gql-service: bad setting: JOB_TIMEOUT_S:") for line in lines)
    assert any(line.startswith("gql-service: bad setting: LLM_PROVIDER:") for line in lines)


def test_webhook_secret_prints_a_secret_the_service_and_the_verifiers_accept(tmp_path: Path) -> None:
    made = [run_cli("webhook-secret", cwd=tmp_path).stdout.strip() for _ in range(2)]
    assert made[0] != made[1] and all(m.startswith("whsec_") for m in made)
    Webhook(made[0])  # standardwebhooks takes it
    assert load_settings(webhook_secret=made[0], _env_file=None).webhook_secret is not None  # and so does the service
    bad = run_cli("worker", env={"WEBHOOK_SECRET": "not-a-secret"}, cwd=tmp_path)
    assert bad.returncode == 2 and "WEBHOOK_SECRET" in bad.stderr and "not-a-secret" not in bad.stderr


def test_openai_provider_without_a_key_is_refused(tmp_path: Path) -> None:
    result = run_cli("serve", env={"LLM_PROVIDER": "openai"}, cwd=tmp_path)
    assert result.returncode == 2 and "OPENAI_API_KEY" in result.stderr


def test_export_schema_writes_the_sdl(tmp_path: Path) -> None:
    out = tmp_path / "schema.graphql"
    assert run_cli("export-schema", "--output", str(out)).returncode == 0
    assert "type Subscription {" in out.read_text()


def test_export_schema_without_an_argument_prints_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "schema.graphql").write_text("# mine, not to be overwritten\n")
    result = run_cli("export-schema", cwd=tmp_path)
    assert result.returncode == 0 and "type Subscription {" in result.stdout
    assert (tmp_path / "schema.graphql").read_text() == "# mine, not to be overwritten\n"
    assert "print" in run_cli("export-schema", "--help").stdout


def test_help_shows_every_command_defaults_and_the_url_variable() -> None:
    top = run_cli("--help")
    assert top.returncode == 0
    for command in ("dev", "serve", "worker", "submit", "status", "migrate", "export-schema"):
        assert re.search(rf"^    {command}\b", top.stdout, re.MULTILINE), command
    assert "wire" not in top.stdout  # no internal notes
    dev = run_cli("dev", "--help").stdout
    assert "(default: 8000)" in dev and "(default: 127.0.0.1)" in dev and "(default: 1)" in dev
    submit = run_cli("submit", "--help", env={"GQLS_API_KEY": "secret-key-1"}).stdout
    assert "GQLS_URL" in submit and "GQLS_API_KEY" in submit and "secret-key-1" not in submit


def test_submit_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    missing = run_cli("submit", "--file", str(tmp_path / "nope.txt"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [f"gql-service: cannot read --file {tmp_path / 'nope.txt'}: "
                                                   "No such file or directory"]  # fmt: skip
    nothing = run_cli("submit")
    assert nothing.returncode == 2 and len(nothing.stderr.strip().splitlines()) == 1


def test_worker_without_redis_is_one_clear_line(tmp_path: Path) -> None:
    url = f"redis://:hunter22@127.0.0.1:{free_port()}/0"
    result = run_cli("worker", env={"REDIS_URL": url, "WORKER_START_TIMEOUT_S": "0"}, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gql-service: cannot reach Redis at redis://:***@127.0.0.1:")
    assert "REDIS_URL" in lines[0] and "hunter22" not in result.stderr


def test_migrate_without_its_postgresql_is_one_line(tmp_path: Path) -> None:
    url = f"postgresql://gqls:hunter22@127.0.0.1:{free_port()}/gqls"
    result = run_cli("migrate", env={"DATABASE_URL": url}, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr  # once Alembic's seven INFO lines came first
    assert lines[0].startswith("gql-service: cannot reach the job history's PostgreSQL: ") and "refused" in lines[0]
    assert "hunter22" not in result.stderr
    nonsense = run_cli("migrate", env={"DATABASE_URL": "nonsense"}, cwd=tmp_path)
    assert nonsense.returncode == 2 and nonsense.stderr.splitlines() == [
        "gql-service: bad setting: DATABASE_URL: not a URL such as postgresql://user:password@host:5432/db"
    ]


def test_migrate_says_what_it_applied_and_nothing_of_alembic_s(tmp_path: Path) -> None:
    with EmbeddedPostgres() as pg:
        first = run_cli("migrate", env={"DATABASE_URL": pg.url}, cwd=tmp_path)
        again = run_cli("migrate", env={"DATABASE_URL": pg.url}, cwd=tmp_path)
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr

    def said(result: subprocess.CompletedProcess[str]) -> list[str]:
        return [line.split(" gql_service [-] ", 1)[1] for line in result.stderr.splitlines()]  # no other logger's

    applied = said(first)
    assert applied[0] == "migrate: applied 0001, The jobs table: every ended job, newest first per tenant."
    head = applied[-2].split(",")[0].removeprefix("migrate: applied ")
    assert applied[-1] == f"migrate: the job history's schema is up to date ({head})"
    assert said(again) == [f"migrate: the job history's schema was up to date already ({head})"]


@contextmanager
def listening() -> Iterator[int]:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]


def test_dev_on_a_busy_port_fails_at_once_and_starts_nothing(tmp_path: Path) -> None:
    with listening() as port:
        api = run_cli("dev", "--port", str(port), cwd=tmp_path)
        redis = run_cli("dev", "--port", str(free_port()), env={"EMBEDDED_REDIS_PORT": str(port)}, cwd=tmp_path)
    assert api.returncode == 2 and api.stderr.strip().splitlines() == [
        f"gql-service: 127.0.0.1:{port} is already in use (another gql-service?); choose another --port"
    ]
    assert redis.returncode == 2 and "EMBEDDED_REDIS_PORT" in redis.stderr
    for result in (api, redis):
        assert "Traceback" not in result.stderr and "dev:" not in result.stderr  # nothing was started


def lines_of(stream: object) -> queue.Queue[str]:
    """Read a child's output in a thread, so it never blocks on a full pipe."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for raw in stream:  # type: ignore[attr-defined]
            lines.put(raw.decode(errors="replace"))

    threading.Thread(target=pump, daemon=True).start()
    return lines


def wait_for_line(lines: queue.Queue[str], text: str, timeout_s: float) -> str:
    seen, deadline = [], time.monotonic() + timeout_s
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no line with {text!r} in {timeout_s} s:\n{''.join(seen)}") from None
        seen.append(line)
        if text in line:
            return line


def test_dev_runs_everything_and_one_sigint_stops_it_all(tmp_path: Path) -> None:
    port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_", "REDIS_", "GQLS_"))}
    env |= {"EMBEDDED_REDIS_PORT": str(redis_port), "PYTHONUNBUFFERED": "1"}
    dev = subprocess.Popen(
        [sys.executable, "-m", "gql_service", "dev", "--port", str(port), "--workers", "2"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        said = lines_of(dev.stdout)
        ready = wait_for_line(said, "dev: ready", timeout_s=60)
        # "ready" means it: the API answers and both workers listen on the queue, at that very moment.
        assert f"http://127.0.0.1:{port}/graphql" in ready
        # And a line to paste into another shell, after which the client finds this dev.
        export = wait_for_line(said, "GQLS_URL", timeout_s=10).strip()
        assert export == f"export GQLS_URL=http://127.0.0.1:{port}/graphql"
        client = f"{sys.executable} -m gql_service"
        pasted = subprocess.run(
            ["sh", "-c", f'{export}\n{client} status "$({client} submit "Pasted into another shell.")"'],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert pasted.returncode in (0, 4) and pasted.stdout.startswith("job "), pasted.stderr  # 4: not ended yet
        assert answers(f"http://127.0.0.1:{port}/readyz")
        with Redis(port=redis_port) as redis:  # EMBEDDED_REDIS_PORT chose the port
            assert Worker.count(queue=Queue("llm", connection=redis)) == 2
        tree = psutil.Process(dev.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        assert "redis-server" in names and "serve" in names and "worker" in names

        reply = httpx.post(
            f"http://127.0.0.1:{port}/graphql",
            json={"query": 'mutation { submitText(input: {text: "Great service from Acme Corp!"}) { job { id } } }'},
        ).json()
        job_id = reply["data"]["submitText"]["job"]["id"]

        async def follow() -> list[dict[str, str]]:
            transport = WebsocketsTransport(url=f"ws://127.0.0.1:{port}/graphql", subprotocols=["graphql-transport-ws"])
            async with asyncio.timeout(30), Client(transport=transport) as session:
                request = GraphQLRequest(
                    gql("subscription($id: ID!) { jobUpdates(id: $id) { stage } }"), variable_values={"id": job_id}
                )
                return [d["jobUpdates"] async for d in session.subscribe(request)]

        assert asyncio.run(follow())[-1] == {"stage": "DONE"}

        dev.send_signal(signal.SIGINT)
        assert dev.wait(30) == 0
        assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()


def test_python_worker_py_runs_a_queued_job(redis_url: str, sync_redis: Redis) -> None:
    from gql_service.keys import TASK
    from gql_service.models import JobRecord
    from gql_service.settings import Settings

    record = JobRecord(id="burst-job")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    with sync_redis.pipeline() as pipe:
        pipe.multi()
        store.create_job(pipe, record, text="A calm, neutral note about Oslo.", ttl_s=settings.result_ttl_s)
        Queue(settings.rq_queue, connection=sync_redis).enqueue_call(
            TASK, args=(record.id,), job_id=record.id, pipeline=pipe
        )
        pipe.execute()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_"))} | {"REDIS_URL": redis_url}
    result = subprocess.run(
        [sys.executable, "worker.py", "--burst"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    done = store.get_job_sync(sync_redis, record.id)
    assert done is not None and done.stage.value == "DONE" and done.result is not None
    # Kept for RESULT_TTL_S (7 days by default), far beyond RQ's own 500 s.
    assert sync_redis.ttl(keys.job(record.id)) > 7 * 24 * 3600 - 60


def test_a_worker_started_before_redis_waits_for_it_then_works(tmp_path: Path) -> None:
    """Redis and the workers often start together: a worker that comes up first says so, one
    line per attempt, and starts working as soon as Redis answers (no traceback, no exit)."""
    from gql_service.cli.embedded_redis import EmbeddedRedis

    from .service import wait_until

    redis = EmbeddedRedis()  # its port, with nothing listening on it yet
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_", "REDIS_"))}
    env |= {"REDIS_URL": redis.url, "RQ_QUEUE": "llm-late-redis", "WORKER_START_TIMEOUT_S": "60"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "gql_service", "worker"], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own group: the scheduler RQ forks goes with it
    )  # fmt: skip
    try:
        assert worker.stderr is not None
        first = worker.stderr.readline()  # blocks until the worker has tried once
        assert "Redis is unreachable" in first and "attempt 1, waiting for it" in first, first
        redis.start()
        with Redis.from_url(redis.url) as client:
            wait_until(
                lambda: len(Worker.all(queue=Queue("llm-late-redis", connection=client))) == 1,
                timeout_s=90,
                what="the worker to register once Redis is up",
            )
        assert worker.poll() is None
    finally:
        # How a worker stops is tested elsewhere (tests/test_dev_stop.py); here only what it said.
        os.killpg(worker.pid, signal.SIGKILL)
        _, rest = worker.communicate(timeout=30)
        redis.stop()
    assert "Traceback" not in rest


def test_a_worker_gives_up_on_redis_after_its_start_timeout_with_one_line(tmp_path: Path) -> None:
    url = f"redis://:hunter22@127.0.0.1:{free_port()}/0"
    result = run_cli("worker", env={"REDIS_URL": url, "WORKER_START_TIMEOUT_S": "1"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "attempt 1, waiting for it" in lines[0] and "hunter22" not in result.stderr
    assert lines[-1].startswith("gql-service: cannot reach Redis at") and "check REDIS_URL" in lines[-1]
    assert "Traceback" not in result.stderr
    burst = run_cli("worker", "--burst", env={"REDIS_URL": url})
    assert burst.returncode == 2 and burst.stderr.strip().splitlines() == [burst.stderr.strip()]
