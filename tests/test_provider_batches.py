"""A provider's Batch API (gql_service/worker/llm/provider_batches.py): a batch line is the
interactive call's request, and a line of its output reads as the interactive answer would;
then the whole round trip through the real `openai` SDK against the stub's Batch API."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import AsyncOpenAI
from openai.types import Batch

from gql_service.models import JobErrorCode
from gql_service.worker.llm import LLMError
from gql_service.worker.llm import provider_batches as batches
from gql_service.worker.llm.openai_provider import OpenAIProvider, make_client

from .openai_stub import VALID_EXTRACTION, Fault, OpenAIStub

MODEL = "test-model"
TEXT = "I loved the clinic. Dr. Rao was kind. Waiting time was 10 minutes in Boston."


def provider(stub: OpenAIStub) -> OpenAIProvider:
    return OpenAIProvider(
        make_client(api_key="sk-test", base_url=stub.base_url, timeout_s=5), model=MODEL, stream=False
    )


def completion_body(message: dict[str, Any], finish_reason: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-batch", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
    }  # fmt: skip


def output_line(job_id: str, body: dict[str, Any], status: int = 200) -> str:
    response = {"status_code": status, "request_id": "req-1", "body": body}
    return json.dumps({"id": "batch_req_1", "custom_id": job_id, "response": response, "error": None})


async def test_a_batch_line_is_the_interactive_request(stub: OpenAIStub) -> None:
    await provider(stub).extract(TEXT)
    line = json.loads(batches.request_line("job-1", TEXT, model=MODEL))
    assert line == {"custom_id": "job-1", "method": "POST", "url": "/v1/chat/completions", "body": stub.requests[-1]}
    assert line["body"]["response_format"]["type"] == "json_schema"
    json_mode = json.loads(batches.request_line("job-1", TEXT, model=MODEL, json_schema=False))
    assert json_mode["body"]["response_format"] == {"type": "json_object"}


async def test_an_answer_reads_as_the_interactive_one(stub: OpenAIStub) -> None:
    content = json.dumps(VALID_EXTRACTION)
    stub.script(Fault.model_named("gpt-4o-mini-2024-07-18"))
    interactive = await provider(stub).extract(TEXT)
    answer = batches.parse(output_line("job-1", completion_body({"content": content})), model=MODEL)
    assert answer is not None and answer.job_id == "job-1" and answer.error is None
    assert answer.completion is not None
    assert (answer.completion.content, answer.completion.usage, answer.completion.model) == (
        interactive.content, interactive.usage, interactive.model,
    )  # fmt: skip
    assert answer.completion.finish_reasons == interactive.finish_reasons == ("stop",)


@pytest.mark.parametrize(
    ("message", "finish_reason", "code"),
    [
        ({"content": None, "refusal": "I can't help with that."}, "stop", JobErrorCode.REFUSED),
        ({"content": '{"summary": "cut of'}, "length", JobErrorCode.TRUNCATED),
        ({"content": ""}, "content_filter", JobErrorCode.REFUSED),
    ],
)
def test_a_refused_or_cut_answer_is_the_same_error_as_interactively(
    message: dict[str, Any], finish_reason: str, code: JobErrorCode
) -> None:
    answer = batches.parse(output_line("job-2", completion_body(message, finish_reason)), model=MODEL)
    assert answer is not None and answer.completion is None and answer.error is not None
    assert answer.error.code == code and answer.error.usage.total_tokens == 150


def test_a_request_the_batch_did_not_answer_is_a_retryable_provider_error() -> None:
    failed = batches.parse(
        output_line("job-3", {"error": {"message": "boom", "type": "server_error"}}, 500), model=MODEL
    )
    assert failed is not None and failed.job_id == "job-3" and failed.error is not None
    assert failed.error.code == JobErrorCode.PROVIDER_ERROR and failed.error.retryable
    assert "500" in failed.error.message
    # The error file's other shape: no response, an `error` object.
    item = {"id": "batch_req_2", "custom_id": "job-4", "response": None, "error": {"code": "batch_expired"}}
    expired = batches.parse(json.dumps(item), model=MODEL)
    assert expired is not None and isinstance(expired.error, LLMError) and "expired" in expired.error.message
    assert expired.error.retryable  # run again (ECONOMY_FALLBACK): it was never tried


def test_a_body_that_is_not_a_completion_is_a_provider_error() -> None:
    answer = batches.parse(output_line("job-5", {"choices": "nope"}), model=MODEL)
    assert answer is not None and answer.error is not None and answer.error.code == JobErrorCode.PROVIDER_ERROR
    empty = batches.parse(output_line("job-6", {**completion_body({"content": "{}"}), "choices": []}), model=MODEL)
    assert empty is not None and empty.error is not None and "no choices" in empty.error.message


@pytest.mark.parametrize("line", ["not json", "[1, 2]", json.dumps({"custom_id": ""}), json.dumps({"id": "x"})])
def test_a_line_that_names_no_job_is_skipped(line: str) -> None:
    assert batches.parse(line, model=MODEL) is None


def client(stub: OpenAIStub) -> AsyncOpenAI:
    return AsyncOpenAI(api_key="sk-test", base_url=stub.base_url, max_retries=0)


async def run_to_end(stub: OpenAIStub, texts: dict[str, str]) -> tuple[Batch, dict[str, batches.Answer]]:
    """Upload, create and poll one provider batch of `texts` (job id -> text); its answers."""
    api = client(stub)
    file_id = await batches.upload(
        api, (batches.request_line(job_id, text, model=MODEL) for job_id, text in texts.items())
    )
    made = await batches.create(api, file_id, metadata={"gqls_chunk": "chunk-1"})
    assert made.metadata == {"gqls_chunk": "chunk-1"} and made.input_file_id == file_id
    seen_completed = []
    batch = made
    for _ in range(100):  # one step a poll: the stub moves only when asked
        batch = await batches.retrieve(api, made.id)
        assert batch.request_counts is not None
        seen_completed.append(batch.request_counts.completed)
        if batch.status in batches.ENDED:
            break
    assert batch.status in batches.ENDED and seen_completed == sorted(seen_completed)
    got: dict[str, batches.Answer] = {}
    for file in (batch.output_file_id, batch.error_file_id):
        if file:
            async for answer in batches.answers(api, file, model=MODEL):
                assert answer.job_id not in got  # one line a job
                got[answer.job_id] = answer
            await batches.delete_file(api, file)
    await batches.delete_file(api, file_id)
    await api.close()
    return batch, got


async def test_two_hundred_texts_make_one_provider_batch_and_come_back_answered(stub: OpenAIStub) -> None:
    texts = {f"job-{i}": f"{TEXT} ({i})" for i in range(200)}
    stub.batches.faults["job-7"] = Fault.raw("not json at all")  # validated later, as interactively
    stub.batches.faults["job-8"] = Fault.refusal()
    batch, got = await run_to_end(stub, texts)
    assert batch.status == "completed" and len(stub.batches.created) == 1
    assert stub.batches.calls_batched == 200 and stub.batches.calls_interactive == 0
    [made] = stub.batches.created
    uploaded = [json.loads(line) for line in stub.batches.uploads[0].content.splitlines()]
    assert [line["custom_id"] for line in uploaded] == list(texts)
    assert set(got) == set(texts)
    assert got["job-7"].completion is not None and got["job-7"].completion.content == "not json at all"
    assert got["job-8"].error is not None and got["job-8"].error.code == JobErrorCode.REFUSED
    fine = [a for job_id, a in got.items() if job_id not in ("job-7", "job-8")]
    assert all(a.completion is not None and json.loads(a.completion.content) == VALID_EXTRACTION for a in fine)
    # Every file read is deleted: the input, the output.
    assert set(stub.batches.deleted) == {stub.batches.uploads[0].id, batch.output_file_id}


@pytest.mark.parametrize("in_error_file", [True, False])
async def test_expired_and_failed_lines_are_told_apart_from_answers(stub: OpenAIStub, in_error_file: bool) -> None:
    """OpenAI writes expired requests to the error file (`batch_expired`); some compatible
    servers leave them out: either way each is known, as an error or as missing."""
    texts = {f"job-{i}": f"{TEXT} ({i})" for i in range(40)}
    stub.batches.unfinished_in_error_file = in_error_file
    stub.batches.expire_share = 0.3
    stub.batches.error_ids = {"job-1", "job-2"}
    batch, got = await run_to_end(stub, texts)
    [made] = stub.batches.created
    assert batch.status == "expired" and made.expire_ids and batch.request_counts is not None
    assert batch.request_counts.failed == 2  # expired lines are counted neither completed nor failed
    for job_id in ("job-1", "job-2"):
        error = got[job_id].error
        assert error is not None and error.retryable and error.code == JobErrorCode.PROVIDER_ERROR
    if in_error_file:
        assert set(got) == set(texts)
        for job_id in made.expire_ids:
            error = got[job_id].error
            assert error is not None and error.retryable and "expired" in error.message
    else:
        assert set(got) == set(texts) - made.expire_ids  # what is missing is exactly what expired


@pytest.mark.parametrize(
    ("status", "body_error", "code", "retryable"),
    [
        (500, {"message": "boom", "type": "server_error"}, JobErrorCode.PROVIDER_ERROR, True),
        (429, {"message": "slow down", "type": "requests"}, JobErrorCode.RATE_LIMITED, True),
        (400, {"message": "too long", "code": "context_length_exceeded"}, JobErrorCode.PROVIDER_ERROR, False),
        (400, {"message": "no", "code": "content_filter"}, JobErrorCode.REFUSED, False),
        (401, {"message": "bad key"}, JobErrorCode.PROVIDER_AUTH, False),
    ],
)
def test_a_failed_line_is_classified_as_the_same_interactive_answer_would_be(
    status: int, body_error: dict[str, Any], code: JobErrorCode, retryable: bool
) -> None:
    """A request that can never succeed (a context too long) must not be run again and again."""
    answer = batches.parse(output_line("job-9", {"error": body_error}, status), model=MODEL)
    assert answer is not None and answer.error is not None
    assert (answer.error.code, answer.error.retryable) == (code, retryable)


def test_a_200_line_with_an_error_is_not_an_answer() -> None:
    line = json.loads(output_line("job-10", completion_body({"content": "{}"})))
    line["error"] = {"code": "server_error", "message": "partial"}
    answer = batches.parse(json.dumps(line), model=MODEL)
    assert answer is not None and answer.completion is None and answer.error is not None and answer.error.retryable


def test_a_server_that_says_its_error_as_a_string_keeps_it() -> None:
    item = {"id": "vllm-1", "custom_id": "job-11", "response": None, "error": "engine overloaded"}
    answer = batches.parse(json.dumps(item), model=MODEL)
    assert answer is not None and answer.error is not None and "engine overloaded" in answer.error.message
