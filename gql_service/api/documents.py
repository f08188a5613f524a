"""Which document a request runs: sent in full, a trusted document named by its id, or an
automatic persisted query named by its hash.

* **Trusted documents** (TRUSTED_DOCUMENTS): manifests `{"<sha256 hex>": "<document>"}`, as
  GraphQL Code Generator's client preset (`persisted-documents.json`) and relay-compiler's
  local `persistConfig` (with `"algorithm": "SHA256"`) write them, loaded and validated
  against the schema once, at start-up. A request names one by `documentId: "sha256:<hex>"`
  (the GraphQL-over-HTTP persisted documents appendix), Relay's `doc_id` (or `id`), or
  `extensions.persistedQuery.sha256Hash`. With TRUSTED_DOCUMENTS_ONLY, nothing else runs:
  every hostile document is refused before it is parsed.
* **Automatic persisted queries** (APQ, Apollo's protocol, version 1): a client sends the
  hash alone; an unknown one is PERSISTED_QUERY_NOT_FOUND (HTTP 200, so Apollo's link sends
  the query with its hash, which is checked, stored and run). Stored in Redis, bounded in
  count and size (`PersistedQueries`), so a client can't fill Redis with them.

Error codes are Apollo Router's, so clients and dashboards built for it read them as is.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graphql import GraphQLError, GraphQLSchema, parse, validate
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.requests import HTTPConnection

from gql_service import keys
from gql_service.api.errors import ClientError
from gql_service.settings import Settings

log = logging.getLogger(__name__)

NOT_FOUND = "PERSISTED_QUERY_NOT_FOUND"
NOT_SUPPORTED = "PERSISTED_QUERY_NOT_SUPPORTED"
NOT_IN_LIST = "PERSISTED_QUERY_NOT_IN_LIST"
ID_REQUIRED = "PERSISTED_QUERY_ID_REQUIRED"
# Where a request names a document by id: the GraphQL-over-HTTP appendix's, then Relay's.
ID_FIELDS = ("documentId", "doc_id", "id")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Answered 200: Apollo's link retries with the full query (or stops hashing) on these.
_ANSWERED_200 = frozenset({NOT_FOUND, NOT_SUPPORTED})


class DocumentRefused(ClientError):
    """The request names no document this service will run; `code` says why."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)

    @property
    def status(self) -> int:
        return 200 if self.code in _ANSWERED_200 else 400


class ManifestError(ValueError):
    """A trusted-documents manifest that can't be used, in one line naming it."""


def sha256_hex(document: str) -> str:
    return hashlib.sha256(document.encode(errors="surrogatepass")).hexdigest()


def load_manifests(paths: Iterable[str], schema: GraphQLSchema) -> dict[str, str]:
    """Every document of the manifests, by id; each id the SHA-256 of its document, each
    document valid against the schema (or ManifestError)."""
    documents: dict[str, str] = {}
    for path in paths:
        try:
            manifest = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{path}: can't read it as JSON ({exc})") from None
        if not isinstance(manifest, dict):
            raise ManifestError(f'{path}: must be a JSON object {{"<sha256 hex>": "<document>"}}')
        for doc_id, document in manifest.items():
            if not isinstance(document, str) or not _SHA256_HEX.fullmatch(doc_id):
                raise ManifestError(f'{path}: entry {doc_id[:80]!r} is not "<sha256 hex>": "<document>"')
            if sha256_hex(document) != doc_id:
                raise ManifestError(f"{path}: document {doc_id} is not the SHA-256 of its text")
            try:
                errors = validate(schema, parse(document, no_location=True))
            except GraphQLError as exc:
                errors = [exc]
            if errors:
                raise ManifestError(f"{path}: document {doc_id} does not validate: {errors[0].message}")
            documents[doc_id] = document
    return documents


def documents_from(settings: Settings, schema: GraphQLSchema) -> Documents:
    """The service's rules, from its settings (ManifestError for a manifest that won't do)."""
    apq = None
    if settings.apq:
        apq = PersistedQueries(
            max_documents=settings.apq_max_documents,
            max_bytes=settings.apq_max_document_bytes,
            ttl_s=settings.apq_ttl_s,
            timeout_s=settings.redis_timeout_s,
        )
    return Documents(
        load_manifests(settings.trusted_document_paths, schema),
        apq,
        only=settings.trusted_documents_only,
        require_id=settings.trusted_documents_require_id,
        allow_own_pages=settings.trusted_documents_allow_playground,
    )


# -- the APQ store ---------------------------------------------------------------------
# Registering one: store it, note when, and forget the expired and the oldest over the bound,
# in one step (two API replicas registering at once can't overshoot).
_PUT_LUA = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[3]) - tonumber(ARGV[4]), 'LIMIT', 0, 100)
local over = redis.call('ZCARD', KEYS[2]) - #gone - tonumber(ARGV[5])
if over > 0 then
  for _, member in ipairs(redis.call('ZRANGE', KEYS[2], #gone, #gone + over - 1)) do gone[#gone + 1] = member end
end
if #gone > 0 then
  redis.call('HDEL', KEYS[1], unpack(gone))
  redis.call('ZREM', KEYS[2], unpack(gone))
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return #gone
"""


class PersistedQueries:
    """APQ documents in Redis: a hash (sha256 → document) and a sorted set of when each was
    registered. At most `max_documents` (the oldest go first), each at most `max_bytes` (a
    larger one runs but is not kept), each forgotten `ttl_s` after it was registered:
    Redis holds at most max_documents × max_bytes of them. A small LRU in each process
    saves the round trip for the documents it sees often (a hash names one text forever,
    so a local copy is never stale)."""

    def __init__(
        self, *, max_documents: int, max_bytes: int, ttl_s: int, timeout_s: float, local_size: int = 256
    ) -> None:
        self.max_documents, self.max_bytes, self.ttl_ms = max_documents, max_bytes, ttl_s * 1000
        self.timeout_s = timeout_s
        self._local: OrderedDict[str, str] = OrderedDict()
        self._local_size = local_size

    def _remember(self, sha: str, document: str) -> None:
        self._local[sha] = document
        self._local.move_to_end(sha)
        if len(self._local) > self._local_size:
            self._local.popitem(last=False)

    async def get(self, redis: Redis, sha: str) -> str | None:
        """The document, or None: unknown, expired, or Redis can't say in time (then the
        client sends the query in full, which runs: APQ degrades, never fails)."""
        if (known := self._local.get(sha)) is not None:
            self._local.move_to_end(sha)
            return known
        try:
            async with asyncio.timeout(self.timeout_s), redis.pipeline(transaction=False) as pipe:
                pipe.hget(keys.APQ_DOCUMENTS, sha)
                pipe.zscore(keys.APQ_REGISTERED, sha)
                found, registered = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("persisted queries: can't read from Redis (%s); answering not found", exc or type(exc).__name__)
            return None
        if found is None or registered is None or registered < time.time() * 1000 - self.ttl_ms:
            return None
        document: str = found.decode()
        self._remember(sha, document)
        return document

    async def put(self, redis: Redis, sha: str, document: str) -> None:
        """Keep it (or not, if it is too large or Redis can't take it now: it runs anyway)."""
        if len(document.encode(errors="surrogatepass")) > self.max_bytes:
            return
        self._remember(sha, document)
        now_ms = int(time.time() * 1000)
        try:
            async with asyncio.timeout(self.timeout_s):
                await redis.eval(
                    _PUT_LUA, 2, keys.APQ_DOCUMENTS, keys.APQ_REGISTERED,
                    sha, document, now_ms, self.ttl_ms, self.max_documents,
                )  # fmt: skip
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("persisted queries: can't write to Redis (%s)", exc or type(exc).__name__)


# -- resolving a request -----------------------------------------------------------------
@dataclass(frozen=True)
class Named:
    """How a request names its document, if it does."""

    doc_id: str | None  # a sha256 hex, from documentId / doc_id / id / persistedQuery
    apq: bool  # named by extensions.persistedQuery (Apollo's protocol)


def named(request: Mapping[str, Any], extensions: Any) -> Named:
    """The id a request gives (HTTP body or query string, or a websocket payload), checked."""
    persisted = extensions.get("persistedQuery") if isinstance(extensions, dict) else None
    if persisted is not None:
        if not isinstance(persisted, dict) or persisted.get("version") != 1:
            raise DocumentRefused(NOT_SUPPORTED, "only version 1 of extensions.persistedQuery is supported")
        return Named(_sha256(persisted.get("sha256Hash"), "extensions.persistedQuery.sha256Hash"), apq=True)
    for field in ID_FIELDS:
        if (value := request.get(field)) is not None:
            if field == "documentId" and isinstance(value, str):
                # The appendix's "sha256:<hex>", or the bare hex GraphQL Code Generator's docs send.
                value = value.removeprefix("sha256:")
            return Named(_sha256(value, field), apq=False)
    return Named(None, apq=False)


def own_page(request: HTTPConnection) -> bool:
    """Whether a request comes from a page this service served (the playground at /graphql,
    the console at /): a browser sends its page's Origin with every POST and websocket
    handshake. Any other client can send that header too, so this is a convenience for
    development (TRUSTED_DOCUMENTS_ALLOW_PLAYGROUND), never a defence."""
    origin = request.headers.get("origin")
    if not origin:
        return False
    scheme = "https" if request.url.scheme in ("https", "wss") else "http"
    return origin == f"{scheme}://{request.headers.get('host', '')}"


def _sha256(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value.lower()):
        raise DocumentRefused(NOT_IN_LIST, f"{field} must be a SHA-256 in hex (64 characters)")
    return value.lower()


class Documents:
    """The document each request runs, by the rules in this module's docstring."""

    def __init__(
        self,
        trusted: Mapping[str, str],
        apq: PersistedQueries | None,
        *,
        only: bool = False,
        require_id: bool = False,
        allow_own_pages: bool = False,
    ) -> None:
        self.trusted, self.apq = trusted, apq
        self.only, self.require_id, self.allow_own_pages = only or require_id, require_id, allow_own_pages

    async def resolve(self, redis: Redis, query: str | None, how: Named, *, own_page: bool = False) -> str | None:
        """The document to run (None: the request has none) or DocumentRefused."""
        if query == "" and how.doc_id is not None:
            query = None  # graphql-ws's client insists on a string: "" with an id is no document
        open_door = not self.only or (own_page and self.allow_own_pages)
        if how.doc_id is None:
            if query is not None and not open_door:
                if self.require_id:
                    raise DocumentRefused(ID_REQUIRED, "this service runs trusted documents named by their id only")
                if sha256_hex(query) not in self.trusted:
                    raise DocumentRefused(NOT_IN_LIST, "this document is not one of the service's trusted documents")
            return query
        if query is not None:
            return await self._sent_with_id(redis, query, how, open_door=open_door)
        if (document := self.trusted.get(how.doc_id)) is not None:
            return document
        if not how.apq or not open_door:
            raise DocumentRefused(NOT_IN_LIST, f"no trusted document has the id {how.doc_id}")
        if self.apq is None:
            raise DocumentRefused(NOT_SUPPORTED, "PersistedQueryNotSupported")
        if (document := await self.apq.get(redis, how.doc_id)) is None:
            raise DocumentRefused(NOT_FOUND, "PersistedQueryNotFound")
        return document

    async def _sent_with_id(self, redis: Redis, query: str, how: Named, *, open_door: bool) -> str:
        assert how.doc_id is not None
        if sha256_hex(query) != how.doc_id:
            raise DocumentRefused("BAD_USER_INPUT", "the document's SHA-256 is not the hash given with it")
        if how.doc_id in self.trusted:
            return query
        if not open_door:
            raise DocumentRefused(NOT_IN_LIST, "this document is not one of the service's trusted documents")
        if how.apq:
            if self.apq is None:
                raise DocumentRefused(NOT_SUPPORTED, "PersistedQueryNotSupported")
            await self.apq.put(redis, how.doc_id, query)
        return query
