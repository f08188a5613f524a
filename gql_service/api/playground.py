"""The GraphiQL playground page, served by the view at `GET /graphql` to a browser."""

from __future__ import annotations

import gzip
import hashlib
import re
from functools import cached_property
from pathlib import Path

import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

GRAPHIQL = Path(__file__).with_name("static") / "graphiql"


class Playground:
    """The GraphiQL page with its script and stylesheet inlined: one response, nothing from
    the internet, and the API's own settings (are keys needed?) in a JSON config element.
    Assembled on the first request, so API processes that never serve it never read it."""

    def __init__(self, *, api_keys: bool) -> None:
        self.api_keys = api_keys

    @cached_property
    def body(self) -> bytes:
        parts = {
            "graphiql.css": (GRAPHIQL / "graphiql.css").read_text(encoding="utf-8"),
            "graphiql.js": (GRAPHIQL / "graphiql.js").read_text(encoding="utf-8"),
            "config": orjson.dumps({"apiKeys": self.api_keys}).decode(),
        }
        template = (GRAPHIQL / "index.html").read_text(encoding="utf-8")
        # One pass over the template: what is inserted is never scanned for markers.
        page = re.sub(r"/\* (graphiql\.css|graphiql\.js|config) \*/", lambda m: parts[m[1]], template)
        return page.encode()

    @cached_property
    def gzipped(self) -> bytes:
        return gzip.compress(self.body, compresslevel=6, mtime=0)  # 1.4 MB -> about 0.4 MB

    @cached_property
    def etag(self) -> str:
        # Weak: the gzipped and the plain body are the same page.
        return f'W/"{hashlib.blake2b(self.body, digest_size=16).hexdigest()}"'

    def response(self, request: Request) -> Response:
        headers = {"etag": self.etag, "cache-control": "no-cache", "vary": "accept-encoding"}
        if self.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        if "gzip" in request.headers.get("accept-encoding", ""):
            return HTMLResponse(self.gzipped, headers={**headers, "content-encoding": "gzip"})
        return HTMLResponse(self.body, headers=headers)
