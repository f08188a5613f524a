"""The command line: settings errors, export-schema, and `dev` starting and stopping cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
from gql import Client, GraphQLRequest, gql
from gql.transport.websockets import WebsocketsTransport
from redis import Redis
from rq import Queue

from gql_service import keys, store
from gql_service.embedded_redis import free_port

from .service import answers, wait_until

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


def test_openai_provider_without_a_key_is_refused(tmp_path: Path) -> None:
    result = run_cli("serve", env={"LLM_PROVIDER": "openai"}, cwd=tmp_path)
    assert result.returncode == 2 and "OPENAI_API_KEY" in result.stderr


def test_export_schema_writes_the_sdl(tmp_path: Path) -> None:
    out = tmp_path / "schema.graphql"
    assert run_cli("export-schema", "--output", str(out)).returncode == 0
    assert "type Subscription {" in out.read_text()


def test_dev_runs_everything_and_one_sigint_stops_it_all(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_", "REDIS_"))}
    dev = subprocess.Popen(
        [sys.executable, "-m", "gql_service", "dev", "--port", str(port), "--workers", "1"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/readyz"), timeout_s=30, what="gql-service dev to be ready")
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
