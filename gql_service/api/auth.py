"""Optional API keys and tenants.

With `API_KEYS` set (JSON, key -> tenant), every GraphQL request needs
`Authorization: Bearer <key>`: HTTP in its header, websockets in the `connection_init`
payload (or the upgrade request's header). Jobs belong to the submitting tenant; other
tenants see them as missing. Keys are looked up by SHA-256 digest and never logged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from gql_service.api.media_types import content_type_for

PUBLIC_TENANT = "public"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def bearer(value: object) -> str | None:
    """The key in an `Authorization: Bearer <key>` value, if that is what it is."""
    if not isinstance(value, str):
        return None
    scheme, _, key = value.strip().partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


class ApiKeys:
    def __init__(self, keys: Mapping[str, str] | None) -> None:
        self._tenants = {_digest(k): t for k, t in (keys or {}).items()}

    @property
    def enabled(self) -> bool:
        return bool(self._tenants)

    def tenant(self, authorization: object) -> str | None:
        """The caller's tenant, or None when the credentials are missing or wrong."""
        if not self.enabled:
            return PUBLIC_TENANT
        key = bearer(authorization)
        return self._tenants.get(_digest(key)) if key else None

    def tenant_from_params(self, params: object) -> str | None:
        """From a websocket `connection_init` payload: {"Authorization": "Bearer <key>"}."""
        if not isinstance(params, dict):
            return None
        value = params.get("Authorization", params.get("authorization"))
        return self.tenant(value)


UNAUTHENTICATED_BODY = orjson.dumps(
    {"data": None, "errors": [{"message": "a valid API key is required", "extensions": {"code": "UNAUTHENTICATED"}}]}
)


class RequireApiKey:
    """ASGI middleware: HTTP GraphQL requests without a valid key get 401 before any work."""

    def __init__(self, app: ASGIApp, *, keys: ApiKeys, path: str = "/graphql") -> None:
        self.app = app
        self.keys = keys
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled or scope["path"] != self.path or _is_ide_page(scope):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        tenant = self.keys.tenant(headers.get(b"authorization", b"").decode("latin-1"))
        if tenant is None:
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", content_type_for(headers)), (b"www-authenticate", b"Bearer"),
            ]})  # fmt: skip
            await send({"type": "http.response.body", "body": UNAUTHENTICATED_BODY})
            return
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)


def _is_ide_page(scope: Scope) -> bool:
    # The GraphiQL page itself is static; the queries it sends carry the key.
    if scope["method"] != "GET" or scope.get("query_string"):
        return False
    accept = dict(scope["headers"]).get(b"accept", b"")
    return b"text/html" in accept
