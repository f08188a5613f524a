"""Operating the service: rq-dashboard on its Redis, graceful shutdown of the API."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx

from gql_service.cli.embedded_redis import free_port

from .clients import follow, submit
from .service import Service, answers, wait_until


def test_rq_dashboard_lists_the_service_queue(e2e_redis: str) -> None:
    with Service(e2e_redis, workers=0, env={"RQ_QUEUE": "llm-dashboard"}) as svc:
        submit(svc)
        port = free_port()
        dashboard = subprocess.Popen(
            [str(Path(sys.executable).with_name("rq-dashboard")), "--redis-url", e2e_redis,
             "--bind", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_until(lambda: answers(f"http://127.0.0.1:{port}/"), what="rq-dashboard")
            queues = httpx.get(f"http://127.0.0.1:{port}/0/data/queues.json").json()["queues"]
        finally:
            dashboard.terminate()
            dashboard.wait(10)
    ours = [q for q in queues if q["name"] == "llm-dashboard"]
    assert ours and ours[0]["count"] == 1


async def test_sigterm_stops_the_api_cleanly_and_loses_nothing(e2e_redis: str) -> None:
    with Service(e2e_redis, workers=1, env={"RQ_QUEUE": "llm-api-sigterm"}) as svc:
        ids = [submit(svc) for _ in range(5)]
        api = svc.procs[-1]
        api.popen.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status says why.
        assert api.popen.wait(20) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in api.output()
        # Everything accepted before the stop is still there and runs: a new API sees it.
        again = Service(e2e_redis, workers=0, env={"RQ_QUEUE": "llm-api-sigterm"}).start()
        try:
            for job_id in ids:
                assert (await follow(again, job_id))[-1]["status"] == "FINISHED"
        finally:
            again.stop()
