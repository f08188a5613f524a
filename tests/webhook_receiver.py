"""A real webhook receiver on loopback (uvicorn, in a thread), verifying every request
with the `standardwebhooks` library and the service's secret, as a user's receiver would.

Each URL path is its own receiver: the answers of a path can be scripted (status codes,
or hang until released), and what arrived on it is kept.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

HANG = -1  # a scripted "answer": hold the request until released (or the client gives up)
HUGE = -2  # a scripted "answer": 500 with a body of 4 MiB


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    event: dict[str, Any] | None  # the verified event; None when verification failed
    error: str | None = None
    at: float = field(default_factory=time.monotonic)


class Receiver:
    def __init__(self, secret: str) -> None:
        self.webhook = Webhook(secret)
        self.port = 0
        self.received: defaultdict[str, list[Received]] = defaultdict(list)
        self.open_requests = 0  # requests being held (HANG) right now
        self._script: defaultdict[str, deque[int]] = defaultdict(deque)
        self._lock = threading.Lock()
        self._released: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = Starlette(
            routes=[
                Route("/_received/{path:path}", self._tally, methods=["GET"]),
                Route("/{path:path}", self._receive, methods=["POST"]),
            ]
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def script(self, path: str, *answers: int) -> None:
        """The status codes (or HANG) of the next requests to `path`; 204 after them."""
        with self._lock:
            self._script[path] = deque(answers)

    def release(self) -> None:
        """Answer every request held now (200); later HANGs hold again."""
        assert self._loop is not None

        def release() -> None:
            assert self._released is not None
            self._released.set()
            self._released = asyncio.Event()

        self._loop.call_soon_threadsafe(release)

    def events(self, path: str) -> list[Received]:
        with self._lock:
            return list(self.received[path])

    async def _tally(self, request: Request) -> Response:
        """What arrived on a path, for a receiver in another process (`python -m`)."""
        got = self.events(request.path_params["path"])
        at = [r.at for r in got]
        tally = {"received": len(got), "unverified": sum(r.error is not None for r in got), "at": at}
        return JSONResponse(tally)

    async def _receive(self, request: Request) -> Response:
        path = request.path_params["path"]
        body = await request.body()
        headers = dict(request.headers)
        try:
            event, error = self.webhook.verify(body, headers), None
        except WebhookVerificationError as exc:
            event, error = None, str(exc)
        with self._lock:
            self.received[path].append(Received(headers, body, event, error))
            answer = self._script[path].popleft() if self._script[path] else 204
        if answer == HANG:
            released = self._released
            assert released is not None
            with self._lock:
                self.open_requests += 1
            try:
                await released.wait()
            finally:
                with self._lock:
                    self.open_requests -= 1
            answer = 200
        if answer == HUGE:
            return Response(b"x" * (4 << 20), 500)
        if answer in (301, 302, 307, 308):
            return Response(None, answer, headers={"location": self.url("redirected")})
        return Response(None if answer == 204 else f"answer {answer}", answer)

    def start(self) -> Receiver:
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", timeout_graceful_shutdown=1
        )
        self._server = uvicorn.Server(config)

        def run() -> None:
            async def main() -> None:
                self._loop = asyncio.get_running_loop()
                self._released = asyncio.Event()
                assert self._server is not None
                await self._server.serve()

            asyncio.run(main())

        self._thread = threading.Thread(target=run, name="webhook-receiver", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("webhook receiver did not start")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._released is not None:
            self.release()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(5)


if __name__ == "__main__":
    # `python -m tests.webhook_receiver SECRET`: a receiver in a process of its own (the
    # benchmarks: its CPU is not the stub's), printing its port; GET /_received/PATH tells.
    import sys

    receiver = Receiver(sys.argv[1]).start()
    print(receiver.port, flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    receiver.stop()
