"""A subscription's span (gql_service/api/subscription_spans.py): real API and worker
processes export to the real OTLP/HTTP receiver; the subscribers are gql's websocket client
and an SSE stream read with httpx."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from bench.trace_picture import render

from .clients import LEGACY_WS, TRANSPORT_WS, follow, post, submit
from .otlp_receiver import OtlpReceiver, ReceivedSpan, service_env
from .service import Service

SERVER, INTERNAL = 2, 1  # opentelemetry.proto.trace.v1 Span.SpanKind
JOB = "query($id: ID!) { job(id: $id) { traceId version } }"
UPDATES = "subscription($id: ID!) { jobUpdates(id: $id) { id status version } }"


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def traced(e2e_redis: str, receiver: OtlpReceiver) -> Iterator[Service]:
    with Service(e2e_redis, workers=1, env=service_env(receiver)) as svc:
        yield svc


def _subscription_span(receiver: OtlpReceiver, job_id: str) -> ReceivedSpan:
    def ended(spans: list[ReceivedSpan]) -> bool:
        return any(s.name == "subscription jobUpdates" and s.attributes.get("gqls.job.id") == job_id for s in spans)

    spans = receiver.wait_for(ended, what=f"the subscription span of {job_id}")
    [span] = [s for s in spans if s.name == "subscription jobUpdates" and s.attributes.get("gqls.job.id") == job_id]
    return span


@pytest.mark.parametrize("protocol", [TRANSPORT_WS, LEGACY_WS])
async def test_a_websocket_subscription_is_a_span_that_ends_with_the_terminal_frame(
    traced: Service, receiver: OtlpReceiver, protocol: str
) -> None:
    job_id = submit(traced)
    frames = await follow(traced, job_id, protocol)
    assert frames[-1]["status"] == "FINISHED"
    job = post(traced, JOB, id=job_id).json()["data"]["job"]
    span = _subscription_span(receiver, job_id)
    # A websocket carries operations for hours: each subscription is a trace's root.
    assert span.service == "gql-service-api" and span.kind == SERVER and span.parent_span_id == ""
    assert span.attributes == {
        "graphql.operation.type": "subscription", "gqls.tenant": "public", "gqls.subscription.followed": 1,
        "gqls.job.id": job_id,
    }  # fmt: skip
    assert span.events == [
        ("terminal frame", {"gqls.job.id": job_id, "gqls.job.status": "FINISHED", "gqls.job.version": job["version"]})
    ]
    # One click from the subscriber's side to the job's trace.
    assert [trace_id for trace_id, _ in span.links] == [job["traceId"]]


def test_an_http_subscription_span_is_a_child_of_its_request(traced: Service, receiver: OtlpReceiver) -> None:
    job_id = submit(traced)
    payload = {"query": UPDATES, "variables": {"id": job_id}}
    with httpx.stream(
        "POST", traced.http_url, json=payload, headers={"accept": "text/event-stream"}, timeout=30
    ) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert json.loads(lines[-1].removeprefix("data: "))["data"]["jobUpdates"]["status"] == "FINISHED"
    span = _subscription_span(receiver, job_id)
    request = receiver.wait_for(
        lambda spans: any(s.span_id == span.parent_span_id for s in spans), what="the request's span"
    )
    [parent] = [s for s in request if s.span_id == span.parent_span_id]
    assert (parent.kind, parent.name, span.kind) == (SERVER, "subscription jobUpdates", INTERNAL)
    assert [name for name, _ in span.events] == ["terminal frame"]


def test_a_subscription_to_an_unknown_job_ends_its_span_without_a_terminal_frame(
    traced: Service, receiver: OtlpReceiver
) -> None:
    job_id = "f" * 32
    payload = {"query": UPDATES, "variables": {"id": job_id}}
    with httpx.stream(
        "POST", traced.http_url, json=payload, headers={"accept": "text/event-stream"}, timeout=30
    ) as response:
        body = "".join(response.iter_lines())
    assert "NOT_FOUND" in body
    span = _subscription_span(receiver, job_id)
    assert span.events == [] and span.links == []


async def test_the_readme_picture_is_drawn_from_a_received_trace(traced: Service, receiver: OtlpReceiver) -> None:
    body = post(traced, "mutation($t: String!) { submitText(input: {text: $t}) { job { id traceId } } }", t="Fine.")
    job = body.json()["data"]["submitText"]["job"]
    await follow(traced, job["id"])

    def complete(spans: list[ReceivedSpan]) -> bool:
        names = {s.name for s in spans if job["traceId"] in (s.trace_id, *(t for t, _ in s.links))}
        return {"mutation submitText", "job extract", "chat offline", "subscription jobUpdates"} <= names

    svg = render(receiver.wait_for(complete, what="the trace"), job["traceId"])
    rows = [line for line in svg.splitlines() if line.startswith("<rect x=") and 'rx="2"' in line]
    assert len(rows) == 4, svg  # the request, the attempt, the call, and the linked subscription
    for name in ("mutation submitText", "job extract", "chat offline", "subscription jobUpdates  (linked trace)"):
        assert f">{name}<" in svg
    assert ">terminal frame<" in svg and ">CALLING_LLM<" in svg
