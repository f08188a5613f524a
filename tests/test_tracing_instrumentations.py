"""The maintained instrumentations tracing switches on (gql_service/trace_export.py instrument):
the job history's queries (psycopg) and, when OTEL_PYTHON_DISABLED_INSTRUMENTATIONS no longer
names it, the openai SDK's HTTP requests (aiohttp) arrive at a real OTLP receiver as children
of our spans, and hold no user text; an instrumentation's span outside any of ours (the
archive's writes) starts no trace of its own."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from redis import Redis

from gql_service import keys

from .clients import follow, post
from .embedded_postgres import EmbeddedPostgres
from .openai_stub import OpenAIStub
from .otlp_receiver import OtlpReceiver, ReceivedSpan, service_env
from .service import Service, wait_until

CLIENT = 3  # opentelemetry.proto.trace.v1 Span.SpanKind
MARKER = "zqxinstrmarker"  # in the text sent: it must never appear in a span
TEXT = f"I loved the clinic {MARKER}. Dr. Rao was kind. Waiting time was 10 minutes in Boston."
SUBMIT = "mutation($text: String!) { submitText(input: {text: $text}) { job { id traceId } } }"
JOB = "query($id: ID!) { job(id: $id) { id status traceId } }"
# The spans only we start: every trace begins at one of them.
OURS = ("mutation ", "query ", "subscription ", "POST /", "GET /", "job extract", "history archive", "webhook deliver")


def env_for(receiver: OtlpReceiver, queue: str) -> dict[str, str]:
    return {**service_env(receiver), "RQ_QUEUE": queue}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def _no_content(spans: list[ReceivedSpan], *secrets: str) -> None:
    for s in spans:
        for secret in (MARKER, *secrets):
            assert secret not in repr((s.name, s.attributes, s.events)), s


def _roots_are_ours(spans: list[ReceivedSpan]) -> None:
    roots = [s for s in spans if s.parent_span_id == ""]
    assert roots and all(s.name.startswith(OURS) for s in roots), sorted({s.name for s in roots})


async def test_the_openai_http_request_is_a_child_of_the_chat_span(
    e2e_redis: str, receiver: OtlpReceiver, stub: OpenAIStub
) -> None:
    every = {"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": ""}  # none disabled: the aiohttp client's is on
    with Service(e2e_redis, workers=1, env={**env_for(receiver, "llm-instr-openai"), **stub.env, **every}) as svc:
        body = post(svc, SUBMIT, text=TEXT).json()
        job_id, trace_id = body["data"]["submitText"]["job"]["id"], body["data"]["submitText"]["job"]["traceId"]
        assert (await follow(svc, job_id))[-1]["status"] == "FINISHED"

        def http_under_chat(spans: list[ReceivedSpan]) -> bool:
            chats = {s.span_id for s in spans if s.trace_id == trace_id and s.name.startswith("chat ")}
            return any(s.parent_span_id in chats and s.kind == CLIENT for s in spans if not s.name.startswith("chat"))

        spans = [
            s for s in receiver.wait_for(http_under_chat, what="the HTTP request's span") if s.trace_id == trace_id
        ]
    [chat] = [s for s in spans if s.name.startswith("chat ")]
    [http] = [s for s in spans if s.parent_span_id == chat.span_id]
    assert http.service == "gql-service-worker" and http.name == "POST"
    assert http.attributes["http.request.method"] == "POST" and http.attributes["http.response.status_code"] == 200
    assert http.attributes["url.full"] == f"{stub.base_url}/chat/completions"
    # Neither the text (the request's body) nor the API key (a header) is recorded.
    _no_content(spans, stub.env["OPENAI_API_KEY"])
    _roots_are_ours(receiver.spans)


async def test_the_openai_http_request_has_no_span_of_its_own_unless_asked_for(
    e2e_redis: str, stub: OpenAIStub
) -> None:
    with OtlpReceiver() as got:
        with Service(e2e_redis, workers=1, env={**env_for(got, "llm-instr-default"), **stub.env}) as svc:
            job_id = post(svc, SUBMIT, text=TEXT).json()["data"]["submitText"]["job"]["id"]
            assert (await follow(svc, job_id))[-1]["status"] == "FINISHED"
        # The processes have stopped, and so sent every span they had.
        spans = got.wait_for(lambda spans: any(s.name.startswith("chat ") for s in spans), what="the chat span")
    [chat] = [s for s in spans if s.name.startswith("chat ")]
    assert chat.kind == CLIENT and chat.attributes["gen_ai.usage.output_tokens"]
    assert [s for s in spans if s.parent_span_id == chat.span_id] == []
    assert {s.name for s in spans} >= {"mutation submitText", "job extract"}


def _archived(pg: EmbeddedPostgres, job_id: str) -> bool:
    with psycopg.connect(pg.url) as conn:
        return conn.execute("SELECT 1 FROM jobs WHERE id = %s", (job_id,)).fetchone() is not None


async def test_history_reads_and_archive_writes_are_children_of_our_spans(
    e2e_redis: str, postgres: EmbeddedPostgres
) -> None:
    env = {"DATABASE_URL": postgres.url}
    # A receiver of its own: every span it holds is from this test's service.
    with OtlpReceiver() as got, Service(e2e_redis, workers=1, env={**env_for(got, "llm-instr-history"), **env}) as svc:
        job_id = post(svc, SUBMIT, text=TEXT).json()["data"]["submitText"]["job"]["id"]
        assert (await follow(svc, job_id))[-1]["status"] == "FINISHED"
        wait_until(lambda: _archived(postgres, job_id), timeout_s=30, what="the job's row")  # the worker's write
        assert Redis.from_url(e2e_redis).delete(keys.job(job_id)) == 1  # as if RESULT_TTL_S had passed
        job = post(svc, JOB, id=job_id).json()["data"]["job"]
        assert job["id"] == job_id and job["status"] == "FINISHED"  # read from the history

        def query_under_request(spans: list[ReceivedSpan]) -> bool:
            requests = {s.span_id for s in spans if s.name == "query job"}
            return any(s.parent_span_id in requests and s.kind == CLIENT for s in spans)

        def write_under_archive(spans: list[ReceivedSpan]) -> bool:
            archives = {s.span_id for s in spans if s.name == "history archive"}
            return any(s.parent_span_id in archives and s.kind == CLIENT for s in spans)

        got.wait_for(write_under_archive, what="the archive write's statements")
        spans = got.wait_for(query_under_request, what="the history query's span")
    [request] = [s for s in spans if s.name == "query job"]
    # The query, and the pool's check of the connection it lends (history.pool), each a span.
    queries = [s for s in spans if s.parent_span_id == request.span_id]
    assert queries and all(q.service == "gql-service-api" and q.kind == CLIENT for q in queries)
    assert all(q.attributes["db.system.name"] == "postgresql" for q in queries), [q.attributes for q in queries]
    statements = [str(q.attributes.get("db.query.text")) for q in queries]
    assert any("FROM jobs" in statement for statement in statements), statements
    assert not any(job_id in statement for statement in statements)  # the SQL, without its parameters
    _no_content(spans)
    # The archive's upsert, in the worker: psycopg's statements under our `history archive`.
    [archive] = [s for s in spans if s.name == "history archive"]
    writes = [str(s.attributes.get("db.query.text")) for s in spans if s.parent_span_id == archive.span_id]
    assert any("INSERT INTO jobs" in statement for statement in writes), writes
    assert not any(job_id in statement for statement in writes)
    _roots_are_ours(spans)  # and no trace starts at an instrumentation's span
