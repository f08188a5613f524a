"""A small OpenAI-compatible server for tests and benchmarks, on loopback.

It speaks enough of `POST /v1/chat/completions` for the real `openai` SDK, answers with a
valid extraction by default, and can be scripted to misbehave: HTTP errors, invalid
JSON, a refusal, truncation, an answer that breaks the schema, hanging, refusing the
json_schema response format, a stream cut off midway. Requests are recorded for assertions.

Asked for a stream (`"stream": true`), it answers in server-sent events as OpenAI does: the
content in `stream_chunks` pieces spread over `stream_seconds`, then the finish reason, then
(with `stream_options.include_usage`) a chunk with the usage and no choices, then `[DONE]`.

    stub = OpenAIStub().start()          # in a background thread
    stub.script(Fault.http(429), Fault.ok())
    ...; stub.requests[-1]["response_format"]
    stub.stop()

It also serves OpenAI's Batch API (`/v1/files`, `/v1/batches`), whose lines are answered by
the same code as `/v1/chat/completions` and take the same script: tests/openai_stub_batches.py,
kept as `stub.batches` (its controls and records are described there).

    stub.batches.expire_share = 0.1      # a tenth of the lines of batches made from now expire
    ...; stub.batches.created[-1].status; stub.batches.calls_interactive

`python -m tests.openai_stub --port 8100 --latency-ms 500` runs it on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .openai_stub_batches import BatchAPI

VALID_EXTRACTION: dict[str, Any] = {
    "summary": "A patient praises a kind doctor and a short wait at the clinic.",
    "sentiment": "positive",
    "tags": ["clinic", "healthcare"],
    "entities": [{"type": "PERSON", "value": "Dr. Rao", "confidence": 0.94}],
    "language": "en",
    "toxicity_score": 0.01,
}
USAGE = {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150}


@dataclass
class Fault:
    kind: str
    status: int = 200
    content: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def ok(cls, content: dict[str, Any] | None = None, *, headers: dict[str, str] | None = None) -> Fault:
        """A valid answer; `headers` go with it (a provider's x-ratelimit-* headers)."""
        return cls("ok", content=json.dumps(content or VALID_EXTRACTION), extra={"headers": headers or {}})

    @classmethod
    def raw(cls, content: str) -> Fault:
        """Answer 200 with this exact message content (invalid JSON, wrong schema...)."""
        return cls("ok", content=content)

    @classmethod
    def http(cls, status: int) -> Fault:
        return cls("status", status=status)

    @classmethod
    def rate_limited(cls, retry_after: str, *, at_once: bool = False) -> Fault:
        """429 with a Retry-After header (seconds or an HTTP date); `at_once`: without the
        stub's latency, as a provider refuses before it starts work."""
        extra: dict[str, Any] = {"headers": {"retry-after": retry_after}}
        if at_once:
            extra["latency_s"] = 0.0
        return cls("status", status=429, extra=extra)

    @classmethod
    def refusal(cls) -> Fault:
        return cls("refusal")

    @classmethod
    def truncated(cls) -> Fault:
        return cls("length")

    @classmethod
    def hang(cls, seconds: float = 60.0) -> Fault:
        return cls("hang", seconds=seconds)

    @classmethod
    def gated(cls, gate: threading.Event, seconds: float = 120.0) -> Fault:
        """A valid answer, held until the test sets `gate` (a call in flight for as long as a
        test needs one, ended by an event rather than a guessed delay); `seconds` bounds it."""
        return cls("gate", seconds=seconds, extra={"gate": gate})

    @classmethod
    def reject_json_schema(cls) -> Fault:
        return cls("reject_json_schema")

    @classmethod
    def body(cls, body: str, content_type: str = "text/html") -> Fault:
        """Answer 200 with this exact HTTP body: a proxy's error page, cut-off JSON..."""
        return cls("body", content=body, extra={"content_type": content_type})

    @classmethod
    def cut(cls, after_chunks: int = 3) -> Fault:
        """A streamed answer whose connection is dropped after this many content chunks."""
        return cls("cut", content=json.dumps(VALID_EXTRACTION), extra={"after": after_chunks})

    @classmethod
    def ended_early(cls, after_chunks: int = 3) -> Fault:
        """A streamed answer that ends cleanly (`[DONE]`) before any finish reason."""
        return cls("ended_early", content=json.dumps(VALID_EXTRACTION), extra={"after": after_chunks})

    @classmethod
    def model_named(cls, model: str, content: dict[str, Any] | None = None) -> Fault:
        """A valid answer that reports this model name."""
        return cls("ok", content=json.dumps(content or VALID_EXTRACTION), extra={"model": model})


def _completion(
    content: str | None, *, finish_reason: str = "stop", refusal: str | None = None, model: str
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": refusal},
                "finish_reason": finish_reason,
            }
        ],
        "usage": USAGE,
    }


class OpenAIStub:
    def __init__(self, *, port: int = 0, latency_s: float = 0.0, api_key: str | None = None) -> None:
        self.port = port
        self.latency_s = latency_s
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self.arrivals: list[float] = []  # time.monotonic() of each request, in order
        # The most requests in progress at once since reset(), counting only those that came
        # after it (a hanging request of an earlier test may still be open).
        self.most_open_calls = 0
        # As a provider does: more than this many requests in any 60 s are answered 429.
        self.enforce_rpm: int | None = None
        self.over_limit = 0  # requests answered 429 for it
        # Answer every request with this HTTP status (a provider that is down) until set
        # back to None; the script is kept for after.
        self.fail_all: int | None = None
        # Hold every request until this many are open at once, then answer them (after
        # latency_s): "all in flight together" however slowly a busy machine sends them.
        self.hold_until_open: int | None = None
        self._all_open: asyncio.Event | None = None  # made on the stub's own loop
        # Streamed answers: in this many content chunks, spread over this long.
        self.stream_chunks = 8
        self.stream_seconds = 0.0
        self._open_calls = 0
        self._generation = 0
        self._script: deque[Fault] = deque()
        # Re-entrant: a batch's lines are answered under it, and take the script's faults under it.
        self._lock = threading.RLock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        # The Batch and Files APIs: their state, controls and records (openai_stub_batches.py).
        self.batches = BatchAPI(self._answer_batched, self._lock, self._refuse)
        self.app = Starlette(
            routes=[Route("/v1/chat/completions", self._chat, methods=["POST"]), *self.batches.routes()]
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def env(self) -> dict[str, str]:
        """The settings that point a service's workers at this stub."""
        return {"LLM_PROVIDER": "openai", "OPENAI_API_KEY": "sk-stub", "OPENAI_BASE_URL": self.base_url}

    def script(self, *faults: Fault) -> None:
        """Answers for the next requests, in order; after them, valid answers again."""
        with self._lock:
            self._script = deque(faults)

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self.requests.clear()
            self.arrivals.clear()
            self.most_open_calls = self._open_calls = self.over_limit = 0
            self.enforce_rpm = None
            self.fail_all = None
            self.hold_until_open, self._all_open = None, None
            self._generation += 1
            self.latency_s = 0.0
            self.stream_chunks, self.stream_seconds = 8, 0.0
            self.batches.reset()

    def _next(self) -> Fault:
        with self._lock:
            return self._script.popleft() if self._script else Fault.ok()

    async def _chat(self, request: Request) -> Response:
        with self._lock:
            generation = self._generation
            self._open_calls += 1
            self.most_open_calls = max(self.most_open_calls, self._open_calls)
            if self.hold_until_open is not None:
                if self._all_open is None:
                    self._all_open = asyncio.Event()
                if self._open_calls >= self.hold_until_open:
                    self._all_open.set()
            all_open = self._all_open
        try:
            if all_open is not None:
                with contextlib.suppress(TimeoutError):  # a test that never sends them all fails on its own
                    async with asyncio.timeout(120):
                        await all_open.wait()
            return await self._answer(request)
        finally:
            with self._lock:
                if generation == self._generation:
                    self._open_calls -= 1

    async def _answer(self, request: Request) -> Response:
        body = await request.json()
        with self._lock:
            self.requests.append(body)
            self.arrivals.append(now := time.monotonic())
            over = self.enforce_rpm is not None and sum(now - t < 60 for t in self.arrivals) > self.enforce_rpm
            self.over_limit += over
            self.batches.calls_interactive += 1
        if over:
            return JSONResponse({"error": {"message": "rate limit", "type": "requests"}}, 429)
        if (refused := self._refuse(request)) is not None:
            return refused
        fault = self._next()
        if latency_s := fault.extra.get("latency_s", self.latency_s):
            await asyncio.sleep(latency_s)
        model = fault.extra.get("model") or body.get("model", "stub-model")
        refused_format = (body.get("response_format") or {}).get("type") == "json_schema"
        if (
            body.get("stream")
            and fault.kind in _STREAMED
            and not (fault.kind == "reject_json_schema" and refused_format)
        ):
            return self._stream(fault, body, model)
        if fault.kind == "hang":
            await asyncio.sleep(fault.seconds)
        elif fault.kind == "gate":
            await asyncio.to_thread(fault.extra["gate"].wait, fault.seconds)
        return self._reply(fault, body, model)

    def _refuse(self, request: Request) -> Response | None:
        """The answer to any request while the stub is down (`fail_all`) or the key is wrong."""
        if (down := self.fail_all) is not None:
            return JSONResponse({"error": {"message": f"stub is down ({down})", "type": "server_error"}}, down)
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return JSONResponse({"error": {"message": "Incorrect API key", "type": "invalid_request_error"}}, 401)
        return None

    def _answer_batched(self, body: dict[str, Any], fault: Fault | None) -> tuple[int, bytes]:
        """A batch line's answer (status, body): `fault`, else the script's next, as `_reply`
        gives it, without the latency, hang or gate waits (a batch line holds no connection)."""
        fault = fault or self._next()
        response = self._reply(fault, body, fault.extra.get("model") or body.get("model", "stub-model"))
        return response.status_code, bytes(response.body)

    def _reply(self, fault: Fault, body: dict[str, Any], model: str) -> Response:
        """The non-streamed answer to a chat request under `fault`, once any wait is over:
        shared by the interactive endpoint and the lines of a batch (tests/openai_stub_batches.py)."""
        if fault.kind == "body":
            return Response(fault.content, 200, media_type=fault.extra["content_type"])
        if fault.kind == "ok":
            return JSONResponse(_completion(fault.content, model=model), headers=fault.extra.get("headers"))
        if fault.kind == "status":
            return JSONResponse(
                {"error": {"message": f"stub error {fault.status}", "type": "server_error"}},
                fault.status,
                headers=fault.extra.get("headers"),
            )
        if fault.kind == "refusal":
            return JSONResponse(_completion(None, refusal="I can't help with that.", model=model))
        if fault.kind == "length":
            return JSONResponse(_completion('{"summary": "cut of', finish_reason="length", model=model))
        if fault.kind in ("hang", "gate"):  # the wait is the caller's: here, the valid answer after it
            return JSONResponse(_completion(json.dumps(VALID_EXTRACTION), model=model))
        if fault.kind == "reject_json_schema":
            if (body.get("response_format") or {}).get("type") == "json_schema":
                return JSONResponse(
                    {
                        "error": {
                            "message": "Invalid parameter: 'response_format' of type 'json_schema' is not supported.",
                            "type": "invalid_request_error",
                            "param": "response_format",
                        }
                    },
                    400,
                )
            return JSONResponse(_completion(json.dumps(VALID_EXTRACTION), model=model))
        raise AssertionError(f"unknown fault {fault.kind}")

    def start(self) -> OpenAIStub:
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,  # don't wait out a scripted hang
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="openai-stub", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("openai stub did not start")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(5)

    def _stream(self, fault: Fault, body: dict[str, Any], model: str) -> Response:
        content, refusal, finish = fault.content, None, "stop"
        if fault.kind == "refusal":
            content, refusal = None, "I can't help with that."
        elif fault.kind == "length":
            content, finish = '{"summary": "cut of', "length"
        elif fault.kind in ("hang", "reject_json_schema"):
            content = json.dumps(VALID_EXTRACTION)
        text = refusal or content or ""
        n = max(1, min(self.stream_chunks, len(text)))
        pieces = [text[len(text) * i // n : len(text) * (i + 1) // n] for i in range(n)]
        pause = self.stream_seconds / n
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        after = fault.extra.get("after")

        def event(choices: list[dict[str, Any]], **more: Any) -> bytes:
            chunk = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": int(time.time()),
                     "model": model, "choices": choices, **more}  # fmt: skip
            return f"data: {json.dumps(chunk)}\n\n".encode()

        async def events() -> AsyncIterator[bytes]:
            if fault.kind == "hang":
                await asyncio.sleep(fault.seconds)
            yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            for i, piece in enumerate(pieces):
                if i == after:
                    if fault.kind == "cut":
                        raise ConnectionAbortedError("the stub cuts this stream off")
                    yield b"data: [DONE]\n\n"
                    return
                delta = {"refusal": piece} if refusal else {"content": piece}
                yield event([{"index": 0, "delta": delta, "finish_reason": None}])
                if pause:
                    await asyncio.sleep(pause)
            yield event([{"index": 0, "delta": {}, "finish_reason": finish}])
            if usage:
                yield event([], usage=USAGE)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=fault.extra.get("headers"))


# What a streamed request gets as a stream (the others answer as without streaming: an HTTP
# error, a body that is not a stream at all).
_STREAMED = frozenset({"ok", "refusal", "length", "hang", "reject_json_schema", "cut", "ended_early"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    stub = OpenAIStub(port=args.port, latency_s=args.latency_ms / 1000)
    uvicorn.run(stub.app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
