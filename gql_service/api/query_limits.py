"""Bounds on a query's shape, checked in one linear pass whatever the document's shape.

Strawberry's QueryDepthLimiter and MaxAliasesLimiter walk every fragment spread anew, so
a 235-token document whose fragments each spread the next one twice (2^22 paths) kept the
event loop busy for 39 s. Here each fragment is measured once and its figures reused
wherever it is spread, so the work is linear in the document's size, while the figures
are those of the fully expanded query (the fan-out above expands to four million fields
and is refused at once).

Measured on the expanded query:
* depth: nested field levels; introspection fields (`__schema`, `__type`, ...) and what is
  under them don't count, since GraphiQL's own introspection query nests eight deep;
* aliases: aliased fields;
* fields: field selections, the query's static cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from graphql import (
    FieldNode,
    FragmentSpreadNode,
    GraphQLError,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
    ValidationRule,
)

MAX_DEPTH = 10
MAX_ALIASES = 30
# The static cost of GraphiQL's introspection query is 228 fields; real operations of
# this schema stay well under 100.
MAX_FIELDS = 1000


@dataclass(frozen=True)
class Shape:
    depth: int = 0
    aliases: int = 0
    fields: int = 0

    def beside(self, other: Shape) -> Shape:
        """Two selections in the same selection set."""
        return Shape(max(self.depth, other.depth), self.aliases + other.aliases, self.fields + other.fields)


class QueryLimits(ValidationRule):
    """Refuses an operation over MAX_DEPTH, MAX_ALIASES or MAX_FIELDS, with one error each."""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._fragments: dict[str, Shape] = {}
        self._measuring: set[str] = set()

    def enter_operation_definition(self, node: OperationDefinitionNode, *_: Any) -> None:
        shape = self._measure(node.selection_set)
        name = f"operation {node.name.value!r}" if node.name else "the operation"
        problems = (
            (shape.depth > MAX_DEPTH, f"is nested {shape.depth} levels deep; at most {MAX_DEPTH} are allowed"),
            (shape.aliases > MAX_ALIASES, f"has {shape.aliases:,} aliases; at most {MAX_ALIASES} are allowed"),
            (
                shape.fields > MAX_FIELDS,
                f"selects {shape.fields:,} fields with its fragments expanded; at most {MAX_FIELDS} are allowed",
            ),
        )
        for over, problem in problems:
            if over:
                self.report_error(GraphQLError(f"{name} {problem}", node, extensions={"code": "BAD_USER_INPUT"}))

    def _measure(self, selection_set: SelectionSetNode | None) -> Shape:
        total = Shape()
        if selection_set is None:
            return total
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                inner = self._measure(selection.selection_set)
                introspection = selection.name.value.startswith("__")
                total = total.beside(
                    Shape(
                        depth=0 if introspection else inner.depth + 1,
                        aliases=inner.aliases + (selection.alias is not None),
                        fields=inner.fields + 1,
                    )
                )
            elif isinstance(selection, InlineFragmentNode):
                total = total.beside(self._measure(selection.selection_set))
            elif isinstance(selection, FragmentSpreadNode):
                total = total.beside(self._fragment(selection.name.value))
        return total

    def _fragment(self, name: str) -> Shape:
        if name in self._fragments:
            return self._fragments[name]
        definition = self.context.get_fragment(name)
        if definition is None or name in self._measuring:
            return Shape()  # unknown or cyclic: graphql-core's own rules report those
        self._measuring.add(name)
        try:
            shape = self._measure(definition.selection_set)
        finally:
            self._measuring.discard(name)
        self._fragments[name] = shape
        return shape
