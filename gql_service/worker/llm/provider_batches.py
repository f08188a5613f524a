"""A provider's Batch API (OpenAI's, and the compatible ones), through the official SDK: the
JSONL of chat completion requests an economy batch's jobs become, its upload, the provider
batch made of it, and its answers read back one line at a time.

Each request is the interactive path's own (the same prompt, options and strict JSON schema:
gql_service.worker.llm.openai_provider), with the job's id as its `custom_id`; each answer
goes through the same reading as an interactive one (refusal, truncation, content filter), so
what a job ends with does not depend on the path it took. The client is an argument: this
module holds no connection of its own.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import openai
from openai import AsyncOpenAI
from openai.types import Batch
from openai.types.chat import ChatCompletion
from pydantic import ValidationError

from gql_service.models import JobErrorCode, TokenUsage
from gql_service.worker.llm import prompt
from gql_service.worker.llm.base import Completion, LLMError
from gql_service.worker.llm.openai_provider import completion_of, request_options, usage_of

ENDPOINT: Final = "/v1/chat/completions"
COMPLETION_WINDOW: Final = "24h"  # the only window OpenAI offers
# A batch input of 50,000 requests runs to about 100 MB (the schema is in every line): past
# this it goes to a temporary file on its way up, never held whole in memory.
SPOOL_BYTES = 8 * 2**20
# The provider's words for a batch that will change no more.
ENDED = frozenset({"completed", "failed", "expired", "cancelled"})


def request_line(job_id: str, text: str, *, model: str, json_schema: bool = True) -> bytes:
    """One line of a batch's input: the interactive call's request, named by the job's id."""
    body = {**request_options(model, json_schema=json_schema), "messages": prompt.messages(text)}
    line = {"custom_id": job_id, "method": "POST", "url": ENDPOINT, "body": body}
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


async def upload(
    client: AsyncOpenAI, lines: Iterable[bytes] | AsyncIterable[bytes], *, name: str = "batch.jsonl"
) -> str | None:
    """Upload the lines as one file for a batch (purpose `batch`); its id (None, and nothing
    uploaded, for no lines)."""
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
        if isinstance(lines, AsyncIterable):
            async for line in lines:
                spool.write(line)
        else:
            for line in lines:
                spool.write(line)
        if not spool.tell():
            return None
        spool.seek(0)
        # A file object, not bytes: the SDK streams it into the multipart body.
        uploaded = await client.files.create(file=(name, spool, "application/jsonl"), purpose="batch")
    return uploaded.id


async def create(client: AsyncOpenAI, input_file_id: str, *, metadata: Mapping[str, str] | None = None) -> Batch:
    """The provider batch of an uploaded input: answered within 24 h, at the batch price."""
    return await client.batches.create(
        input_file_id=input_file_id, endpoint=ENDPOINT, completion_window=COMPLETION_WINDOW,
        metadata=dict(metadata) if metadata else None,
    )  # fmt: skip


async def retrieve(client: AsyncOpenAI, batch_id: str) -> Batch:
    return await client.batches.retrieve(batch_id)


async def cancel(client: AsyncOpenAI, batch_id: str) -> Batch:
    """Ask the provider to stop: what it answered so far still comes in the output file."""
    return await client.batches.cancel(batch_id)


async def delete_file(client: AsyncOpenAI, file_id: str) -> None:
    await client.files.delete(file_id)


class BatchAPI(Protocol):
    """A Batch API as the economy loop (gql_service.worker.economy) uses it: the provider's,
    through the SDK (`OpenAIBatches`), or the offline twin (gql_service.worker.offline_batches)."""

    async def upload(self, lines: AsyncIterable[bytes], *, name: str) -> str | None: ...
    async def create(self, input_file_id: str, *, tag: str) -> Batch: ...
    async def find(self, tag: str, *, since: float) -> Batch | None: ...
    async def retrieve(self, batch_id: str) -> Batch: ...
    async def cancel(self, batch_id: str) -> None: ...
    def answers(self, file_id: str) -> AsyncIterator[Answer]: ...
    async def delete_file(self, file_id: str) -> None: ...
    async def close(self) -> None: ...


# The provider batch's metadata key that names the chunk it was made for.
TAG = "gqls_chunk"
# How many provider batches, newest first, `find` looks through at most.
FIND_MOST = 1000


class OpenAIBatches:
    """`BatchAPI` over an OpenAI-compatible endpoint, through the official SDK."""

    def __init__(self, client: AsyncOpenAI, *, model: str) -> None:
        self.client = client
        self.model = model

    async def upload(self, lines: AsyncIterable[bytes], *, name: str) -> str | None:
        return await upload(self.client, lines, name=name)

    async def create(self, input_file_id: str, *, tag: str) -> Batch:
        return await create(self.client, input_file_id, metadata={TAG: tag})

    async def find(self, tag: str, *, since: float) -> Batch | None:
        """The batch made for `tag`, among those made since `since` (epoch seconds)."""
        seen = 0
        async for made in self.client.batches.list(limit=100):
            if (made.metadata or {}).get(TAG) == tag:
                return made
            seen += 1
            if made.created_at < since or seen >= FIND_MOST:
                break
        return None

    async def retrieve(self, batch_id: str) -> Batch:
        return await retrieve(self.client, batch_id)

    async def cancel(self, batch_id: str) -> None:
        with contextlib.suppress(openai.ConflictError, openai.NotFoundError):  # it ended meanwhile
            await cancel(self.client, batch_id)

    def answers(self, file_id: str) -> AsyncIterator[Answer]:
        return answers(self.client, file_id, model=self.model)

    async def delete_file(self, file_id: str) -> None:
        with contextlib.suppress(openai.NotFoundError):
            await delete_file(self.client, file_id)

    async def close(self) -> None:
        await self.client.close()


@dataclass(frozen=True)
class Answer:
    """One line of a batch's output or error file: a job's completion, or why it has none."""

    job_id: str
    completion: Completion | None = None
    error: LLMError | None = None


async def answers(client: AsyncOpenAI, file_id: str, *, model: str) -> AsyncIterator[Answer]:
    """The lines of an output (or error) file, read as they arrive: a file of 50,000 answers
    is never held whole. A line that is not one of the provider's is skipped: it names no job
    (the job it was for counts as missing, and runs again). A job named twice, or one never
    sent, is the caller's to settle: it knows which jobs it sent and which have ended."""
    async with client.files.with_streaming_response.content(file_id) as response:
        async for line in response.iter_lines():
            if line.strip():
                answer = parse(line, model=model)
                if answer is not None:
                    yield answer


def answer_to_store(completion: Completion) -> str:
    """A batch's answer as it waits beside its job's record for the attempt that validates it."""
    return json.dumps({
        "content": completion.content, "usage": completion.usage.model_dump(), "model": completion.model,
        "response_id": completion.response_id, "finish_reasons": list(completion.finish_reasons),
    })  # fmt: skip


def stored_answer(raw: bytes | str) -> Completion:
    item = json.loads(raw)
    return Completion(
        content=item["content"], usage=TokenUsage.model_validate(item["usage"]), model=item["model"],
        response_id=item.get("response_id"), finish_reasons=tuple(item.get("finish_reasons") or ()),
    )  # fmt: skip


def parse(line: str, *, model: str) -> Answer | None:
    """A line of an output or error file; None for one that names no job."""
    try:
        item: Any = json.loads(line)
    except ValueError:
        return None
    job_id = item.get("custom_id") if isinstance(item, dict) else None
    if not isinstance(job_id, str) or not job_id:
        return None
    response = item.get("response") if isinstance(item.get("response"), dict) else None
    status = response.get("status_code") if response else None
    # A line with an `error` is not an answer, whatever its status says.
    if status != 200 or item.get("error") or not isinstance(response, dict):
        return Answer(job_id, error=_failed(item.get("error"), status, response.get("body") if response else None))
    try:
        completion = ChatCompletion.model_validate(response.get("body"))
    except ValidationError:
        message = "the provider's batch answered 200 with a body that is not a chat completion"
        return Answer(job_id, error=LLMError(JobErrorCode.PROVIDER_ERROR, message, retryable=True))
    usage: TokenUsage = usage_of(completion)
    if not completion.choices:
        error = LLMError(JobErrorCode.PROVIDER_ERROR, "the LLM answered with no choices", retryable=True, usage=usage)
        return Answer(job_id, error=error)
    choice = completion.choices[0]
    try:
        return Answer(job_id, completion=completion_of(
            choice.message.content, getattr(choice.message, "refusal", None), choice.finish_reason, usage,
            completion.model or model, completion.id,
        ))  # fmt: skip
    except LLMError as error:
        return Answer(job_id, error=error)


# Why a request the provider's batch did not answer, by the `error` code of the line.
_UNFINISHED = {
    "batch_expired": "the provider's batch expired before answering it",
    "batch_cancelled": "the provider's batch was cancelled before answering it",
}
# Refusals by the provider's filters, as an interactive call's content filter is.
_FILTERED = frozenset({"content_filter", "content_policy_violation"})


def _failed(error: Any, status: Any, body: Any) -> LLMError:
    """A request the provider's batch did not answer, classified as the interactive path
    classifies the same HTTP answer (openai_provider.classify): a 5xx, 408, 409, 429 or an
    unfinished request may succeed another time; any other 4xx (a context too long, a schema
    refused) never will, and a filter's refusal is REFUSED."""
    said = body.get("error") if isinstance(body, dict) else None
    detail = said if isinstance(said, dict) else error if isinstance(error, dict) else {}
    code = str(detail.get("code") or "")
    if error or not isinstance(status, int):
        # Not answered (the line's own `error`: an object, or from some servers a string).
        message = _UNFINISHED.get(code) or f"the provider's batch did not answer it ({(code or str(error))[:80]})"
        return LLMError(JobErrorCode.PROVIDER_ERROR, message, retryable=True)
    if code in _FILTERED:
        return LLMError(JobErrorCode.REFUSED, f"the provider refused the request ({code})")
    if status in (401, 403):
        return LLMError(JobErrorCode.PROVIDER_AUTH, f"the provider's batch refused our credentials ({status})")
    if status == 429:
        return LLMError(JobErrorCode.RATE_LIMITED, "the provider's batch was rate limited (429)", retryable=True)
    retryable = status >= 500 or status in (408, 409)
    suffix = f" ({code[:80]})" if code else ""
    return LLMError(JobErrorCode.PROVIDER_ERROR, f"the provider's batch answered {status}{suffix}", retryable=retryable)
