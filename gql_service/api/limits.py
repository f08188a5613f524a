"""Request body size limit, enforced before the body is buffered."""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gql_service.api.media_types import content_type_for


class BodyTooLarge(Exception):
    pass


def _too_large_body(limit: int) -> bytes:
    return orjson.dumps(
        {
            "data": None,
            "errors": [{"message": f"request body over {limit} bytes", "extensions": {"code": "BAD_USER_INPUT"}}],
        }
    )


class LimitBodySize:
    """413 for a declared Content-Length over the limit; a chunked body is cut when it gets there."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send, headers)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send, headers)

    async def _reject(self, send: Send, headers: dict[bytes, bytes]) -> None:
        content_type = content_type_for(headers)
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", content_type)]})
        await send({"type": "http.response.body", "body": _too_large_body(self.max_bytes)})
