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
    # One gauge per priority's queue (a missing one fails the lookup).
    assert all(metric(text, "gqls_queue_depth", priority=p) >= 0 for p in ("HIGH", "NORMAL", "LOW"))


def test_metric_labels_come_only_from_the_schema(service: Service) -> None:
    """A client naming unknown root fields must not mint label values: 200 requests naming
    500 KB fields once grew /metrics to 400 MB and the API's memory for good."""
    url = f"http://127.0.0.1:{service.port}/metrics"
    post(service, "{ nope }")
    before = metric(httpx.get(url).text, "gqls_graphql_operations_total", type="query", field="invalid")
    for i in range(20):
        response = post(service, f"{{ unknown{i}_{'x' * 50_000} }}")
        assert response.json()["errors"][0]["message"].startswith("Cannot query field")
    post(service, "mutation { nope }")
    post(service, "subscription { nope }")
    text = httpx.get(url).text
    assert "unknown" not in text and "nope" not in text
    assert metric(text, "gqls_graphql_operations_total", type="query", field="invalid") == before + 20
    assert (
        metric(text, "gqls_graphql_errors_total", type="query", field="invalid", code="GRAPHQL_VALIDATION_FAILED") >= 20
    )
    assert metric(text, "gqls_graphql_operations_total", type="mutation", field="invalid") >= 1
    # The schema's own root fields, introspection included, keep their names.
    post(service, "{ __typename }")
    assert metric(httpx.get(url).text, "gqls_graphql_operations_total", type="query", field="__typename") >= 1
    assert len(text) < 50_000


def test_client_errors_are_logged_at_info_without_the_document(service: Service) -> None:
    """The document and variables hold the user's text: a client's mistake is one INFO line
    with its code, never an ERROR with a traceback and the query."""
    api = next(p for p in service.procs if p.name == "api")
    url = f"http://127.0.0.1:{service.port}/metrics"
    internal = 'gqls_graphql_errors_total{code="INTERNAL_SERVER_ERROR",field="submitText",type="mutation"}'
    internal_before = httpx.get(url).text.count(internal)
    start = len(api.output())
    post(service, SUBMIT, text="private words " * 2000)  # BAD_USER_INPUT from a resolver: too long
    post(service, '{ job(id: "private words") { nope } }')  # fails validation
    post(service, 'mutation { cancelJob(id: "no-such-job") { id } }')  # NOT_FOUND
    post(service, '{ job(id: "private words" ')  # a syntax error
    # A variable of the wrong type: once an ERROR with a traceback, and the value in the log.
    wrong_type = post(service, SUBMIT, text=["private words"])
    assert wrong_type.json()["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    logged = api.output()[start:]
    assert "INFO gql_service.graphql" in logged and "client error BAD_USER_INPUT" in logged
    assert "client error NOT_FOUND" in logged and "client error GRAPHQL_VALIDATION_FAILED" in logged
    assert "client error GRAPHQL_PARSE_FAILED" in logged
    assert "Variable '$text' has invalid value (the value is not logged)" in logged
    assert " ERROR " not in logged and "Traceback" not in logged
    assert "private words" not in logged
    # Counted under its own code, never as the internal error an alert watches.
    text = httpx.get(url).text
    assert text.count(internal) == internal_before == 0
    assert metric(text, "gqls_graphql_errors_total", type="mutation", field="submitText", code="BAD_USER_INPUT") >= 2


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
    # Two lines a job at INFO: its attempt, and how it ended (RQ's own lines are at DEBUG).
    assert [(r["level"], r["message"].split(": ", 1)[1]) for r in about_job] == [
        ("INFO", "attempt 1 with offline"),
        ("INFO", "FINISHED / DONE (v4)"),
    ], about_job
    assert all(record["request_id"] == "trace-me-42" for record in about_job), about_job
