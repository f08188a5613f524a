"""OpenAI's Batch API (and the Files API under it) for the stub of tests/openai_stub.py.

`OpenAIStub` mounts `BatchAPI.routes()` and keeps the instance as `stub.batches`:

    POST   /v1/files                  multipart `file` + `purpose=batch` -> File object
    GET    /v1/files/{id}             File object; 404 once deleted
    GET    /v1/files/{id}/content     the bytes, streamed in `content_chunk_bytes` pieces
    DELETE /v1/files/{id}             {"id", "object": "file", "deleted": true}
    POST   /v1/batches                {"input_file_id", "endpoint", "completion_window", "metadata"}
    GET    /v1/batches/{id}           the Batch object, advanced one step (below)
    GET    /v1/batches                newest first; `limit`, `after`
    POST   /v1/batches/{id}/cancel    `cancelling`, then `cancelled` at the next poll

A batch advances only when it is polled (GET /v1/batches/{id}), one step per poll, so a test
sees every state without sleeping: `validating` -> `in_progress` (or `failed`: an invalid
input file, `fail_next`) -> `progress_share` of its lines answered per poll, the counts
rising -> `finalizing` -> `completed`; or `expired` when lines were let expire; or
`cancelling` -> `cancelled`. `instant = True` runs a polled batch to its end at once.

Each line is answered by the stub's own answer to `POST /v1/chat/completions` (not
streamed, without its latency, hang or gate waits): `faults[custom_id]` if set, else the
next fault of `stub.script(...)` (lines are answered in input order), else a valid answer.
An answer with HTTP status < 400 goes to the output file, any other to the error file:

    {"id": "batch_req_…", "custom_id": "…", "response": {"status_code": 200,
     "request_id": "<32 hex>", "body": <chat.completion>}, "error": null}
    {"id": "batch_req_…", "custom_id": "…", "response": {"status_code": 500,
     "request_id": "<32 hex>", "body": {"error": {"message", "type", "param", "code"}}}, "error": null}

and (`unfinished_in_error_file`, the default) each line left unanswered by an expiry or a cancel:

    {"id": "batch_req_…", "custom_id": "…", "response": null,
     "error": {"code": "batch_expired" | "batch_cancelled", "message": "…"}}

The error body is the provider's own for `error_ids` / `error_share` lines, and the stub's
interactive one for a scripted `Fault.http(...)` (`{"error": {"message", "type"}}`).
`Fault.body(text)` puts `text` verbatim where the body goes: a line that is not JSON.

Controls a test sets on `stub.batches` (`reset()` restores them). The first group is taken
when a batch is created, so changing them never alters a batch already made:
    expire_share: float, expire_ids: set[str]   lines the provider lets expire: unanswered,
        in the error file as `batch_expired` (below); the batch ends `expired` with
        `expired_at`, its counts leaving them out of completed and failed
    error_share: float, error_ids: set[str], error_status: int (500)   lines answered in the
        error file with that status (an expiring line is not also an error line)
    unfinished_in_error_file: bool (True)   expired / cancelled lines written to the error
        file (counted neither completed nor failed), as OpenAI's batch guide documents;
        False: left out of both files, as some compatible servers do
    shuffle_output: bool (True)   output and error lines in another order than the input's
        (OpenAI does not keep it): a fixed permutation per batch, never the identity
    hold: threading.Event | None   batches made while set stay `in_progress` (all lines
        answered) until the event is set
    create_gate: threading.Event | None   POST /v1/batches waits for it before it makes the
        batch (`create_asked` is set when such a request arrives): a client can be killed
        while its create is in flight, and the batch still made
    fail_next(message, code=...)  the next batch created fails as a whole at validation
    cancel_next(after_lines=0)    the next batch is cancelled by the provider once this many
        of its lines are answered
Read at each poll: `progress_share: float` (0.25), `instant: bool` (False).
Anytime: `faults[custom_id] = Fault...` (used once), `cancel(batch_id)` (a provider-side
cancel), `finish(batch_id)` (run it to its end or its hold, from the test's thread).

Recorded: `created` (every batch, a `StubBatch`: its lines, the ids chosen to expire or
fail, its output and error lines, `polls`, `cancelled_by`), `batch(id)`, `uploads` (every
uploaded file, bytes kept after a delete), `content(file_id)` (any file's bytes), `deleted`
(file ids), `calls_batched` / `calls_interactive` (chat requests answered through batches /
by `POST /v1/chat/completions`). Memory is bounded: at most `max_batches` batches and
`max_files` files / `max_stored_bytes` bytes are kept (the oldest go first), an upload over
`max_file_bytes` is refused 413 (a test may lower these; `reset()` restores them).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from email.message import Message
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

if TYPE_CHECKING:
    from .openai_stub import Fault

ENDPOINT = "/v1/chat/completions"
WINDOW = "24h"
WINDOW_S = 24 * 3600
FILE_LIFETIME_S = 30 * 24 * 3600  # files with purpose "batch" expire after 30 days by default
TERMINAL = frozenset({"failed", "completed", "expired", "cancelled"})
UNFINISHED_MESSAGES = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
}
PROVIDER_ERROR = {
    "message": "The server had an error while processing your request. Sorry about that!",
    "type": "server_error",
    "param": None,
    "code": None,
}

# A request body and the fault set for its custom_id (None: the stub's script) -> the
# HTTP status and body the interactive endpoint would have answered.
Answer = Callable[[dict[str, Any], "Fault | None"], tuple[int, bytes]]
# What a route answers instead of its work (a provider that is down, a wrong key), or None.
Guard = Callable[[Request], Response | None]


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


@dataclass
class StubFile:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int
    deleted: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "expires_at": self.created_at + FILE_LIFETIME_S,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


@dataclass(frozen=True)
class Line:
    number: int  # 1-based, as OpenAI's errors.data[].line counts them
    custom_id: str
    body: dict[str, Any]


@dataclass
class StubBatch:
    """One batch as the stub holds it; `to_json()` is what the API answers."""

    id: str
    input_file_id: str
    metadata: dict[str, str] | None
    created_at: int
    lines: list[Line]
    problems: list[dict[str, Any]]  # errors.data it fails with at validation, if any
    expire_ids: frozenset[str]
    error_ids: frozenset[str]
    error_status: int
    unfinished_in_error_file: bool
    shuffle_output: bool
    hold: threading.Event | None
    cancel_after: int | None  # the provider cancels it once this many lines are answered
    status: str = "validating"
    polls: int = 0
    cancelled_by: str | None = None  # "client" or "provider"
    outputs: dict[str, str] = field(default_factory=dict)  # custom_id -> its output file line
    failures: dict[str, str] = field(default_factory=dict)  # custom_id -> its error file line
    # Lines an expiry or a cancel left unanswered, in the error file too but not counted as
    # failed (as OpenAI reports them: `completed + failed < total`).
    unfinished: dict[str, str] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    times: dict[str, int | None] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "in_progress_at",
                "finalizing_at",
                "completed_at",
                "failed_at",
                "expired_at",
                "cancelling_at",
                "cancelled_at",
            )
        )
    )

    @property
    def custom_ids(self) -> list[str]:
        return [line.custom_id for line in self.lines]

    @property
    def answered(self) -> int:
        return len(self.outputs) + len(self.failures)

    def to_json(self) -> dict[str, Any]:
        # OpenAI reports total 0 until validation has counted the lines, and for a batch
        # that failed validation.
        counted = self.status != "validating" and self.status != "failed"
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": ENDPOINT,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": WINDOW,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.times["in_progress_at"],
            "expires_at": self.created_at + WINDOW_S,
            "finalizing_at": self.times["finalizing_at"],
            "completed_at": self.times["completed_at"],
            "failed_at": self.times["failed_at"],
            "expired_at": self.times["expired_at"],
            "cancelling_at": self.times["cancelling_at"],
            "cancelled_at": self.times["cancelled_at"],
            "request_counts": {
                "total": len(self.lines) if counted else 0,
                "completed": len(self.outputs),
                "failed": len(self.failures),
            },
            "metadata": self.metadata,
        }


def parse_input(content: bytes) -> tuple[list[Line], list[dict[str, Any]]]:
    """The lines of a batch input file, and what OpenAI's validation would fail it for
    (`errors.data` entries, at most 100: a broken file of 50,000 lines stays small)."""
    lines: list[Line] = []
    problems: list[dict[str, Any]] = []

    def problem(number: int, code: str, message: str, param: str | None = None) -> None:
        if len(problems) < 100:
            problems.append({"code": code, "message": message, "param": param, "line": number})

    raw_lines = content.split(b"\n")
    if raw_lines and not raw_lines[-1].strip():
        raw_lines.pop()  # the newline that ends the last line
    if not raw_lines:
        return [], [{"code": "empty_file", "message": "The batch input file is empty.", "param": None, "line": None}]
    seen: set[str] = set()
    for number, raw in enumerate(raw_lines, 1):
        try:
            item = json.loads(raw)
        except ValueError:
            item = None
        if not isinstance(item, dict):
            problem(number, "invalid_json_line", "This line is not parseable as valid JSON.")
            continue
        missing = [key for key in ("custom_id", "method", "url", "body") if key not in item]
        if missing:
            problem(number, "missing_required_parameter", f"Missing required parameter: '{missing[0]}'.", missing[0])
            continue
        custom_id, body = item["custom_id"], item["body"]
        if not isinstance(custom_id, str) or not custom_id:
            problem(number, "invalid_custom_id", "The custom_id must be a non-empty string.", "custom_id")
        elif custom_id in seen:
            problem(
                number,
                "duplicate_custom_id",
                "The custom_id for this request is a duplicate of another request. "
                "The custom_id parameter must be unique for each request in a batch.",
                "custom_id",
            )
        elif item["method"] != "POST":
            problem(number, "invalid_method", "The method for this request must be 'POST'.", "method")
        elif item["url"] != ENDPOINT:
            problem(
                number, "invalid_url", "The URL provided for this request does not match the batch endpoint.", "url"
            )
        elif not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            problem(number, "invalid_request", "The body must be a chat completion request.", "body")
        else:
            seen.add(custom_id)
            lines.append(Line(number, custom_id, body))
    return lines, problems


def _spread(candidates: list[str], share: float) -> set[str]:
    """`share` of `candidates`, spread evenly over them (every 4th for 0.25), the same each run."""
    share = min(max(share, 0.0), 1.0)
    return {cid for i, cid in enumerate(candidates) if int((i + 1) * share + 1e-9) > int(i * share + 1e-9)}


def _reordered(entries: list[str], seed: str) -> list[str]:
    """A permutation of `entries` that is never their own order (when there are two or more)."""
    shuffled = entries[:]
    random.Random(seed).shuffle(shuffled)
    if len(shuffled) > 1 and shuffled == entries:
        shuffled = shuffled[1:] + shuffled[:1]
    return shuffled


def _multipart(content_type: str, data: bytes) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body's parts by name: (filename, bytes). Starlette's own form
    parsing needs python-multipart, which the project does not install."""
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
        return {}
    parts: dict[str, tuple[str | None, bytes]] = {}
    for chunk in data.split(b"--" + boundary.encode())[1:-1]:
        head, _, payload = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = Message()
        for raw in head.decode("utf-8", "replace").split("\r\n"):
            name, _, value = raw.partition(":")
            headers[name.strip()] = value.strip()
        field_name = headers.get_param("name", header="content-disposition")
        filename = headers.get_param("filename", header="content-disposition")
        if isinstance(field_name, str):
            parts[field_name] = (filename if isinstance(filename, str) else None, payload.removesuffix(b"\r\n"))
    return parts


class BatchAPI:
    def __init__(self, answer: Answer, lock: threading.RLock, guard: Guard | None = None) -> None:
        self._answer = answer
        self._lock = lock  # the stub's, re-entrant: a line's answer takes it again for the script
        self._guard = guard
        self._files: OrderedDict[str, StubFile] = OrderedDict()  # live and deleted, oldest first
        self._batches: OrderedDict[str, StubBatch] = OrderedDict()
        self.deleted: list[str] = []
        self.faults: dict[str, Fault] = {}
        self.expire_ids: set[str] = set()
        self.error_ids: set[str] = set()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._files.clear()
            self._batches.clear()
            self.deleted = []
            # Bounds on what is kept (a test may lower them; the next reset() restores them).
            self.max_batches = 200
            self.max_files = 500
            self.max_stored_bytes = 256 * 2**20
            self.max_file_bytes = 64 * 2**20
            self.content_chunk_bytes = 4096  # a line often spans two chunks of a streamed download
            self.calls_batched = 0
            self.calls_interactive = 0
            self.faults = {}
            self.progress_share = 0.25
            self.instant = False
            self.expire_share, self.expire_ids = 0.0, set()
            self.error_share, self.error_ids, self.error_status = 0.0, set(), 500
            self.unfinished_in_error_file = True
            self.shuffle_output = True
            self.hold: threading.Event | None = None
            self.create_gate: threading.Event | None = None
            self.create_asked = threading.Event()
            self._fail_next: dict[str, Any] | None = None
            self._cancel_next: int | None = None

    # --- controls and records for tests -------------------------------------------------

    def fail_next(
        self,
        message: str = "Enqueued token limit reached for stub-model. Please try again once some in_progress "
        "batches have been completed.",
        *,
        code: str = "token_limit_exceeded",
    ) -> None:
        """The next batch created fails as a whole at validation, with this error in `errors.data`."""
        with self._lock:
            self._fail_next = {"code": code, "message": message, "param": None, "line": None}

    def cancel_next(self, after_lines: int = 0) -> None:
        """The provider cancels the next batch created once `after_lines` of its lines are answered."""
        with self._lock:
            self._cancel_next = after_lines

    def cancel(self, batch_id: str) -> None:
        """Cancel a batch from the provider's side now: `cancelling`, `cancelled` at the next poll."""
        with self._lock:
            batch = self._batches[batch_id]
            if batch.status not in TERMINAL and batch.status != "cancelling":
                self._start_cancel(batch, "provider")

    def finish(self, batch_id: str) -> dict[str, Any]:
        """Run a batch to its end (or its hold) from the test's thread; its Batch object."""
        with self._lock:
            batch = self._batches[batch_id]
            while self._step(batch):
                pass
            return batch.to_json()

    def batch(self, batch_id: str) -> StubBatch:
        with self._lock:
            return self._batches[batch_id]

    @property
    def created(self) -> list[StubBatch]:
        """Every batch created since reset() (the newest `max_batches`), oldest first."""
        with self._lock:
            return list(self._batches.values())

    @property
    def uploads(self) -> list[StubFile]:
        """Every file a client uploaded (not the output files), deleted ones included, oldest first."""
        with self._lock:
            return [f for f in self._files.values() if f.purpose == "batch"]

    def content(self, file_id: str) -> bytes:
        """A file's bytes, deleted or not (an output file a test wants to read without the API)."""
        with self._lock:
            return self._files[file_id].content

    # --- the HTTP API ---------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            Route("/v1/files", self._upload, methods=["POST"]),
            Route("/v1/files/{file_id}", self._get_file, methods=["GET"]),
            Route("/v1/files/{file_id}", self._delete_file, methods=["DELETE"]),
            Route("/v1/files/{file_id}/content", self._file_content, methods=["GET"]),
            Route("/v1/batches", self._create, methods=["POST"]),
            Route("/v1/batches", self._list, methods=["GET"]),
            Route("/v1/batches/{batch_id}", self._get_batch, methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", self._cancel, methods=["POST"]),
        ]

    async def _upload(self, request: Request) -> Response:
        if (refused := self._guard and self._guard(request)) is not None:
            return refused
        declared = request.headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > self.max_file_bytes + 64 * 1024:  # refused unread
            return _error(413, f"File too large: the stub takes at most {self.max_file_bytes} bytes.")
        data = await request.body()
        if len(data) > self.max_file_bytes + 64 * 1024:  # the form's own headers are small
            return _error(413, f"File too large: the stub takes at most {self.max_file_bytes} bytes.")
        form = _multipart(request.headers.get("content-type", ""), data)
        filename, content = form.get("file", (None, b""))
        purpose = form.get("purpose", (None, b""))[1].decode("utf-8", "replace")
        if filename is None:
            return _error(400, "Missing required parameter: 'file'.", param="file")
        if purpose != "batch":  # the only purpose this stub has a use for
            return _error(400, f"Invalid purpose {purpose!r}: the stub takes 'batch' files.", param="purpose")
        if len(content) > self.max_file_bytes:
            return _error(413, f"File too large: the stub takes at most {self.max_file_bytes} bytes.")
        file = StubFile(_new_id("file-"), filename, purpose, content, int(time.time()))
        with self._lock:
            self._keep(file)
        return JSONResponse(file.to_json())

    async def _get_file(self, request: Request) -> Response:
        if (refused := self._guard and self._guard(request)) is not None:
            return refused
        with self._lock:
            file = self._live_file(request.path_params["file_id"])
            return JSONResponse(file.to_json()) if file else self._no_file(request)

    async def _file_content(self, request: Request) -> Response:
        if (refused := self._guard and self._guard(request)) is not None:
            return refused
        with self._lock:
            file, size = self._live_file(request.path_params["file_id"]), self.content_chunk_bytes
        if file is None:
            return self._no_file(request)
        content = file.content  # bytes: safe to stream outside the lock

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(content), size):
                yield content[start : start + size]

        return StreamingResponse(chunks(), media_type="application/octet-stream")

    async def _delete_file(self, request: Request) -> Response:
        if (refused := self._guard and self._guard(request)) is not None:
            return refused
        with self._lock:
            file = self._live_file(request.path_params["file_id"])
            if file is None:
                return self._no_file(request)
            file.deleted = True  # its bytes stay for assertions until the bounds evict them
            self.deleted.append(file.id)
            del self.deleted[: -self.max_files * 4]
        return JSONResponse({"id": file.id, "object": "file", "deleted": True})

    async def _create(self, request: Request) -> Response:
        if (refused := self._guard and self._guard(request)) is not None:
            return refused
        try:
            params = await request.json()
        except ValueError:
            return _error(400, "The request body is not valid JSON.")
        if not isinstance(params, dict):
            return _error(400, "The request body must be a JSON object.")
        if params.get("endpoint") != ENDPOINT:
            return _error(400, f"Invalid 'endpoint': the stub serves {ENDPOINT!r}.", param="endpoint")
        if params.get("completion_window") != WINDOW:
            return _error(400, "Invalid 'completion_window': only '24h' is supported.", param="completion_window")
        metadata = params.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict)
            and len(metadata) <= 16
            and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        ):
            return _error(400, "Invalid 'metadata': at most 16 string keys and values.", param="metadata")
        input_file_id = params.get("input_file_id")
        self.create_asked.set()
        if (gate := self.create_gate) is not None:  # the batch is made once the test lets it
            await asyncio.to_thread(gate.wait, 120)
        with self._lock:
            file = self._live_file(input_file_id) if isinstance(input_file_id, str) else None
            if file is None:
                return _error(404, f"No such File object: {input_file_id}", param="input_file_id")
            lines, problems = parse_input(file.content)
            if self._fail_next is not None:  # taken by this batch even when its file is invalid too
                problems, self._fail_next = [*problems, self._fail_next], None
            custom_ids = [line.custom_id for line in lines]
            expire = {c for c in custom_ids if c in self.expire_ids} | _spread(custom_ids, self.expire_share)
            not_expiring = [c for c in custom_ids if c not in expire]
            errors = (
                {c for c in not_expiring if c in self.error_ids} | _spread(not_expiring, self.error_share)
            ) - expire
            batch = StubBatch(
                id=_new_id("batch_"),
                input_file_id=file.id,
                metadata=metadata,
                created_at=int(time.time()),
                lines=lines,
                problems=problems,
                expire_ids=frozenset(expire),
                error_ids=frozenset(errors),
                error_status=self.error_status,
                unfinished_in_error_file=self.unfinished_in_error_file,
                shuffle_output=self.shuffle_output,
                hold=self.hold,
                cancel_after=self._cancel_next,
            )
            self._cancel_next = None
            self._batches[batch.id] = batch
            while len(self._batches) > self.max_batches:
                self._batches.popitem(last=False)
            return JSONResponse(batch.to_json())

    def _on_batch(self, request: Request, act: Callable[[StubBatch], Response]) -> Response:
        """`act` on the batch the path names, under the lock; or why not (refused, unknown)."""
        if (refused := self._guard and self._guard(request)) is not None:
            return refused
        with self._lock:
            batch = self._batches.get(request.path_params["batch_id"])
            return self._no_batch(request) if batch is None else act(batch)

    async def _get_batch(self, request: Request) -> Response:
        return self._on_batch(request, self._polled)

    def _polled(self, batch: StubBatch) -> Response:
        batch.polls += 1
        # One step per poll, so a client sees each state and its counts rise; or all at once.
        if self.instant:
            while self._step(batch):
                pass
        else:
            self._step(batch)
        return JSONResponse(batch.to_json())

    async def _list(self, request: Request) -> Response:
        if (refused := self._guard and self._guard(request)) is not None:
            return refused
        try:
            limit = min(max(int(request.query_params.get("limit", "20")), 1), 100)
        except ValueError:
            return _error(400, "Invalid 'limit': an integer from 1 to 100.", param="limit")
        after = request.query_params.get("after")
        with self._lock:
            newest_first = list(reversed(self._batches.values()))
            if after is not None:
                ids = [b.id for b in newest_first]
                newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
            page = [b.to_json() for b in newest_first[:limit]]
            return JSONResponse(
                {
                    "object": "list",
                    "data": page,
                    "first_id": page[0]["id"] if page else None,
                    "last_id": page[-1]["id"] if page else None,
                    "has_more": len(newest_first) > limit,
                }
            )

    async def _cancel(self, request: Request) -> Response:
        return self._on_batch(request, self._cancelled)

    def _cancelled(self, batch: StubBatch) -> Response:
        if batch.status in TERMINAL:
            return _error(409, f"Cannot cancel a batch with status '{batch.status}'.")
        if batch.status != "cancelling":
            self._start_cancel(batch, "client")
        return JSONResponse(batch.to_json())

    # --- how a batch advances (all under the lock) ----------------------------------------

    def _step(self, batch: StubBatch) -> bool:
        """Move `batch` one step on; False when it cannot move (ended, or held)."""
        now = int(time.time())
        if batch.status == "validating":
            if batch.problems:
                batch.status, batch.times["failed_at"], batch.errors = "failed", now, batch.problems
            else:
                batch.status, batch.times["in_progress_at"] = "in_progress", now
            return True
        if batch.status == "in_progress":
            pending = [
                line
                for line in batch.lines
                if line.custom_id not in batch.expire_ids
                and line.custom_id not in batch.outputs
                and line.custom_id not in batch.failures
            ]
            if batch.cancel_after is not None and batch.answered >= batch.cancel_after:
                self._start_cancel(batch, "provider")
                return True
            if pending:
                n = max(1, math.ceil(len(batch.lines) * self.progress_share))
                if batch.cancel_after is not None:
                    n = min(n, batch.cancel_after - batch.answered)
                for line in pending[:n]:
                    self._answer_line(batch, line)
                return True
            if batch.hold is not None and not batch.hold.is_set():
                return False
            if batch.expire_ids:  # what is left will not be answered in the window
                self._close(batch, "expired", "expired_at")
            else:
                batch.status, batch.times["finalizing_at"] = "finalizing", now
            return True
        if batch.status == "finalizing":
            self._close(batch, "completed", "completed_at")
            return True
        if batch.status == "cancelling":
            self._close(batch, "cancelled", "cancelled_at")
            return True
        return False

    def _start_cancel(self, batch: StubBatch, by: str) -> None:
        batch.status, batch.times["cancelling_at"], batch.cancelled_by = "cancelling", int(time.time()), by

    def _answer_line(self, batch: StubBatch, line: Line) -> None:
        if line.custom_id in batch.error_ids:
            status, raw = batch.error_status, json.dumps({"error": PROVIDER_ERROR}).encode()
        else:
            # The stub's script is shared with the interactive endpoint, and _next() takes the
            # (re-entrant) lock again: lines take its faults in input order.
            status, raw = self._answer(line.body, self.faults.pop(line.custom_id, None))
            self.calls_batched += 1
        entry: dict[str, Any] = {
            "id": _new_id("batch_req_"),
            "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": secrets.token_hex(16), "body": None},
            "error": None,
        }
        try:
            entry["response"]["body"] = json.loads(raw)
            text = json.dumps(entry)
        except ValueError:
            # A scripted Fault.body(): its text goes in verbatim, one line the client cannot parse.
            verbatim = raw.decode("utf-8", "replace").replace("\r", " ").replace("\n", " ")
            text = json.dumps(entry).replace('"body": null', '"body": ' + verbatim, 1)
        (batch.outputs if status < 400 else batch.failures)[line.custom_id] = text

    def _close(self, batch: StubBatch, status: str, stamp: str) -> None:
        """End `batch` with `status`: write its output and error files (each only if it has lines)."""
        if batch.unfinished_in_error_file and status in ("expired", "cancelled"):
            code = "batch_expired" if status == "expired" else "batch_cancelled"
            for line in batch.lines:
                if line.custom_id not in batch.outputs and line.custom_id not in batch.failures:
                    entry = {
                        "id": _new_id("batch_req_"),
                        "custom_id": line.custom_id,
                        "response": None,
                        "error": {"code": code, "message": UNFINISHED_MESSAGES[code]},
                    }
                    batch.unfinished[line.custom_id] = json.dumps(entry)
        now = int(time.time())
        for kind, entries in (("output", batch.outputs), ("error", batch.failures | batch.unfinished)):
            if not entries:
                continue
            ordered = list(entries.values())
            if batch.shuffle_output:
                ordered = _reordered(ordered, batch.id + kind)
            content = ("\n".join(ordered) + "\n").encode()
            file = StubFile(_new_id("file-"), f"{batch.id}_{kind}.jsonl", "batch_output", content, now)
            self._keep(file)
            if kind == "output":
                batch.output_file_id = file.id
            else:
                batch.error_file_id = file.id
        batch.status, batch.times[stamp] = status, now

    # --- storage --------------------------------------------------------------------------

    def _keep(self, file: StubFile) -> None:
        self._files[file.id] = file
        stored = sum(len(f.content) for f in self._files.values())
        while len(self._files) > self.max_files or (stored > self.max_stored_bytes and len(self._files) > 1):
            _, oldest = self._files.popitem(last=False)
            stored -= len(oldest.content)

    def _live_file(self, file_id: str) -> StubFile | None:
        file = self._files.get(file_id)
        return None if file is None or file.deleted else file

    @staticmethod
    def _no_file(request: Request) -> Response:
        return _error(404, f"No such File object: {request.path_params['file_id']}", param="id")

    @staticmethod
    def _no_batch(request: Request) -> Response:
        return _error(404, f"No batch found with id '{request.path_params['batch_id']}'.", param="batch_id")
