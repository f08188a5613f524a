"""Prometheus metrics and logs: one JSON object a line, request ids from API to worker."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from .clients import SUBMIT, TEXT, follow, post
from .service import Service


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" ([0-9.e+-]+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{name}{{{wanted}}} not in /metrics"
    return float(match.group(1))


async def test_metrics_count_operations_jobs_stages_and_tokens(service: Service) -> None:
    job_id = post(service, SUBMIT, text=TEXT).json()["data"]["submitText"]["job"]["id"]
    assert (await follow(service, job_id))[-1]["status"] == "FINISHED"
    post(service, SUBMIT, text="  ")
    text = httpx.get(f"http://127.0.0.1:{service.port}/metrics").text
    assert metric(text, "gqls_graphql_operations_total", type="mutation", field="submitText") >= 2
    before = metric(text, "gqls_graphql_errors_total", type="mutation", field="submitText", code="BAD_USER_INPUT")
    post(service, SUBMIT, text="")
    after_text = httpx.get(f"http://127.0.0.1:{service.port}/metrics").text
    assert metric(
        after_text, "gqls_graphql_errors_total", type="mutation", field="submitText", code="BAD_USER_INPUT"
    ) == (before + 1)
    assert metric(text, "gqls_jobs_finished_total", status="FINISHED", code="none") >= 1
    assert metric(text, "gqls_llm_call_seconds_count") >= 1
    assert metric(text, "gqls_stage_seconds_count", stage="CALLING_LLM") >= 1
    assert metric(text, "gqls_llm_tokens_total", kind="prompt") > 0
    assert metric(text, "gqls_active_subscriptions") == 0
    assert metric(text, "gqls_queue_depth") >= 0


@pytest.fixture(scope="module")
def json_logging(e2e_redis: str):  # type: ignore[no-untyped-def]
    with Service(e2e_redis, workers=1, env={"RQ_QUEUE": "llm-logs", "LOG_FORMAT": "json"}) as svc:
        yield svc


async def test_json_logs_carry_the_request_id_from_api_to_worker(json_logging: Service) -> None:
    response = post(json_logging, SUBMIT, headers={"X-Request-ID": "trace-me-42"}, text=TEXT)
    job_id = response.json()["data"]["submitText"]["job"]["id"]
    assert (await follow(json_logging, job_id))[-1]["status"] == "FINISHED"
    json_logging.stop()
    for proc in json_logging.procs:
        lines = [line for line in proc.output().splitlines() if line.strip()]
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        assert all({"time", "level", "name", "message", "request_id"} <= r.keys() for r in records)
    worker = [json.loads(line) for line in json_logging.procs[0].output().splitlines() if line.strip()]
    about_job = [r for r in worker if job_id in r["message"]]
    assert len(about_job) >= 4
    for record in about_job:
        # RQ's "taking the job" line is written before any code of ours runs; the id is in its text.
        assert record["request_id"] == "trace-me-42" or "(request trace-me-42)" in record["message"], record
