"""What gql_service/api/operations.py (the one place that reaches into Strawberry's
internals) relies on, pinned: a Strawberry upgrade that changes it fails here, not as
unlabelled metrics or a failing extension in production."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from graphql import GraphQLSchema, OperationDefinitionNode
from strawberry.extensions import SchemaExtension

from gql_service.api.operations import _labels
from gql_service.api.schema import schema


def test_strawberrys_schema_holds_graphql_cores_schema_as_underscore_schema() -> None:
    core = schema._schema
    assert isinstance(core, GraphQLSchema)
    assert {"submitText", "job"} <= set(core.type_map["Mutation"].fields) | set(core.type_map["Query"].fields)  # type: ignore[attr-defined]


async def test_an_extension_sees_the_parsed_document_and_the_schema_after_the_operation() -> None:
    seen: list[tuple[str, str]] = []

    class Probe(SchemaExtension):
        def on_operation(self) -> Iterator[None]:
            yield
            ctx = self.execution_context
            assert isinstance(ctx.schema._schema, GraphQLSchema)
            assert isinstance(ctx.graphql_document.definitions[0], OperationDefinitionNode)  # type: ignore[union-attr]
            seen.append(_labels(ctx.schema._schema, ctx.graphql_document))

    probed = schema.__class__(
        query=schema.query, mutation=schema.mutation, subscription=schema.subscription, extensions=[Probe]
    )
    result = await probed.execute("query Named { __typename }")
    assert result.errors is None
    assert seen == [("query", "__typename")]


async def test_strawberry_keeps_a_document_and_errors_an_extension_set_as_the_operation_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gql_service/api/schema's DocumentChecks parses and validates in its one hook, from its
    caches: Strawberry must neither parse nor validate again."""
    import strawberry.schema.schema as strawberrys  # noqa: PLC0415 (the module patched, here alone)

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("Strawberry parsed or validated a document the extension had")

    monkeypatch.setattr(strawberrys, "parse", refused)
    monkeypatch.setattr(strawberrys, "validate_document", refused)
    good = await schema.execute("query Fine { __typename }")
    assert good.errors is None and good.data == {"__typename": "Query"}
    bad = await schema.execute("query Wrong { noSuchField }")
    assert bad.errors is not None
    assert [(e.message, (e.extensions or {}).get("code")) for e in bad.errors] == [
        ("Cannot query field 'noSuchField' on type 'Query'.", "GRAPHQL_VALIDATION_FAILED")
    ]


def test_the_transport_ws_handler_asks_one_static_method_what_closes_the_socket() -> None:
    """gql_service/api/ws.py overrides it so that a syntax error is one operation's error."""
    from graphql import GraphQLSyntaxError, Source
    from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import BaseGraphQLTransportWSHandler

    from gql_service.api.ws import TransportWSHandler

    error = GraphQLSyntaxError(Source("{"), 1, "Expected Name, found <EOF>.")
    assert BaseGraphQLTransportWSHandler._get_pre_execution_close_reason(error) == error.message
    assert TransportWSHandler._get_pre_execution_close_reason(error) is None


def test_graphql_cores_executor_is_as_gql_service_api_executor_expects() -> None:
    """ServiceExecutor replaces the memo a per-event copy shares and the helpers bound to the
    executor itself; a graphql-core that builds them otherwise needs a new look at it."""
    import inspect

    from graphql.execution.executor import Executor

    from gql_service.api.executor import ServiceExecutor

    init = inspect.getsource(Executor.__init__)
    assert "self.async_helpers = GraphQLResolveInfoHelpers(" in init
    assert "gather=self.gather_async_work, track=self.track_async_work" in init
    assert "self._relevant_sub_fields: dict[" in init and "self._stream_usages: RefMap[" in init
    assert "executor = copy(self)" in inspect.getsource(Executor.build_per_event_executor)
    assert issubclass(ServiceExecutor, Executor)
    assert schema.execution_context_class is ServiceExecutor
