"""gql_service/api/schema/leaf_inputs.py builds what Strawberry's own conversion builds."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import strawberry

from gql_service.api.schema.leaf_inputs import leaf_input
from gql_service.api.schema.types import SubmitTextInput
from gql_service.models import JobPriority

built: list[SubmitTextInput] = []


@strawberry.type
class _Query:
    @strawberry.field
    def echo(self, input: SubmitTextInput) -> str:
        built.append(input)
        return "ok"


probe = strawberry.Schema(query=_Query)


@pytest.fixture
def strawberrys_conversion() -> Iterator[None]:
    definition = SubmitTextInput.__strawberry_definition__  # type: ignore[attr-defined]
    ours, definition.from_input = definition.from_input, None
    try:
        yield
    finally:
        definition.from_input = ours


CASES: list[tuple[str, dict[str, Any] | None]] = [
    ('{ echo(input: {text: "a"}) }', None),
    ('{ echo(input: {text: "a", priority: HIGH, idempotencyKey: "k", webhookUrl: null}) }', None),
    ("query($i: SubmitTextInput!) { echo(input: $i) }", {"i": {"text": "b"}}),
    (
        "query($i: SubmitTextInput!) { echo(input: $i) }",
        {"i": {"text": "b", "priority": "LOW", "webhookUrl": "https://example.com/h", "idempotencyKey": None}},
    ),
]


async def _build(query: str, variables: dict[str, Any] | None) -> SubmitTextInput:
    built.clear()
    result = await probe.execute(query, variable_values=variables)
    assert result.errors is None, result.errors
    [value] = built
    return value


@pytest.mark.parametrize(("query", "variables"), CASES)
async def test_a_leaf_input_is_what_strawberry_would_build(
    query: str, variables: dict[str, Any] | None, request: pytest.FixtureRequest
) -> None:
    ours = await _build(query, variables)
    request.getfixturevalue("strawberrys_conversion")
    theirs = await _build(query, variables)
    assert ours == theirs
    assert type(ours.priority) is JobPriority


async def test_the_hook_is_what_builds_it() -> None:
    # The equality above would hold trivially if Strawberry never called the hook.
    calls: list[str] = []
    definition = SubmitTextInput.__strawberry_definition__  # type: ignore[attr-defined]
    ours = definition.from_input

    def counting(cls: type, value: Any, context: Any) -> Any:
        calls.append(value["text"])
        return ours(cls, value, context)

    definition.from_input = counting
    try:
        await _build(*CASES[0])
    finally:
        definition.from_input = ours
    assert calls == ["a"]


def test_an_input_with_a_nested_input_is_refused() -> None:
    @strawberry.input
    class Inner:
        x: int

    @strawberry.input
    class Outer:
        inner: Inner

    with pytest.raises(TypeError, match="Outer.inner"):
        leaf_input(Outer)
