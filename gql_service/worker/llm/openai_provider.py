"""The `openai` provider: the official SDK (`AsyncOpenAI`) against OpenAI or any compatible
endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import ssl
import weakref
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import httpx2  # the SDK's own HTTP client library
import openai
from openai import AsyncOpenAI

# The SDK's own helper turns a Pydantic model into a strict JSON schema the way the API
# expects it (additionalProperties false, every key required); it is what
# `chat.completions.parse` uses, and we need the raw completion for the repair re-ask.
from openai.lib._parsing._completions import type_to_response_format_param
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gql_service.models import MAX_MODEL_CHARS, Extraction, JobErrorCode, Sentiment, TokenUsage
from gql_service.worker.llm import prompt, rate_headers
from gql_service.worker.llm.base import Completion, LLMError, OnText, Repair

log = logging.getLogger(__name__)

STRUCTURED_FORMAT: Any = type_to_response_format_param(Extraction)
JSON_MODE_FORMAT: Any = {"type": "json_object"}

ClientFactory = Callable[[], AsyncOpenAI]


def make_client(*, api_key: str, base_url: str | None, timeout_s: float) -> ClientFactory:
    """How to build the SDK client; the provider builds one per event loop it runs on."""
    # Built once: an SSL context costs about 25 ms, and the fork and simple workers run
    # each job on a new event loop, so a new client each time.
    ssl_context: ssl.SSLContext = httpx2.create_ssl_context()

    def make() -> AsyncOpenAI:
        # max_retries=0: RQ retries the whole job with backoff and records each attempt;
        # SDK retries underneath would multiply the attempts and hide them. The SDK's
        # aiohttp transport: half the CPU per call of its default one (BENCHMARKS.md, 6),
        # and CPU is what bounds the calls one worker process can make.
        return AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout_s,
            max_retries=0,
            http_client=openai.DefaultAioHttpClient(verify=ssl_context),
        )

    return make


def usage_of(response: Any) -> TokenUsage:
    u = getattr(response, "usage", None)
    if u is None:
        return TokenUsage()
    return TokenUsage(
        prompt_tokens=u.prompt_tokens or 0,
        completion_tokens=u.completion_tokens or 0,
        total_tokens=u.total_tokens or 0,
        # Priced apart when LLM_PRICES has a cached price (gql_service.pricing).
        cached_tokens=getattr(getattr(u, "prompt_tokens_details", None), "cached_tokens", None) or 0,
    )


def _rejects_json_schema(exc: openai.BadRequestError) -> bool:
    text = str(exc).lower()
    return "response_format" in text or "json_schema" in text


def _retry_after_s(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date), if given."""
    with contextlib.suppress(TypeError, ValueError):
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(ms) / 1000)
        if (value := headers.get("retry-after")) is not None:
            with contextlib.suppress(ValueError):
                return max(0.0, float(value))
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, (when - datetime.now(UTC)).total_seconds())
    return None


def _could_not_connect(exc: BaseException) -> bool:
    """Whether a socket error that is not a timeout (refused, unreachable) is behind `exc`:
    the aiohttp transport reports those as connect timeouts."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and not isinstance(cause, TimeoutError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def classify(exc: openai.OpenAIError) -> LLMError:
    """Map an SDK error to the job error a client sees. Order matters: subclasses first."""
    if isinstance(exc, openai.APITimeoutError) and not _could_not_connect(exc):
        return LLMError(JobErrorCode.TIMEOUT, "the LLM did not answer in time", retryable=True)
    if isinstance(exc, openai.APIConnectionError):
        return LLMError(JobErrorCode.PROVIDER_ERROR, "could not connect to the LLM endpoint", retryable=True)
    if isinstance(exc, openai.RateLimitError):
        return LLMError(
            JobErrorCode.RATE_LIMITED,
            "the LLM endpoint is rate limiting (429)",
            retryable=True,
            retry_after_s=_retry_after_s(exc.response.headers),
        )
    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return LLMError(JobErrorCode.PROVIDER_AUTH, f"the LLM endpoint refused our credentials ({exc.status_code})")
    if isinstance(exc, openai.APIStatusError):
        retryable = exc.status_code >= 500 or exc.status_code in (408, 409)
        return LLMError(
            JobErrorCode.PROVIDER_ERROR, f"the LLM endpoint answered {exc.status_code}", retryable=retryable
        )
    return LLMError(JobErrorCode.PROVIDER_ERROR, f"LLM call failed: {type(exc).__name__}", retryable=True)


def _not_a_completion() -> LLMError:
    # A proxy's error page or a cut-off body: the endpoint misbehaved, the next try may not.
    message = "the LLM endpoint answered 200 with a body that is not a chat completion"
    return LLMError(JobErrorCode.PROVIDER_ERROR, message, retryable=True)


async def _broke_off_as_such(chunks: AsyncIterator[ChatCompletionChunk]) -> AsyncIterator[ChatCompletionChunk]:
    """The chunks; a connection lost once the answer has begun is a stream that broke off,
    not an endpoint we could not reach (a timeout stays a timeout)."""
    try:
        async for chunk in chunks:
            yield chunk
    except openai.APIConnectionError as exc:
        if isinstance(exc, openai.APITimeoutError) and not _could_not_connect(exc):
            raise
        raise _broke_off() from exc


def _broke_off() -> LLMError:
    # Cut off by the endpoint, a proxy or the network; the next try may get through.
    return LLMError(JobErrorCode.PROVIDER_ERROR, "the LLM's streamed answer broke off before it ended", retryable=True)


def completion_of(
    content: str | None,
    refusal: str | None,
    finish_reason: str | None,
    usage: TokenUsage,
    model: str,
    response_id: str | None = None,
    spent_for_s: float | None = None,
) -> Completion:
    """The answer, or the LLMError that it is: streamed, not, or a line of a provider batch's
    output (gql_service.worker.llm.provider_batches)."""
    if refusal:
        # As long as the model likes: JobError bounds every message it stores.
        raise LLMError(JobErrorCode.REFUSED, f"the model refused: {refusal}", usage=usage)
    if finish_reason == "content_filter":
        raise LLMError(JobErrorCode.REFUSED, "the answer was stopped by the content filter", usage=usage)
    if finish_reason == "length":
        raise LLMError(JobErrorCode.TRUNCATED, "the answer was cut off at the token limit", usage=usage)
    return Completion(
        content=content or "", usage=usage, model=model[:MAX_MODEL_CHARS],
        response_id=(response_id or "")[:MAX_MODEL_CHARS] or None, finish_reasons=(finish_reason or "stop",),
        spent_for_s=spent_for_s,
    )  # fmt: skip


def request_options(model: str, *, json_schema: bool) -> dict[str, Any]:
    """A chat completion request's options besides its messages: the same for an interactive
    call and for a line of a provider batch."""
    return {
        "model": model,
        "temperature": 0,
        "response_format": STRUCTURED_FORMAT if json_schema else JSON_MODE_FORMAT,
    }


class OpenAIProvider:
    provider_name = "openai"  # gen_ai.provider.name, in the chat span

    def __init__(self, make_client: ClientFactory, *, model: str, stream: bool = True) -> None:
        self._make_client = make_client
        # An async HTTP client's connections belong to the event loop that opened them: one
        # client per loop (the async worker has one loop; RQ's fork and simple workers run
        # each job with asyncio.run, a new loop each time).
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncOpenAI] = weakref.WeakKeyDictionary()
        self._base_url = str(make_client().base_url)
        self._model = model
        # Streamed (LLM_STREAM): the answer's pieces reach `on_text` as the model writes them.
        self.stream = stream
        # Flipped off once the endpoint refuses json_schema. A forked work horse's flip
        # dies with it, so the worker keeps what was learnt in Redis (tasks.py) and sets
        # this before each job.
        self.json_schema = True

    @property
    def model(self) -> str:
        return self._model

    @property
    def endpoint(self) -> str:
        return f"{self._base_url}|{self._model}"

    @property
    def base_url(self) -> str:
        return self._base_url

    def _client(self) -> AsyncOpenAI:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = self._make_client()
        return client

    async def aclose(self) -> None:
        """Close this event loop's client (before a short-lived loop ends)."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()

    def warm_up(self) -> None:
        """Run the SDK once, offline, before the worker forks or starts its loop.

        The SDK builds its request and response models lazily on the first call (about
        20 ms); done here, every forked work horse inherits them instead of paying it per job.
        """

        def answer(request: httpx2.Request) -> httpx2.Response:
            content = Extraction.model_construct(
                summary="warm-up", sentiment=Sentiment.NEUTRAL, tags=["warm-up"], entities=[], language="en",
                toxicity_score=0.0,
            ).model_dump_json()  # fmt: skip
            usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            head = {"id": "warm-up", "created": 0, "model": self._model}
            if not self.stream:
                return httpx2.Response(200, json={**head, "object": "chat.completion", "usage": usage,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content, "refusal": None}}],
                })  # fmt: skip
            chunk = {**head, "object": "chat.completion.chunk"}
            events = [
                {**chunk, "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": "stop"}]},
                {**chunk, "choices": [], "usage": usage},
            ]
            body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            return httpx2.Response(200, text=body, headers={"content-type": "text/event-stream"})

        def offline() -> AsyncOpenAI:
            return AsyncOpenAI(
                api_key="warm-up", base_url="http://warm-up.invalid/v1", max_retries=0,
                http_client=openai.DefaultAsyncHttpxClient(transport=httpx2.MockTransport(answer)),
            )  # fmt: skip

        # Quiet: the SDK's HTTP client would log this fake request as if it went somewhere.
        http_log = logging.getLogger("httpx2")
        was_disabled, http_log.disabled = http_log.disabled, True
        try:
            asyncio.run(OpenAIProvider(offline, model=self._model, stream=self.stream).extract("warm-up"))
        finally:
            http_log.disabled = was_disabled

    async def extract(self, text: str, *, repair: Repair | None = None, on_text: OnText | None = None) -> Completion:
        messages = prompt.messages(text, repair)
        try:
            if self.stream:
                return await self._streamed(messages, on_text)
            raw = await self._create(messages)
            response = raw.parse()
        except openai.OpenAIError as exc:
            raise classify(exc) from exc
        except ValueError as exc:  # a 200 whose body claims JSON and is not (JSONDecodeError)
            raise _not_a_completion() from exc
        if not isinstance(response, ChatCompletion):  # the SDK hands back the text of a non-JSON body
            raise _not_a_completion()
        usage = usage_of(response)
        if not response.choices:
            raise LLMError(JobErrorCode.PROVIDER_ERROR, "the LLM answered with no choices", retryable=True, usage=usage)
        choice = response.choices[0]
        return completion_of(
            choice.message.content, getattr(choice.message, "refusal", None), choice.finish_reason, usage,
            response.model or self._model, response.id, rate_headers.spent_for_s(raw.headers),
        )  # fmt: skip

    async def _streamed(self, messages: Any, on_text: OnText | None) -> Completion:
        content: list[str] = []
        refusal: list[str] = []
        finish_reason: str | None = None
        usage, model, response_id = TokenUsage(), None, None
        async with await self._create(messages, stream=True) as chunks:
            if "text/event-stream" not in chunks.response.headers.get("content-type", ""):
                raise _not_a_completion()  # a proxy's page, a JSON error: not a stream at all
            spent_for_s = rate_headers.spent_for_s(chunks.response.headers)
            async for chunk in _broke_off_as_such(chunks):
                model = chunk.model or model
                response_id = chunk.id or response_id
                if chunk.usage is not None:  # the last chunk, with no choices (include_usage)
                    usage = usage_of(chunk)
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                if piece := choice.delta.content:
                    content.append(piece)
                    if on_text is not None:
                        on_text(piece)
                if piece := getattr(choice.delta, "refusal", None):
                    refusal.append(piece)
                finish_reason = choice.finish_reason or finish_reason
        if finish_reason is None:  # the stream ended without saying why
            raise _broke_off()
        return completion_of(
            "".join(content), "".join(refusal), finish_reason, usage, model or self._model, response_id, spent_for_s
        )

    async def _create(self, messages: Any, *, stream: bool = False) -> Any:  # Any: the SDK's TypedDict params
        """The stream, or (not streaming) the raw response: its headers are read too."""
        client = self._client()
        create = client.chat.completions.create if stream else client.chat.completions.with_raw_response.create
        options: dict[str, Any] = {"messages": messages}
        if stream:
            # include_usage: the last chunk carries the token counts, recorded as without streaming.
            options |= {"stream": True, "stream_options": {"include_usage": True}}
        if self.json_schema:
            try:
                return await create(**request_options(self._model, json_schema=True), **options)
            except openai.BadRequestError as exc:
                if not _rejects_json_schema(exc):
                    raise
                log.warning("endpoint refuses json_schema structured outputs; using JSON mode from now on")
                self.json_schema = False
        return await create(**request_options(self._model, json_schema=False), **options)
