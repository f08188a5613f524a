"""Tracing over OTLP/gRPC (OTEL_EXPORTER_OTLP_PROTOCOL=grpc, the `grpc` extra): real API and
worker processes export to a real gRPC receiver (tests/otlp_grpc_receiver.py); and where the
extra is not installed, the processes say so once and serve untraced."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .clients import follow, post
from .otlp_grpc_receiver import OtlpGrpcReceiver
from .otlp_receiver import ReceivedSpan
from .service import Service

ROOT = Path(__file__).resolve().parent.parent
UV = os.environ.get("GQLS_UV") or shutil.which("uv")
SERVER, CLIENT, CONSUMER = 2, 3, 5  # opentelemetry.proto.trace.v1 Span.SpanKind
MARKER = "zqxgrpcmarker"  # in the text sent: it must never appear in a span
TEXT = f"I loved the clinic {MARKER}. Dr. Rao was kind. Waiting time was 10 minutes in Boston."
SUBMIT = "mutation($text: String!) { submitText(input: {text: $text}) { job { id traceId } } }"
JOB = "query($id: ID!) { job(id: $id) { traceId status } }"
MISSING = "grpc needs the OTLP/gRPC exporter, which is not installed"


def grpc_env(receiver: OtlpGrpcReceiver, queue: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # export within 50 ms: the test waits for spans
        "LOG_FORMAT": "json",
        "RQ_QUEUE": queue,  # each test's jobs on its own service's worker
    }


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpGrpcReceiver]:
    with OtlpGrpcReceiver() as r:
        yield r


def _in_trace(spans: list[ReceivedSpan], trace_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.trace_id == trace_id]


def _submitted(svc: Service) -> tuple[str, str]:
    body = post(svc, SUBMIT, text=TEXT).json()
    assert "errors" not in body, body
    job = body["data"]["submitText"]["job"]
    return job["id"], job["traceId"]


def _one_trace(receiver: OtlpGrpcReceiver, trace_id: str) -> dict[str, ReceivedSpan]:
    """The request's, the attempt's and the LLM call's spans of `trace_id`, checked to be one
    trace from the API to the worker."""

    def complete(spans: list[ReceivedSpan]) -> bool:
        return {"mutation submitText", "job extract", "chat offline"} <= {s.name for s in _in_trace(spans, trace_id)}

    spans = _in_trace(receiver.wait_for(complete, what=f"trace {trace_id} over gRPC"), trace_id)
    by_name = {s.name: s for s in spans}
    request, job_span, chat = by_name["mutation submitText"], by_name["job extract"], by_name["chat offline"]
    assert request.service == "gql-service-api" and request.kind == SERVER and request.parent_span_id == ""
    assert job_span.service == "gql-service-worker" and job_span.kind == CONSUMER
    assert job_span.parent_span_id == request.span_id
    assert chat.kind == CLIENT and chat.parent_span_id == job_span.span_id
    for s in spans:
        assert MARKER not in repr((s.name, s.attributes, s.events)), s
    return by_name


async def test_a_submit_text_trace_arrives_over_grpc(e2e_redis: str, receiver: OtlpGrpcReceiver) -> None:
    with Service(e2e_redis, workers=1, env=grpc_env(receiver, "llm-grpc")) as svc:
        job_id, trace_id = _submitted(svc)
        assert trace_id and len(trace_id) == 32
        assert (await follow(svc, job_id))[-1]["status"] == "FINISHED"
        spans = _one_trace(receiver, trace_id)
        assert spans["job extract"].attributes["gqls.job.id"] == job_id
        lines = [json.loads(line) for line in svc.logs().splitlines() if line.startswith("{")]
    started = [line["message"] for line in lines if line["message"].startswith("tracing on")]
    assert len(started) == 2 and all(receiver.endpoint in message for message in started), started


async def test_a_fork_worker_s_work_horse_exports_over_grpc(e2e_redis: str, receiver: OtlpGrpcReceiver) -> None:
    """The work horse is forked after the worker made its gRPC channel, and sends its spans
    before os._exit. OTEL_EXPORTER_OTLP_TRACES_PROTOCOL overrides the general variable."""
    env = {
        **grpc_env(receiver, "llm-grpc-fork"),
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",  # what the traces' own variable overrides
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
        "WORKER_CLASS": "fork",
    }
    with Service(e2e_redis, workers=1, env=env) as svc:
        for _ in range(2):  # the second horse too: the first left nothing broken behind it
            job_id, trace_id = _submitted(svc)
            assert (await follow(svc, job_id))[-1]["status"] == "FINISHED"
            assert _one_trace(receiver, trace_id)["job extract"].attributes["gqls.job.id"] == job_id


@pytest.fixture(scope="module")
def without_grpc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Python of an environment holding the locked dependencies without any extra (so
    without the OTLP/gRPC exporter), as `pip install gql-service` gives them; the package
    itself from this tree (PYTHONPATH)."""
    assert UV, "uv is needed: run the tests with ./scripts/test, which provides it"
    tmp = tmp_path_factory.mktemp("without-grpc")
    locked = tmp / "requirements.txt"

    def uv(*args: str) -> None:
        done = subprocess.run([UV, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"uv {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"

    uv("export", "--locked", "--no-emit-project", "--no-hashes", "--format", "requirements-txt", "-o", str(locked))
    uv("venv", "--python", sys.executable, str(tmp / "venv"))
    python = tmp / "venv" / "bin" / "python"
    uv("pip", "install", "--python", str(python), "-r", str(locked))
    # What this test is about: there, the exporter is not importable (and the SDK is).
    probe = "import importlib.util as u; print(u.find_spec('opentelemetry.exporter.otlp.proto.grpc') is None)"
    assert subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout.strip() == "True"
    return python


async def test_without_the_extra_grpc_is_one_log_line_and_no_tracing(
    e2e_redis: str, receiver: OtlpGrpcReceiver, without_grpc: Path
) -> None:
    before = receiver.requests
    env = {**grpc_env(receiver, "llm-no-grpc"), "PYTHONPATH": str(ROOT)}
    with Service(e2e_redis, workers=1, env=env, python=str(without_grpc)) as svc:
        job_id, trace_id = _submitted(svc)
        assert (await follow(svc, job_id))[-1]["status"] == "FINISHED"  # served all the same
        assert trace_id is None and post(svc, JOB, id=job_id).json()["data"]["job"]["traceId"] is None
        outputs = {proc.name: proc.output() for proc in svc.procs}
    # Said once by each process that would have traced (the API; the worker pool's worker),
    # as one line naming the variable and the extra to install, and nothing was exported.
    assert set(outputs) == {"api", "worker"}
    for output in outputs.values():
        said = [json.loads(line) for line in output.splitlines() if MISSING in line]
        assert len(said) == 1, output
        assert said[0]["level"] == "WARNING" and "gql-service[grpc]" in said[0]["message"]
        assert "OTEL_EXPORTER_OTLP_PROTOCOL=grpc" in said[0]["message"] and "Traceback" not in output
    assert receiver.requests == before
