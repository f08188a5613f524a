"""The one classification of a GraphQL error into its `extensions.code`, for the answer,
the metrics and the log alike.

The service's own errors carry their code (gql_service.api.errors). The others are
classified by where they arose: the parser (GRAPHQL_PARSE_FAILED), validation
(GRAPHQL_VALIDATION_FAILED, stamped by `ValidationCodes` while the phase is known),
variables, arguments and the operation's choice (BAD_USER_INPUT: graphql-core's own errors
about the values the client gave, with no exception of ours behind them), and everything
else, which is our fault (INTERNAL_SERVER_ERROR). A client's mistake must never count as an internal error:
`gqls_graphql_errors_total{code="INTERNAL_SERVER_ERROR"}` pages someone.
"""

from __future__ import annotations

from collections.abc import Iterator

from graphql import GraphQLError, GraphQLSyntaxError, ValueNode, VariableDefinitionNode
from strawberry.extensions import SchemaExtension

INTERNAL = "INTERNAL_SERVER_ERROR"
UNAVAILABLE = "SERVICE_UNAVAILABLE"
VALIDATION_FAILED = "GRAPHQL_VALIDATION_FAILED"


def code_of(error: GraphQLError) -> str:
    """The error's `extensions.code`, or the one it should have."""
    code = (error.extensions or {}).get("code")
    if isinstance(code, str):
        return code
    if isinstance(error, GraphQLSyntaxError):
        return "GRAPHQL_PARSE_FAILED"
    original = error.original_error
    if original is not None and not isinstance(original, GraphQLError):
        return INTERNAL  # an exception of ours, wherever it was raised
    if error.path is None or about_a_value(error):
        # Raised by graphql-core (or a scalar's parser, a GraphQLError too) about the
        # request's values: a variable of the wrong type, an unknown operation before any
        # resolver ran, or, as a field's arguments are read, a null given to a variable
        # whose default was meant to keep it from a non-null argument.
        return "BAD_USER_INPUT"
    return INTERNAL


def about_a_value(error: GraphQLError) -> bool:
    """Whether graphql-core located the error at a value the client gave, not at a field."""
    nodes = error.nodes or []
    return bool(nodes) and all(isinstance(node, ValueNode | VariableDefinitionNode) for node in nodes)


def loggable(error: GraphQLError) -> str:
    """The error's message for the log. graphql-core quotes the value it refused, and a
    client's values hold the user's text: an error about a value is logged without it."""
    if about_a_value(error):
        return error.message.split(": ", 1)[0] + " (the value is not logged)"
    return error.message


def stamp(error: GraphQLError, code: str | None = None) -> str:
    """Give the error its code, so that every transport shows the one counted and logged."""
    code = code or code_of(error)
    if (error.extensions or {}).get("code") != code:
        error.extensions = {**(error.extensions or {}), "code": code}
    return code


class ValidationCodes(SchemaExtension):
    """Validation's errors are told apart from the request's other path-less errors by
    the phase alone: they are stamped here, as validation ends."""

    def on_validate(self) -> Iterator[None]:
        yield
        stamp_validation(self.execution_context.pre_execution_errors)


def stamp_validation(errors: list[GraphQLError] | None) -> None:
    """Stamp validation's errors, as validation ends (`ValidationCodes`, the schema's checks)."""
    for error in errors or []:
        if not isinstance(error, GraphQLSyntaxError) and "code" not in (error.extensions or {}):
            stamp(error, VALIDATION_FAILED)
