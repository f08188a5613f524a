"""The GraphQL schema: types mirroring the job record, and the three root operations.

types.py holds the object types, queries/mutations/subscriptions.py the root fields, and
this module the schema with its extensions (limits, caches, metrics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from graphql import GraphQLError
from strawberry.extensions import AddValidationRules, MaxTokensLimiter, ParserCache, ValidationCache

from gql_service.api.error_codes import ValidationCodes
from gql_service.api.executor import ServiceExecutor
from gql_service.api.operations import OperationMetrics, Schema
from gql_service.api.query_limits import QueryLimits
from gql_service.api.schema.context import Context
from gql_service.api.schema.mutations import Mutation
from gql_service.api.schema.pagination import decode_cursor, encode_cursor
from gql_service.api.schema.queries import Query
from gql_service.api.schema.subscriptions import Subscription

__all__ = ["MAX_TOKENS", "Context", "decode_cursor", "encode_cursor", "schema"]

MAX_TOKENS = 2000

# Documents larger than this are parsed and validated afresh each time instead of cached:
# the caches hold the query text and its AST, and 256 distinct 500 KB documents (a hostile
# client's, never a real one's) once kept 300 MiB alive in the API.
MAX_CACHED_QUERY_CHARS = 16_384


class _ParserCache(ParserCache):
    """Strawberry's parse cache for documents of a real client's size. Also, a document
    that fails to parse is left to Strawberry's own parse, which reports it: raised from the
    extension, the error escaped Strawberry's error handling, so a subscription with a syntax
    error ended with a bare `complete` (or nothing, on the legacy protocol)."""

    def on_parse(self) -> Iterator[None]:
        ctx = self.execution_context
        if len(ctx.query or "") <= MAX_CACHED_QUERY_CHARS:
            with contextlib.suppress(GraphQLError):
                ctx.graphql_document = self.cached_parse_document(ctx.query, **ctx.parse_options)
        yield


class _ValidationCache(ValidationCache):
    """Strawberry's validation cache, for documents of a real client's size."""

    def on_validate(self) -> Iterator[None]:
        if len(self.execution_context.query or "") <= MAX_CACHED_QUERY_CHARS:
            yield from super().on_validate()
        else:
            yield  # Strawberry validates it itself, uncached


schema = Schema(
    query=Query,
    mutation=Mutation,
    subscription=Subscription,
    execution_context_class=ServiceExecutor,  # frames that leave no garbage behind (executor.py)
    # Factories: each request gets fresh extension instances; the caches live at module level.
    extensions=[
        # One rule class for every request: ValidationCache keys on the rule tuple, so a fresh
        # class per request would make every validation a cache miss.
        lambda: AddValidationRules([QueryLimits]),
        lambda: MaxTokensLimiter(max_token_count=MAX_TOKENS),
        lambda: _ParserCache(maxsize=256),
        lambda: _ValidationCache(maxsize=256),
        ValidationCodes,
        OperationMetrics,
    ],
)
