"""Input types built straight from their GraphQL value, for the hot path's inputs.

Strawberry builds an input value field by field, resolving each field's type and checking
what kind it is on every request (measured: 5 % of a submitText's CPU for SubmitTextInput's
four fields). An input whose fields are all leaves needs none of it: graphql-core has
already coerced each value (an enum arrives as its Python member), and Strawberry passes
leaves through unchanged. `leaf_input` builds such an input from its GraphQL names, through
the hook Strawberry gives integrations that build their own input values
(`StrawberryObjectDefinition.from_input`); tests/test_leaf_inputs.py checks it builds what
Strawberry's own conversion builds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from strawberry.types.arguments import InputContext
from strawberry.types.base import StrawberryOptional
from strawberry.types.enum import StrawberryEnumDefinition

T = TypeVar("T")

_SCALARS = (str, int, float, bool)


def _is_leaf(type_: object) -> bool:
    if isinstance(type_, StrawberryOptional):
        type_ = type_.of_type
    return type_ in _SCALARS or isinstance(type_, StrawberryEnumDefinition)


def leaf_input(cls: type[T]) -> type[T]:
    """Give a Strawberry input of leaf fields (str, int, float, bool, enums; optional or
    not) a `from_input` that passes its values through. Raises TypeError for any other
    field: a nested input needs Strawberry's conversion."""
    definition = cls.__strawberry_definition__  # type: ignore[attr-defined]
    if not definition.is_input:
        raise TypeError(f"{cls.__name__} is not a Strawberry input")
    for field in definition.fields:
        if not _is_leaf(field.type):
            raise TypeError(f"{cls.__name__}.{field.python_name} is not a scalar or an enum")
    # As Strawberry: a field with no default is None unless given (graphql-core has checked
    # that the non-null ones are).
    unset = {
        f.python_name: None
        for f in definition.fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    names: dict[int, tuple[tuple[str, str], ...]] = {}  # by name converter: (GraphQL, Python) names

    def from_input(built: type[T], value: Mapping[str, Any], context: InputContext) -> T:
        converter = context.config.name_converter
        pairs = names.get(id(converter))
        if pairs is None:
            pairs = names[id(converter)] = tuple((converter.from_field(f), f.python_name) for f in definition.fields)
        kwargs = dict(unset)
        for graphql_name, python_name in pairs:
            if graphql_name in value:
                kwargs[python_name] = value[graphql_name]
        return built(**kwargs)

    definition.from_input = from_input
    return cls
