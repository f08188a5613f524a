"""What the API records about each GraphQL operation: Prometheus counters labelled by root
field, its errors in the log, and, while tracing is on, its name on the request's span.

Both take only what the schema bounds: a root field the schema does not have is labelled
`invalid` (a client choosing label values could grow `/metrics` without limit), and a
client's error is logged as its code and message, never with the document or variables
(which hold the user's text).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import strawberry
from graphql import GraphQLError, GraphQLSchema, OperationDefinitionNode
from opentelemetry import trace
from prometheus_client import Counter
from strawberry.extensions import SchemaExtension
from strawberry.types import ExecutionContext

from gql_service import tracing
from gql_service.api.error_codes import INTERNAL, UNAVAILABLE, code_of, loggable, stamp
from gql_service.metrics import REGISTRY

log = logging.getLogger("gql_service.graphql")

OPERATIONS = Counter(
    "gqls_graphql_operations", "GraphQL operations by type and root field", ["type", "field"], registry=REGISTRY
)
ERRORS = Counter(
    "gqls_graphql_errors", "GraphQL errors by type, root field and code", ["type", "field", "code"], registry=REGISTRY
)
_INTROSPECTION = frozenset({"__typename", "__schema", "__type"})


def core_schema(schema: strawberry.Schema) -> GraphQLSchema:
    """graphql-core's schema inside Strawberry's (a private attribute, read here alone;
    tests/test_strawberry_internals.py pins it)."""
    return schema._schema


def _labels(schema: GraphQLSchema, document: object) -> tuple[str, str]:
    """(operation type, root field) of the first operation, each bounded by the schema."""
    for definition in getattr(document, "definitions", ()):
        if isinstance(definition, OperationDefinitionNode):
            kind = definition.operation
            root = schema.get_root_type(kind)
            selections = definition.selection_set.selections
            name = getattr(getattr(selections[0], "name", None), "value", None) if selections else None
            known = root is not None and (name in root.fields or name in _INTROSPECTION)
            return kind.value, name if known and name else "invalid"
    return "invalid", "invalid"


class OperationMetrics(SchemaExtension):
    """Counts operations and their errors, labelled by root field."""

    def on_operation(self) -> Iterator[None]:
        yield
        ctx = self.execution_context
        kind, field = _labels(core_schema(ctx.schema), ctx.graphql_document)
        OPERATIONS.labels(kind, field).inc()
        if tracing.active():
            _name_request_span(kind, field)
        errors = (ctx.result.errors if ctx.result else None) or ctx.pre_execution_errors or []
        for error in errors:
            ERRORS.labels(kind, field, code_of(error)).inc()


def _name_request_span(kind: str, field: str) -> None:
    """Name the HTTP request's span (gql_service.api.http_spans) for its operation,
    `{type} {root field}` (`mutation submitText`), so a trace says what was asked. Named by
    what the schema bounds, as the metrics' labels, never with the document or the
    variables: they hold the users' texts. On the request's own span rather than a span of
    its own: measured, a Strawberry extension with a span of its own added about 150 us to a
    submitText of about 850 us in process; this costs a few."""
    span = trace.get_current_span()
    if span.is_recording():
        span.update_name(f"{kind} {field}")
        span.set_attributes({"graphql.operation.type": kind, "gqls.graphql.field": field})


class Schema(strawberry.Schema):
    """Gives every error its code (gql_service.api.error_codes) and logs it by that code: a
    client's mistake at INFO, an outage at WARNING, both without a traceback, and only our
    own faults at ERROR with theirs (Strawberry logs every error at ERROR with the document).

    Strawberry calls this for every error of every transport before the error is formatted,
    so the code stamped here is the one the client sees and the metrics count."""

    def process_errors(self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None) -> None:
        for error in errors:
            code = stamp(error)
            path = ".".join(str(p) for p in error.path or ()) or "-"
            if code == INTERNAL:
                log.error("%s at %s: %s", code, path, error.message, exc_info=error.original_error)
            elif code == UNAVAILABLE:
                log.warning("%s at %s: %s", code, path, error.message)
            else:
                log.info("client error %s at %s: %s", code, path, loggable(error))


# Strawberry's own logger would repeat each error at ERROR, with the document.
logging.getLogger("strawberry.execution").disabled = True
