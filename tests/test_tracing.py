"""OpenTelemetry tracing (gql_service/tracing.py): real API and worker processes export to a
real OTLP/HTTP receiver (tests/otlp_receiver.py), which decodes the protobuf payloads."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from redis.asyncio import Redis as AsyncRedis

from gql_service import history, tracing
from gql_service.cli.embedded_redis import EmbeddedRedis, free_port
from gql_service.models import JobRecord, JobStage, JobStatus, JobTrace
from gql_service.rendering import job_view

from .clients import follow, post
from .conftest import WEBHOOK_SECRET
from .embedded_postgres import EmbeddedPostgres
from .openai_stub import Fault, OpenAIStub
from .otlp_receiver import OtlpReceiver, ReceivedSpan, service_env
from .service import Service, wait_until
from .webhook_receiver import Receiver

SERVER, CLIENT, CONSUMER = 2, 3, 5  # opentelemetry.proto.trace.v1 Span.SpanKind
# In every text and variable sent here: it must never appear in a span.
MARKER = "zqxmarkerwv"
TEXT = f"I loved the clinic {MARKER}. Dr. Rao was kind. Waiting time was 10 minutes in Boston."
SUBMIT = "mutation($text: String!) { submitText(input: {text: $text}) { job { id traceId } } }"
SUBMIT_MANY = "mutation($inputs: [SubmitTextInput!]!) { submitTexts(inputs: $inputs) { job { id traceId } } }"
JOB = "query($id: ID!) { job(id: $id) { traceId status usage { promptTokens completionTokens } } }"


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def traced(e2e_redis: str, receiver: OtlpReceiver) -> Iterator[Service]:
    with Service(e2e_redis, workers=1, env=service_env(receiver)) as svc:
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
    count = 100  # the most one call takes (MAX_BATCH): one request trace, 100 job traces linked to it
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
        # Its span has ended: so has the job (read over HTTP: 100 subscriptions would be slow).
        job = post(traced, JOB, id=job_id).json()["data"]["job"]
        assert (job["status"], job["traceId"]) == ("FINISHED", job_span.trace_id)
    assert len(job_traces) == count and request_trace not in job_traces
    _no_marker(spans)


@pytest.mark.parametrize(("worker_class", "workers"), [("fork", 2), ("simple", 1)])
async def test_every_worker_class_sends_its_spans(
    e2e_redis: str, receiver: OtlpReceiver, worker_class: str, workers: int
) -> None:
    """A fork worker's work horse ends with os._exit (no exit hooks): it sends its spans
    before; a pool's workers are forked from the pool, each sets tracing up for itself."""
    env = {**service_env(receiver), "WORKER_CLASS": worker_class, "RQ_QUEUE": f"llm-{worker_class}"}
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
    env = {**service_env(receiver), **stub.env, "RQ_QUEUE": "llm-openai"}
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
    env = {**service_env(receiver), **stub.env, "RQ_QUEUE": "llm-openai-many"}
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
        env = {**service_env(got), **capture}
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
    with OtlpReceiver(hang=True) as stuck, Service(e2e_redis, workers=1, env={**service_env(stuck), **env}) as svc:
        first: dict[str, Any] = post(svc, SUBMIT, text=TEXT).json()
        assert (await follow(svc, first["data"]["submitText"]["job"]["id"]))[-1]["status"] == "FINISHED"
        stuck.wait_for_requests(2)  # both processes' exporters are now stuck on it
        for _ in range(3):  # and requests and jobs go on all the same
            body = post(svc, SUBMIT, text=TEXT).json()
            assert "errors" not in body, body
            events = await follow(svc, body["data"]["submitText"]["job"]["id"])
            assert events[-1]["status"] == "FINISHED"


# -- after a job: its webhook's delivery and its archive write ----------------------------
SUBMIT_HOOKED = """mutation($text: String!, $url: String) {
  submitText(input: {text: $text, webhookUrl: $url}) { job { id traceId } }
}"""
CREATE_BATCH = 'mutation { createBatch(input: {name: "traced"}) { id } }'
SUBMIT_TO_BATCH = """mutation($inputs: [SubmitTextInput!]!, $batch: ID) {
  submitTexts(inputs: $inputs, batchId: $batch) { job { id } }
}"""
HOOK_ENV = {
    "WEBHOOK_SECRET": WEBHOOK_SECRET,
    "WEBHOOK_ALLOW_PRIVATE": "true",  # the receiver is on loopback
    "WEBHOOK_RETRY_BASE_S": "1",  # the second attempt about 1 s after the first
    "WEBHOOK_MAX_ATTEMPTS": "3",
}


@pytest.fixture(scope="module")
def hooks() -> Iterator[Receiver]:
    receiver = Receiver(WEBHOOK_SECRET).start()
    yield receiver
    receiver.stop()


def _named(spans: list[ReceivedSpan], name: str, job_id: str | None = None) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name and (job_id is None or s.attributes.get("gqls.job.id") == job_id)]


def _archived(spans: list[ReceivedSpan], job_id: str) -> list[tuple[ReceivedSpan, tuple[str, str]]]:
    """The archive writes that link to `job_id`, with that link."""
    return [
        (s, link)
        for s in _named(spans, "history archive")
        for link, attrs in zip(s.links, s.link_attributes, strict=True)
        if attrs == {"gqls.job.id": job_id}
    ]


async def test_webhook_deliveries_and_archive_writes_are_spans_linked_to_the_jobs_traces(
    receiver: OtlpReceiver, hooks: Receiver, postgres: EmbeddedPostgres
) -> None:
    # The marker in the URL's path and query: neither may reach a span.
    path = f"hook-{MARKER}"
    url = f"{hooks.url(path)}?token={MARKER}"
    hooks.script(path, 500)  # the first attempt fails, the second is delivered (204)
    env = {**service_env(receiver), **HOOK_ENV, "DATABASE_URL": postgres.url, "RQ_QUEUE": "llm-after"}
    # A Redis of its own: the outboxes' streams it makes would take entries of every later test.
    with EmbeddedRedis() as redis, Service(redis.url, workers=1, env=env) as svc:
        body = post(svc, SUBMIT_HOOKED, text=TEXT, url=url).json()
        alone, alone_trace = body["data"]["submitText"]["job"]["id"], body["data"]["submitText"]["job"]["traceId"]
        batch = post(svc, CREATE_BATCH).json()["data"]["createBatch"]["id"]
        body = post(svc, SUBMIT_TO_BATCH, inputs=[{"text": TEXT, "webhookUrl": hooks.url("batched")}], batch=batch)
        [answer] = body.json()["data"]["submitTexts"]
        batched = answer["job"]["id"]

        def done(spans: list[ReceivedSpan]) -> bool:
            return (
                len(_named(spans, "webhook deliver", alone)) == 2
                and len(_named(spans, "webhook deliver", batched)) == 1
                and all(_archived(spans, job_id) for job_id in (alone, batched))
            )

        spans = receiver.wait_for(done, what="two deliveries of one job, one of the other, and both archived")
        batched_trace = post(svc, JOB, id=batched).json()["data"]["job"]["traceId"]
    # What each job's spans link to: its request's span (submitText), its first attempt (a batch's job).
    [alone_attempt] = _named(_in_trace(spans, alone_trace), "job extract")
    [batched_attempt] = _named(_in_trace(spans, batched_trace), "job extract")
    assert batched_attempt.attributes["gqls.batch.id"] == batch and batched_attempt.parent_span_id == ""
    # A batch's job is in a trace of its own linked to the submitTexts request, as any such job.
    [(request_trace, request_span)] = batched_attempt.links
    requests = receiver.wait_for(lambda got: bool(_in_trace(got, request_trace)), what="the submitTexts request")
    [request] = [s for s in _in_trace(requests, request_trace) if s.span_id == request_span]
    assert request.name == "mutation submitTexts" and request.attributes["gqls.graphql.field"] == "submitTexts"
    alone_link, batched_link = (alone_trace, alone_attempt.parent_span_id), (batched_trace, batched_attempt.span_id)

    first, second = sorted(_named(spans, "webhook deliver", alone), key=lambda s: s.attributes["gqls.webhook.attempt"])
    at = {"server.address": "127.0.0.1", "server.port": hooks.port, "http.request.method": "POST"}
    job = {"gqls.job.id": alone, "gqls.tenant": "public", "gqls.webhook.event": "job.finished"}
    assert first.attributes == {
        **at, **job, "gqls.webhook.attempt": 1, "http.response.status_code": 500, "error.type": "500",
        "gqls.webhook.status": "RETRYING",
    }  # fmt: skip
    assert first.status == (2, "HTTP 500")
    assert second.attributes == {
        **at, **job, "gqls.webhook.attempt": 2, "http.response.status_code": 204, "gqls.webhook.status": "DELIVERED",
    }  # fmt: skip
    assert second.status[0] != 2
    for delivery in (first, second):
        # A trace of its own per attempt, linked to the job's.
        assert delivery.kind == CLIENT and delivery.service == "gql-service-worker"
        assert delivery.parent_span_id == "" and delivery.trace_id != alone_trace
        assert delivery.links == [alone_link] and delivery.link_attributes == [{"gqls.job.id": alone}]
    assert first.trace_id != second.trace_id
    [of_batch] = _named(spans, "webhook deliver", batched)
    assert of_batch.attributes["gqls.batch.id"] == batch and of_batch.attributes["gqls.webhook.attempt"] == 1
    assert of_batch.links == [batched_link] and of_batch.status[0] != 2

    for job_id, link in ((alone, alone_link), (batched, batched_link)):
        [(write, linked)] = _archived(spans, job_id)
        assert linked == link
        assert write.kind == CLIENT and write.parent_span_id == "" and write.status[0] != 2
        assert write.attributes["db.system.name"] == "postgresql" and write.attributes["db.collection.name"] == "jobs"
        assert write.attributes["server.address"] == "127.0.0.1" and write.attributes["server.port"] == postgres.port
        assert write.attributes["gqls.archive.records"] == len(write.links) + write.dropped_links
    _no_marker(spans)  # nor the URL's path or query, nor the text, in any of them


async def test_an_archive_write_past_the_span_link_limit_keeps_128_links_and_counts_the_rest(
    receiver: OtlpReceiver, postgres: EmbeddedPostgres, e2e_redis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One write of 200 ended jobs (the outbox's batch), in this process: the SDK keeps
    OTEL_SPAN_LINK_COUNT_LIMIT links (128 by default) and counts the others in the span."""
    from gql_service.worker.archiver import Archiver

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gqls-tests-archive")
    traces = {f"linked-{n:03}": JobTrace(parent=f"00-{n + 1:032x}-{n + 1:016x}-01") for n in range(200)}
    records = [
        JobRecord(id=job_id, status=JobStatus.FINISHED, stage=JobStage.DONE, version=4, trace=trace)
        for job_id, trace in traces.items()
    ]
    assert tracing.setup(tracing.WORKER_SERVICE)
    redis = AsyncRedis.from_url(e2e_redis)  # the drainer's, unused by a write
    archiver = Archiver(redis, postgres.url, consumer="tests")
    try:
        await archiver.handle([(history.row(r, None), r.trace) for r in records], redis.pipeline())
    finally:
        tracing.shutdown()  # sends the span now
        await archiver.close()
        await redis.aclose()

    def written(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in _named(spans, "history archive") if s.service == "gqls-tests-archive"]

    [write] = written(receiver.wait_for(lambda spans: bool(written(spans)), what="the archive write"))
    assert write.attributes["gqls.archive.records"] == write.attributes["db.operation.batch.size"] == 200
    assert len(write.links) == 128 and write.dropped_links == 200 - 128
    for (trace_id, span_id), attributes in zip(write.links, write.link_attributes, strict=True):
        parent = traces[attributes["gqls.job.id"]].parent
        assert parent == f"00-{trace_id}-{span_id}-01"
    with psycopg.connect(postgres.url) as conn:
        assert conn.execute("SELECT count(*) FROM jobs WHERE id LIKE 'linked-%'").fetchone() == (200,)


def _worker_drops(svc: Service) -> float:
    """gqls_worker_trace_spans_dropped_total on the API's /metrics."""
    scraped = httpx.get(f"http://127.0.0.1:{svc.port}/metrics", timeout=10).text
    [line] = [line for line in scraped.splitlines() if line.startswith("gqls_worker_trace_spans_dropped_total ")]
    return float(line.split()[1])


@pytest.mark.parametrize("worker_class", ["async", "fork"])
async def test_spans_a_worker_drops_are_counted_on_the_apis_metrics(worker_class: str) -> None:
    """A collector that hangs and an export queue of one span: a job's second span finds the
    queue full (the first is stuck in its export). The async worker reports from its own
    process; a fork worker's work horse reports as it ends."""
    settings = {"OTEL_BSP_MAX_QUEUE_SIZE": "1", "WORKER_CLASS": worker_class, "RQ_QUEUE": f"llm-drops-{worker_class}"}
    # A Redis of its own: the count is cluster-wide, and other tests' workers drop too.
    with (
        OtlpReceiver(hang=True) as stuck,
        EmbeddedRedis() as redis,
        Service(redis.url, workers=1, env={**service_env(stuck), **settings}) as svc,
    ):
        assert _worker_drops(svc) == 0
        for _ in range(2):
            body = post(svc, SUBMIT, text=TEXT).json()
            assert (await follow(svc, body["data"]["submitText"]["job"]["id"]))[-1]["status"] == "FINISHED"
        wait_until(lambda: _worker_drops(svc) >= 1, timeout_s=30, what="the worker's drops on /metrics")
        worker_log = next(p for p in svc.procs if p.name == "worker").output()
    assert "spans dropped: the export queue is full" in worker_log


def test_a_collector_that_is_away_is_said_once_a_minute_not_at_every_export(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The real exporter against a port nobody listens on: each export retries, then gives up.
    from opentelemetry.sdk.trace import TracerProvider

    from gql_service import trace_export

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{free_port()}/v1/traces")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "0.2")
    exporter = trace_export.exporter({"OTEL_EXPORTER_OTLP_TIMEOUT": "0.2"})
    assert exporter is not None
    span = TracerProvider().get_tracer("test").start_span("a span")
    span.end()
    said_by = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
    with caplog.at_level("WARNING", logger=said_by):
        results = [exporter.export([span]) for _ in range(4)]
    exporter.shutdown()
    assert all(result.name == "FAILURE" for result in results)
    said = [r for r in caplog.records if r.name == said_by]
    assert len(said) == 1, [r.getMessage() for r in said]
