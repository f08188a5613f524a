"""The GraphQL schema: types mirroring the job record, and the three root operations.

types.py holds the object types, queries/mutations/subscriptions.py the root fields, and
this module the schema with its extensions (limits, caches, metrics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from graphql import GraphQLError
from graphql import parse as parse_document
from strawberry.extensions import ParserCache, SchemaExtension
from strawberry.schema.schema import validate_document

from gql_service.api.error_codes import stamp_validation
from gql_service.api.executor import ServiceExecutor
from gql_service.api.operations import OperationMetrics, Schema, core_schema
from gql_service.api.query_limits import QueryLimits
from gql_service.api.schema.context import Context
from gql_service.api.schema.mutations import Mutation
from gql_service.api.schema.pagination import decode_cursor, encode_cursor
from gql_service.api.schema.queries import Query
from gql_service.api.schema.subscriptions import Subscription
from gql_service.api.schema.validations import ValidationsByDocument

__all__ = ["MAX_TOKENS", "Context", "decode_cursor", "encode_cursor", "schema"]

MAX_TOKENS = 2000

# Documents larger than this are parsed and validated afresh each time (DocumentChecks).
MAX_CACHED_QUERY_CHARS = 16_384


# The caches live at module level: one of each for every request. Strawberry's parse
# cache keys on the query text; validation's answers are found by the parsed document.
_parse_cached = ParserCache(maxsize=256).cached_parse_document
_validate_cached = ValidationsByDocument(maxsize=256)
# One rule tuple for every request: the validation cache keys on it, so a fresh tuple of
# fresh classes per request would make every validation a cache miss.
_RULES = (QueryLimits,)


class DocumentChecks(SchemaExtension):
    """What Strawberry's AddValidationRules, MaxTokensLimiter, ParserCache and ValidationCache
    did, with validation's error codes (error_codes.ValidationCodes), as one hook of one
    extension: Strawberry builds a context manager for every hook of every extension on
    every request (measured: six extensions took 9 % of a submitText's CPU, and this
    extension's parse and validate hooks 3 % more than this one hook). The document is
    parsed and validated as the operation starts; Strawberry then finds both done and skips
    its own.

    Documents larger than MAX_CACHED_QUERY_CHARS are parsed and validated afresh each time:
    the caches hold the query text and its AST, and 256 distinct 500 KB documents (a hostile
    client's, never a real one's) once kept 300 MiB alive in the API. A document that fails to
    parse is left to Strawberry's own parse, which reports it: raised from the extension, the
    error escaped Strawberry's error handling, so a subscription with a syntax error ended with
    a bare `complete` (or nothing, on the legacy protocol)."""

    def on_operation(self) -> Iterator[None]:
        ctx = self.execution_context
        ctx.parse_options["max_tokens"] = MAX_TOKENS
        ctx.validation_rules = ctx.validation_rules + _RULES
        cached = len(ctx.query or "") <= MAX_CACHED_QUERY_CHARS
        if ctx.graphql_document is None and ctx.query:
            with contextlib.suppress(GraphQLError):
                parse = _parse_cached if cached else parse_document
                ctx.graphql_document = parse(ctx.query, **ctx.parse_options)
        if ctx.graphql_document is not None:
            validate = _validate_cached if cached else validate_document
            ctx.pre_execution_errors = validate(core_schema(ctx.schema), ctx.graphql_document, ctx.validation_rules)
            stamp_validation(ctx.pre_execution_errors)
        yield


schema = Schema(
    query=Query,
    mutation=Mutation,
    subscription=Subscription,
    execution_context_class=ServiceExecutor,  # frames that leave no garbage behind (executor.py)
    # Factories: each request gets fresh extension instances; the caches live at module level.
    extensions=[DocumentChecks, OperationMetrics],
)
