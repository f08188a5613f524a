"""OpenTelemetry tracing (gql_service/tracing.py): real API and worker processes export to a
real OTLP/HTTP receiver (tests/otlp_receiver.py), which decodes the protobuf payloads."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from gql_service import tracing
from gql_service.models import JobRecord, JobTrace
from gql_service.rendering import job_view

from .clients import follow, post
from .openai_stub import Fault, OpenAIStub
from .otlp_receiver import OtlpReceiver, ReceivedSpan
from .service import Service

SERVER, CLIENT, CONSUMER = 2, 3, 5  # opentelemetry.proto.trace.v1 Span.SpanKind
# In every text and variable sent here: it must never appear in a span.
MARKER = "zqxmarkerwv"
TEXT = f"I loved the clinic {MARKER}. Dr. Rao was kind. Waiting time was 10 minutes in Boston."
SUBMIT = "mutation($text: String!) { submitText(input: {text: $text}) { job { id traceId } } }"
SUBMIT_MANY = "mutation($inputs: [SubmitTextInput!]!) { submitTexts(inputs: $inputs) { job { id traceId } } }"
JOB = "query($id: ID!) { job(id: $id) { traceId status usage { promptTokens completionTokens } } }"


def traced_env(receiver: OtlpReceiver) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # export within 50 ms: the test waits for spans
        "LOG_FORMAT": "json",
    }


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def traced(e2e_redis: str, receiver: OtlpReceiver) -> Iterator[Service]:
    with Service(e2e_redis, workers=1, env=traced_env(receiver)) as svc:
        yield svc


def test_off_unless_configured() -> None:
    assert not tracing.configured({})
    assert tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing.configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"})
    on = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert not tracing.configured({**on, "OTEL_SDK_DISABLED": "true"})
    assert not tracing.configured({**on, "OTEL_TRACES_EXPORTER": "none"})
    assert not tracing.setup(tracing.API_SERVICE, environ={}) and not tracing.active()
    assert tracing.current_job_trace(link=False) is None and tracing.log_ids() is None


def test_spans_past_the_queue_bound_are_dropped_and_counted() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from gql_service import trace_export

    release = threading.Event()

    class Stuck(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            release.wait(10)  # a collector that does not answer
            return SpanExportResult.SUCCESS

    before = tracing.SPANS_DROPPED._value.get()
    size = {"OTEL_BSP_MAX_QUEUE_SIZE": "4", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2"}
    provider = TracerProvider()
    provider.add_span_processor(trace_export.processor(Stuck(), size, dropped=tracing.SPANS_DROPPED))
    tracer = provider.get_tracer("test")
    for n in range(20):  # never waits: ending a span only queues it
        tracer.start_span(f"span {n}").end()
    # At most the queue (4) and the batch under way (2) are kept; the rest are counted.
    assert tracing.SPANS_DROPPED._value.get() - before >= 20 - 4 - 2
    release.set()
    provider.shutdown()


def test_trace_id_of_a_job() -> None:
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert job_view(JobRecord(id="a"))["trace_id"] is None
    assert job_view(JobRecord(id="a", trace=JobTrace(parent=parent)))["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    # A job of a many-job request has its own trace, known once its first attempt starts.
    assert job_view(JobRecord(id="a", trace=JobTrace(parent=parent, link=True)))["trace_id"] is None


def _in_trace(spans: list[ReceivedSpan], trace_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.trace_id == trace_id]


def _job_span(spans: list[ReceivedSpan], job_id: str) -> ReceivedSpan | None:
    return next((s for s in spans if s.name == "job extract" and s.attributes.get("gqls.job.id") == job_id), None)


def _no_marker(spans: list[ReceivedSpan]) -> None:
    for s in spans:
        assert MARKER not in repr((s.name, s.attributes, s.events)), s


async def test_submit_text_is_one_trace_from_the_request_to_the_model(traced: Service, receiver: OtlpReceiver) -> None:
    body = post(traced, SUBMIT, text=TEXT).json()
    assert "errors" not in body, body
    job_id, trace_id = body["data"]["submitText"]["job"]["id"], body["data"]["submitText"]["job"]["traceId"]
    assert trace_id and len(trace_id) == 32
    events = await follow(traced, job_id)
    assert events[-1]["status"] == "FINISHED"
    job = post(traced, JOB, id=job_id).json()["data"]["job"]
    assert job["traceId"] == trace_id

    def complete(spans: list[ReceivedSpan]) -> bool:
        names = {s.name for s in _in_trace(spans, trace_id)}
        return {"mutation submitText", "job extract", "chat offline"} <= names

    spans = _in_trace(receiver.wait_for(complete, what=f"trace {trace_id}"), trace_id)
    by_name = {s.name: s for s in spans}
    # The request's span, named for its operation (never the document or the variables).
    request, job_span, chat = by_name["mutation submitText"], by_name["job extract"], by_name["chat offline"]
    assert request.service == "gql-service-api" and request.kind == SERVER and request.parent_span_id == ""
    assert request.attributes == {
        "http.request.method": "POST", "http.route": "/graphql", "url.scheme": "http",
        "http.response.status_code": 200, "graphql.operation.type": "mutation", "gqls.graphql.field": "submitText",
    }  # fmt: skip
    # The worker's span is the child of the request that submitted the job.
    assert job_span.service == "gql-service-worker" and job_span.kind == CONSUMER
    assert job_span.parent_span_id == request.span_id
    assert job_span.attributes["gqls.job.id"] == job_id and job_span.attributes["gqls.tenant"] == "public"
    assert job_span.attributes["gqls.job.attempt"] == 1 and "gqls.batch.id" not in job_span.attributes
    stages = [(name, attrs["gqls.job.status"], attrs["gqls.job.version"]) for name, attrs in job_span.events]
    assert stages == [("CALLING_LLM", "STARTED", 2), ("VALIDATING", "STARTED", 3), ("DONE", "FINISHED", 4)]
    # The LLM call, by the GenAI semantic conventions, its tokens the job's usage.
    assert chat.kind == CLIENT and chat.parent_span_id == job_span.span_id
    assert chat.attributes["gen_ai.operation.name"] == "chat"
    assert chat.attributes["gen_ai.provider.name"] == "offline"
    assert chat.attributes["gen_ai.request.model"] == chat.attributes["gen_ai.response.model"] == "offline"
    assert chat.attributes["gen_ai.usage.input_tokens"] == job["usage"]["promptTokens"]
    assert chat.attributes["gen_ai.usage.output_tokens"] == job["usage"]["completionTokens"]
    assert chat.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert [name for name, _ in chat.events] == ["gen_ai.first_token"]
    _no_marker(spans)
    # The worker's log lines about the job name its trace and span.
    lines = [json.loads(line) for line in traced.logs().splitlines() if line.startswith("{")]
    attempt = next(line for line in lines if f"job {job_id}: attempt 1" in line["message"])
    assert attempt["trace_id"] == trace_id and attempt["span_id"] == job_span.span_id


async def test_submit_texts_is_one_request_trace_and_a_linked_trace_per_job(
    traced: Service, receiver: OtlpReceiver
) -> None:
    count = 5
    inputs = [{"text": f"{TEXT} Number {n}."} for n in range(count)]
    body = post(traced, SUBMIT_MANY, inputs=inputs).json()
    assert "errors" not in body, body
    job_ids = [answer["job"]["id"] for answer in body["data"]["submitTexts"]]
    assert all(answer["job"]["traceId"] is None for answer in body["data"]["submitTexts"])  # not started yet

    def jobs_ended(spans: list[ReceivedSpan]) -> bool:
        return all(_job_span(spans, job_id) is not None for job_id in job_ids)

    spans = receiver.wait_for(jobs_ended, what="the jobs' spans")
    job_spans = [_job_span(spans, job_id) for job_id in job_ids]
    request_traces = {link[0] for s in job_spans if s for link in s.links}
    assert len(request_traces) == 1, "one trace for the request"
    [request_trace] = request_traces
    spans = receiver.wait_for(
        lambda got: any(s.name == "mutation submitTexts" for s in _in_trace(got, request_trace)),
        what="the request's spans",
    )
    [request] = [s for s in _in_trace(spans, request_trace) if s.name == "mutation submitTexts"]
    assert request.kind == SERVER
    assert not any(s.name == "job extract" for s in _in_trace(spans, request_trace)), "no job in the request's trace"
    job_traces = set()
    for job_id, job_span in zip(job_ids, job_spans, strict=True):
        assert job_span is not None
        assert job_span.parent_span_id == "" and job_span.links == [(request_trace, request.span_id)]
        job_traces.add(job_span.trace_id)
        follow_events = await follow(traced, job_id)
        assert follow_events[-1]["status"] == "FINISHED"
        assert post(traced, JOB, id=job_id).json()["data"]["job"]["traceId"] == job_span.trace_id
    assert len(job_traces) == count and request_trace not in job_traces
    _no_marker(spans)


@pytest.mark.parametrize(("worker_class", "workers"), [("fork", 2), ("simple", 1)])
async def test_every_worker_class_sends_its_spans(
    e2e_redis: str, receiver: OtlpReceiver, worker_class: str, workers: int
) -> None:
    """A fork worker's work horse ends with os._exit (no exit hooks): it sends its spans
    before; a pool's workers are forked from the pool, each sets tracing up for itself."""
    env = {**traced_env(receiver), "WORKER_CLASS": worker_class, "RQ_QUEUE": f"llm-{worker_class}"}
    with Service(e2e_redis, workers=workers, env=env) as svc:
        body = post(svc, SUBMIT, text=TEXT).json()
        job_id, trace_id = body["data"]["submitText"]["job"]["id"], body["data"]["submitText"]["job"]["traceId"]
        assert (await follow(svc, job_id))[-1]["status"] == "FINISHED"

        def complete(spans: list[ReceivedSpan]) -> bool:
            return {"job extract", "chat offline"} <= {s.name for s in _in_trace(spans, trace_id)}

        spans = _in_trace(receiver.wait_for(complete, what=f"the {worker_class} worker's spans"), trace_id)
    job_span = _job_span(spans, job_id)
    assert job_span is not None and [name for name, _ in job_span.events][-1] == "DONE"


async def test_retries_repairs_and_the_openai_call_in_one_trace(
    e2e_redis: str, receiver: OtlpReceiver, stub: OpenAIStub
) -> None:
    # A 500 (the attempt is retried), then an answer that is not JSON (a repair), then a good one.
    stub.script(Fault.http(500), Fault.raw("not json at all"))
    env = {**traced_env(receiver), **stub.env, "RQ_QUEUE": "llm-openai"}
    with Service(e2e_redis, workers=1, env=env) as svc:
        body = post(svc, SUBMIT, text=TEXT).json()
        job_id, trace_id = body["data"]["submitText"]["job"]["id"], body["data"]["submitText"]["job"]["traceId"]
        assert (await follow(svc, job_id))[-1]["status"] == "FINISHED"
        usage = post(svc, JOB, id=job_id).json()["data"]["job"]["usage"]

        def attempts(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
            return [s for s in _in_trace(spans, trace_id) if s.name == "job extract"]

        spans = _in_trace(receiver.wait_for(lambda got: len(attempts(got)) == 2, what="two attempts"), trace_id)
    [request] = [s for s in spans if s.name == "mutation submitText"]
    first, second = sorted(attempts(spans), key=lambda s: s.attributes["gqls.job.attempt"])
    # Retries are new spans in the request's trace.
    assert first.parent_span_id == second.parent_span_id == request.span_id
    assert [first.attributes["gqls.job.attempt"], second.attributes["gqls.job.attempt"]] == [1, 2]
    assert [(name, attrs["gqls.job.status"]) for name, attrs in first.events] == [
        ("CALLING_LLM", "STARTED"), ("QUEUED", "RETRYING"),
    ]  # fmt: skip
    events = [name for name, _ in second.events]
    assert events == ["CALLING_LLM", "VALIDATING", "validation_failed", "repair", "REPAIRING", "VALIDATING", "DONE"]
    reasons = {name: attrs["gqls.reason"] for name, attrs in second.events if "gqls.reason" in attrs}
    assert reasons["repair"].startswith("not valid JSON")
    chats = [s for s in spans if s.name.startswith("chat ")]
    failed = [c for c in chats if c.parent_span_id == first.span_id]
    answered = [c for c in chats if c.parent_span_id == second.span_id]
    assert len(failed) == 1 and failed[0].attributes["error.type"] == "PROVIDER_ERROR"
    assert len(answered) == 2 and all(c.kind == CLIENT for c in answered)
    for chat in answered:
        assert chat.attributes["gen_ai.provider.name"] == "openai"
        assert chat.attributes["server.address"] == "127.0.0.1"
        assert chat.attributes["gen_ai.response.id"] and chat.attributes["gen_ai.response.finish_reasons"] == ["stop"]
        assert [name for name, _ in chat.events] == ["gen_ai.first_token"]  # streamed
    assert sum(c.attributes["gen_ai.usage.input_tokens"] for c in chats) == usage["promptTokens"]
    assert sum(c.attributes["gen_ai.usage.output_tokens"] for c in chats) == usage["completionTokens"]
    _no_marker(spans)


async def test_a_retried_job_of_a_submit_texts_call_stays_in_its_own_trace(
    e2e_redis: str, receiver: OtlpReceiver, stub: OpenAIStub
) -> None:
    stub.script(Fault.http(500))
    env = {**traced_env(receiver), **stub.env, "RQ_QUEUE": "llm-openai-many"}
    with Service(e2e_redis, workers=1, env=env) as svc:
        body = post(svc, SUBMIT_MANY, inputs=[{"text": TEXT}]).json()
        [answer] = body["data"]["submitTexts"]
        assert (await follow(svc, answer["job"]["id"]))[-1]["status"] == "FINISHED"
        trace_id = post(svc, JOB, id=answer["job"]["id"]).json()["data"]["job"]["traceId"]

        def attempts(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
            return [s for s in _in_trace(spans, trace_id) if s.name == "job extract"]

        spans = receiver.wait_for(lambda got: len(attempts(got)) == 2, what="two attempts in the job's trace")
    first, second = sorted(attempts(spans), key=lambda s: s.attributes["gqls.job.attempt"])
    # The first attempt starts the job's trace, linked to the request; the retry is its child.
    assert first.parent_span_id == "" and len(first.links) == 1 and first.links[0][0] != trace_id
    assert second.parent_span_id == first.span_id and second.links == []


async def test_message_content_only_when_asked_for(e2e_redis: str) -> None:
    with OtlpReceiver() as got:
        capture = {"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true", "RQ_QUEUE": "llm-content"}
        env = {**traced_env(got), **capture}
        with Service(e2e_redis, workers=1, env=env) as svc:
            job_id = post(svc, SUBMIT, text=TEXT).json()["data"]["submitText"]["job"]["id"]
            assert (await follow(svc, job_id))[-1]["status"] == "FINISHED"
            spans = got.wait_for(lambda spans: _job_span(spans, job_id) is not None, what="the job's span")
    job_span = _job_span(spans, job_id)
    assert job_span is not None
    [chat] = [s for s in spans if s.name == "chat offline" and s.parent_span_id == job_span.span_id]
    contents = {name: attrs["content"] for name, attrs in chat.events if "content" in attrs}
    assert MARKER in contents["gen_ai.user.message"] and "summary" in contents["gen_ai.choice"]
    # Only there: the request's spans and the attributes still hold no text.
    assert all(MARKER not in repr(s.attributes) for s in spans)


async def test_a_collector_that_hangs_holds_up_no_request_and_no_job(e2e_redis: str) -> None:
    env = {"RQ_QUEUE": "llm-stuck"}  # its own queue: the jobs run on this service's worker
    with OtlpReceiver(hang=True) as stuck, Service(e2e_redis, workers=1, env={**traced_env(stuck), **env}) as svc:
        first: dict[str, Any] = post(svc, SUBMIT, text=TEXT).json()
        assert (await follow(svc, first["data"]["submitText"]["job"]["id"]))[-1]["status"] == "FINISHED"
        stuck.wait_for_requests(2)  # both processes' exporters are now stuck on it
        for _ in range(3):  # and requests and jobs go on all the same
            body = post(svc, SUBMIT, text=TEXT).json()
            assert "errors" not in body, body
            events = await follow(svc, body["data"]["submitText"]["job"]["id"])
            assert events[-1]["status"] == "FINISHED"
