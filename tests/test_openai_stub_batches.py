"""The stub's Batch and Files APIs (tests/openai_stub_batches.py), driven by the real openai SDK."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest
from openai.types import Batch
from openai.types.chat import ChatCompletion

from .openai_stub import VALID_EXTRACTION, Fault, OpenAIStub

TERMINAL = {"completed", "failed", "expired", "cancelled"}
CUSTOM_IDS = [f"job-{i}" for i in range(20)]


def request_line(custom_id: str, *, model: str = "gpt-stub", **changes: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": f"text of {custom_id}"}]}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body, **changes}


def jsonl(items: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in items).encode()


INPUT = jsonl([request_line(c) for c in CUSTOM_IDS])


@pytest.fixture
def client(stub: OpenAIStub) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=stub.base_url, api_key="sk-stub", max_retries=0) as client:
        yield client


@pytest.fixture
async def async_client(stub: OpenAIStub) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=stub.base_url, api_key="sk-stub", max_retries=0) as client:
        yield client


def start(client: openai.OpenAI, content: bytes = INPUT, **metadata: str) -> Batch:
    uploaded = client.files.create(file=("requests.jsonl", content), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=metadata or None,
    )


def poll(client: openai.OpenAI, batch_id: str, *, seconds: float = 20.0) -> list[Batch]:
    """Every state seen until the batch ends. Each poll moves a stub batch on, so this loop
    needs no sleeps; the deadline only turns a batch that never ends into a failure."""
    seen: list[Batch] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.append(batch := client.batches.retrieve(batch_id))
        if batch.status in TERMINAL:
            return seen
    raise AssertionError(f"batch still {seen[-1].status} after {len(seen)} polls")


def read_lines(client: openai.OpenAI, file_id: str) -> list[dict[str, Any]]:
    """A result file as a client should read it: streamed, parsed one line at a time."""
    with client.files.with_streaming_response.content(file_id) as response:
        return [json.loads(line) for line in response.iter_lines() if line]


def assert_answered(line: dict[str, Any]) -> ChatCompletion:
    assert list(line) == ["id", "custom_id", "response", "error"]
    assert line["id"].startswith("batch_req_") and line["error"] is None
    assert line["response"]["status_code"] == 200
    assert re.fullmatch(r"[0-9a-f]{32}", line["response"]["request_id"])
    return ChatCompletion.model_validate(line["response"]["body"])


def test_a_batch_of_20_moves_through_its_states_and_its_output_streams_line_by_line(
    stub: OpenAIStub, client: openai.OpenAI
) -> None:
    uploaded = client.files.create(file=("requests.jsonl", INPUT), purpose="batch")
    assert uploaded.id.startswith("file-") and uploaded.object == "file"
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose, uploaded.status) == (
        len(INPUT),
        "requests.jsonl",
        "batch",
        "processed",
    )
    assert client.files.retrieve(uploaded.id) == uploaded
    assert [f.content for f in stub.batches.uploads] == [INPUT]  # the exact bytes, multipart undone

    created = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "nightly"},
    )
    assert created.id.startswith("batch_") and created.object == "batch" and created.status == "validating"
    assert created.metadata == {"run": "nightly"} and created.input_file_id == uploaded.id
    assert created.expires_at == created.created_at + 24 * 3600
    seen = poll(client, created.id)

    statuses = [b.status for b in seen]
    assert list(dict.fromkeys(statuses)) == ["in_progress", "finalizing", "completed"]
    completed_counts = [b.request_counts.completed for b in seen if b.request_counts]
    assert completed_counts == sorted(completed_counts) and len(set(completed_counts)) >= 4  # watched rising
    done = seen[-1]
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (20, 20, 0)
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.output_file_id
    assert done.error_file_id is None and done.errors is None and done.failed_at is None

    lines = read_lines(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in lines) == sorted(CUSTOM_IDS)
    assert [line["custom_id"] for line in lines] != CUSTOM_IDS  # OpenAI does not keep the input's order
    for line in lines:
        completion = assert_answered(line)
        assert completion.model == "gpt-stub"
        assert json.loads(completion.choices[0].message.content or "") == VALID_EXTRACTION
    output = client.files.retrieve(done.output_file_id)
    assert output.purpose == "batch_output" and output.bytes == len(stub.batches.content(output.id))

    assert (stub.batches.calls_batched, stub.batches.calls_interactive, stub.requests) == (20, 0, [])
    record = stub.batches.created[-1]
    assert record.id == created.id and record.custom_ids == CUSTOM_IDS and record.polls == len(seen)


async def test_async_client_and_a_batch_that_finishes_at_once(
    stub: OpenAIStub, async_client: openai.AsyncOpenAI
) -> None:
    stub.batches.instant = True
    uploaded = await async_client.files.create(file=("in.jsonl", INPUT), purpose="batch")
    batch = await async_client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = await async_client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts is not None
    assert batch.request_counts.completed == 20 and batch.output_file_id
    async with async_client.files.with_streaming_response.content(batch.output_file_id) as response:
        custom_ids = [json.loads(line)["custom_id"] async for line in response.iter_lines() if line]
    assert sorted(custom_ids) == sorted(CUSTOM_IDS)
    assert stub.batches.calls_batched == 20


def test_lines_are_answered_by_the_stubs_script_and_faults(stub: OpenAIStub, client: openai.OpenAI) -> None:
    stub.batches.instant = True
    stub.script(Fault.raw("not json"), Fault.http(500))  # the first two lines answered, in input order
    stub.batches.faults["job-5"] = Fault.refusal()
    stub.batches.faults["job-7"] = Fault.body("<html>bad gateway</html>")  # a line that is not JSON
    done = poll(client, start(client).id)[-1]
    assert done.status == "completed" and done.output_file_id and done.error_file_id
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (19, 1)

    raw = stub.batches.content(done.output_file_id).decode().splitlines()
    garbled = [text for text in raw if "<html>bad gateway</html>" in text]
    assert len(garbled) == 1 and garbled[0].startswith('{"id": "batch_req_')
    with pytest.raises(ValueError):
        json.loads(garbled[0])
    answers = {line["custom_id"]: assert_answered(line) for line in map(json.loads, set(raw) - set(garbled))}
    assert answers["job-0"].choices[0].message.content == "not json"
    assert answers["job-5"].choices[0].message.refusal and answers["job-5"].choices[0].message.content is None
    assert json.loads(answers["job-2"].choices[0].message.content or "") == VALID_EXTRACTION
    (error,) = read_lines(client, done.error_file_id)
    assert error["custom_id"] == "job-1" and error["response"]["status_code"] == 500
    assert error["response"]["body"]["error"]["message"] == "stub error 500" and error["error"] is None
    assert not stub.batches.faults  # each used once


def test_lines_the_provider_lets_expire_can_be_in_neither_file(stub: OpenAIStub, client: openai.OpenAI) -> None:
    stub.batches.unfinished_in_error_file = False  # as some compatible servers do
    stub.batches.expire_share = 0.25  # every 4th line: job-3, job-7, ...
    stub.batches.expire_ids = {"job-0"}
    seen = poll(client, start(client).id)
    done = seen[-1]
    expired = {"job-0", "job-3", "job-7", "job-11", "job-15", "job-19"}
    assert stub.batches.created[-1].expire_ids == expired
    assert done.status == "expired" and done.expired_at and done.completed_at is None
    assert "completed" not in {b.status for b in seen}
    assert done.request_counts is not None and done.output_file_id and done.error_file_id is None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (20, 14, 0)
    answered = {line["custom_id"] for line in read_lines(client, done.output_file_id)}
    assert answered == set(CUSTOM_IDS) - expired
    assert stub.batches.calls_batched == 14  # an expired line is never answered


def test_expired_lines_go_to_the_error_file_as_openai_documents(stub: OpenAIStub, client: openai.OpenAI) -> None:
    stub.batches.instant = True
    stub.batches.expire_ids = {"job-2", "job-9"}
    done = poll(client, start(client).id)[-1]
    assert done.status == "expired" and done.error_file_id and done.request_counts is not None
    # Unanswered, not failed: OpenAI reports completed + failed < total for an expired batch.
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (20, 18, 0)
    errors = read_lines(client, done.error_file_id)
    assert sorted(e["custom_id"] for e in errors) == ["job-2", "job-9"]
    for line in errors:
        assert line["response"] is None and line["error"]["code"] == "batch_expired" and line["error"]["message"]


def test_error_file_lines(stub: OpenAIStub, client: openai.OpenAI) -> None:
    stub.batches.error_share = 0.1  # every 10th line: job-9, job-19
    stub.batches.error_ids = {"job-4"}
    stub.batches.shuffle_output = False
    done = poll(client, start(client).id)[-1]
    failed = {"job-4", "job-9", "job-19"}
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (17, 3)
    assert done.output_file_id and done.error_file_id
    errors = read_lines(client, done.error_file_id)
    assert {e["custom_id"] for e in errors} == failed
    for line in errors:
        assert list(line) == ["id", "custom_id", "response", "error"] and line["error"] is None
        assert line["id"].startswith("batch_req_") and line["response"]["status_code"] == 500
        assert re.fullmatch(r"[0-9a-f]{32}", line["response"]["request_id"])
        assert set(line["response"]["body"]["error"]) == {"message", "type", "param", "code"}
    outputs = [line["custom_id"] for line in read_lines(client, done.output_file_id)]
    assert outputs == [c for c in CUSTOM_IDS if c not in failed]  # shuffle_output off: input order
    assert stub.batches.calls_batched == 17  # the provider's own errors never reach the answer


def test_a_whole_batch_fails_once_when_told(stub: OpenAIStub, client: openai.OpenAI) -> None:
    stub.batches.fail_next("Enqueued token limit reached.")
    failed = poll(client, start(client).id)[-1]
    assert failed.status == "failed" and failed.failed_at and failed.errors and failed.errors.data
    assert (failed.errors.data[0].code, failed.errors.data[0].message) == (
        "token_limit_exceeded",
        "Enqueued token limit reached.",
    )
    assert failed.output_file_id is None and failed.error_file_id is None and failed.in_progress_at is None
    assert stub.batches.calls_batched == 0
    assert poll(client, start(client).id)[-1].status == "completed"  # only the next batch


def test_an_invalid_input_file_fails_the_batch_with_its_lines_errors(client: openai.OpenAI) -> None:
    content = b"\n".join(
        [
            json.dumps(request_line("a")).encode(),
            b"{not json",
            json.dumps({k: v for k, v in request_line("b").items() if k != "custom_id"}).encode(),
            json.dumps(request_line("a")).encode(),
            json.dumps(request_line("c", url="/v1/embeddings")).encode(),
            json.dumps(request_line("d", method="GET")).encode(),
        ]
    )
    failed = poll(client, start(client, content).id)[-1]
    assert failed.status == "failed" and failed.errors and failed.errors.data
    assert [(e.line, e.code) for e in failed.errors.data] == [
        (2, "invalid_json_line"),
        (3, "missing_required_parameter"),
        (4, "duplicate_custom_id"),
        (5, "invalid_url"),
        (6, "invalid_method"),
    ]
    assert failed.errors.data[1].param == "custom_id"
    assert failed.request_counts is not None and failed.request_counts.total == 0
    empty = poll(client, start(client, b"").id)[-1]
    assert empty.status == "failed" and empty.errors and empty.errors.data
    assert empty.errors.data[0].code == "empty_file"


def test_a_client_cancel_keeps_the_lines_already_answered(stub: OpenAIStub, client: openai.OpenAI) -> None:
    created = start(client)
    seen = [client.batches.retrieve(created.id) for _ in range(3)]  # in_progress, 5 answered, 10 answered
    assert [b.status for b in seen] == ["in_progress"] * 3 and seen[-1].request_counts is not None
    assert seen[-1].request_counts.completed == 10
    cancelling = client.batches.cancel(created.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at and cancelling.cancelled_at is None
    done = poll(client, created.id)[-1]
    assert done.status == "cancelled" and done.cancelled_at and done.output_file_id
    assert done.request_counts is not None and done.request_counts.completed == 10
    assert {line["custom_id"] for line in read_lines(client, done.output_file_id)} == set(CUSTOM_IDS[:10])
    assert stub.batches.batch(created.id).cancelled_by == "client"
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(created.id)  # an ended batch


def test_the_provider_cancels_a_batch(stub: OpenAIStub, client: openai.OpenAI) -> None:
    stub.batches.cancel_next(after_lines=7)
    seen = poll(client, start(client).id)
    done = seen[-1]
    assert "cancelling" in {b.status for b in seen} and done.status == "cancelled"
    assert done.request_counts is not None and done.request_counts.completed == 7
    assert done.output_file_id and len(read_lines(client, done.output_file_id)) == 7
    assert stub.batches.created[-1].cancelled_by == "provider"

    assert poll(client, start(client).id)[-1].status == "completed"  # cancel_next is used once
    other = start(client)  # cancel() cancels any batch, now
    client.batches.retrieve(other.id)
    stub.batches.cancel(other.id)
    ended = poll(client, other.id)[-1]
    assert ended.status == "cancelled" and ended.output_file_id is None  # nothing was answered


def test_a_held_batch_stays_in_progress_until_released(stub: OpenAIStub, client: openai.OpenAI) -> None:
    stub.batches.hold = gate = threading.Event()
    stub.batches.instant = True
    created = start(client)
    for _ in range(3):
        held = client.batches.retrieve(created.id)
        assert held.status == "in_progress" and held.request_counts is not None
        assert held.request_counts.completed == 20  # every line answered, the batch not yet done
    stub.batches.hold = None  # only batches created while it was set are held
    assert poll(client, start(client).id)[-1].status == "completed"
    gate.set()
    assert client.batches.retrieve(created.id).status == "completed"


def test_finish_runs_a_batch_to_its_end_from_the_test(stub: OpenAIStub, client: openai.OpenAI) -> None:
    created = start(client)
    assert stub.batches.finish(created.id)["status"] == "completed"
    assert client.batches.retrieve(created.id).status == "completed"


def test_unknown_ids_and_bad_parameters(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    uploaded = client.files.create(file=("in.jsonl", INPUT), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")


def test_delete_a_file(stub: OpenAIStub, client: openai.OpenAI) -> None:
    uploaded = client.files.create(file=("in.jsonl", INPUT), purpose="batch")
    deleted = client.files.delete(uploaded.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (uploaded.id, "file", True)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert stub.batches.deleted == [uploaded.id]
    assert stub.batches.uploads[0].content == INPUT  # still there for assertions


def test_list_batches_newest_first_in_pages(client: openai.OpenAI) -> None:
    ids = [start(client).id for _ in range(3)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[:0:-1] and page.has_more
    assert [b.id for b in client.batches.list(limit=2)] == ids[::-1]  # the SDK follows `after`


def test_batched_and_interactive_calls_are_counted_apart(stub: OpenAIStub, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="gpt-stub", messages=[{"role": "user", "content": "hi"}])
    stub.batches.instant = True
    poll(client, start(client).id)
    assert (stub.batches.calls_interactive, stub.batches.calls_batched, len(stub.requests)) == (1, 20, 1)


def test_a_provider_that_is_down_refuses_batch_calls_too(stub: OpenAIStub, client: openai.OpenAI) -> None:
    stub.fail_all = 503
    with pytest.raises(openai.InternalServerError):
        client.files.create(file=("in.jsonl", INPUT), purpose="batch")
    stub.fail_all = None
    assert client.files.create(file=("in.jsonl", INPUT), purpose="batch").status == "processed"


def test_memory_is_bounded_and_reset_clears_it(stub: OpenAIStub, client: openai.OpenAI) -> None:
    stub.batches.max_files, stub.batches.max_batches = 3, 2
    files = [client.files.create(file=(f"{i}.jsonl", INPUT), purpose="batch").id for i in range(5)]
    assert [f.id for f in stub.batches.uploads] == files[2:]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(files[0])
    batches = [
        client.batches.create(input_file_id=files[-1], endpoint="/v1/chat/completions", completion_window="24h").id
        for _ in range(3)
    ]
    assert [b.id for b in stub.batches.created] == batches[1:]
    stub.batches.expire_share = 0.5
    stub.reset()
    assert (stub.batches.created, stub.batches.uploads, stub.batches.expire_share) == ([], [], 0.0)
