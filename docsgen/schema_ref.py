"""The GraphQL reference, from schema.graphql (which `gql-service export-schema` writes from
the code, and a test keeps current): the root operations, then every type with its fields,
arguments, defaults and descriptions, each named type a link to its own section."""

from __future__ import annotations

import re
from pathlib import Path

from graphql import (
    GraphQLArgument,
    GraphQLEnumType,
    GraphQLField,
    GraphQLInputObjectType,
    GraphQLInterfaceType,
    GraphQLNamedType,
    GraphQLObjectType,
    GraphQLScalarType,
    GraphQLSchema,
    GraphQLType,
    GraphQLUnionType,
    build_schema,
    get_named_type,
    print_ast,
)
from graphql.utilities import ast_from_value

SCHEMA = Path(__file__).resolve().parent.parent / "schema.graphql"

INTRO = """\
# GraphQL schema

Every operation and type of the API, generated at every build from `schema.graphql`, which
`gql-service export-schema` writes from the code (a test fails when the file drifts from it).
Typed-client generators read the same file ([typed clients](../clients/typed.md)); the
[GraphQL API](../api/index.md) pages say how the operations behave.
"""

KINDS = (  # the sections after the root operations, in order
    ("Objects", GraphQLObjectType),
    ("Interfaces", GraphQLInterfaceType),
    ("Unions", GraphQLUnionType),
    ("Inputs", GraphQLInputObjectType),
    ("Enums", GraphQLEnumType),
    ("Scalars", GraphQLScalarType),
)


def load(path: Path = SCHEMA) -> GraphQLSchema:
    return build_schema(path.read_text())


def documented_types(schema: GraphQLSchema) -> list[GraphQLNamedType]:
    """The schema's own types: not introspection's, nor the built-in scalars it does not declare."""
    return [t for name, t in sorted(schema.type_map.items()) if not name.startswith("__") and t.ast_node is not None]


def roots(schema: GraphQLSchema) -> list[GraphQLObjectType]:
    return [t for t in (schema.query_type, schema.mutation_type, schema.subscription_type) if t is not None]


def anchor(name: str) -> str:
    return name.lower()


def type_ref(type_: GraphQLType, schema: GraphQLSchema) -> str:
    """`[Job!]!`, its named type a link to its section when the schema declares it."""
    shown = str(type_)
    named = get_named_type(type_)
    if named.ast_node is None:  # String, Int, ...: nothing to link to
        return f"`{shown}`"
    before, after = shown.split(named.name, 1)
    return f"`{before}`[`{named.name}`](#{anchor(named.name)})`{after}`".replace("``", "")


def text(description: str | None) -> str:
    return re.sub(r"\s+", " ", description or "").strip().replace("|", "\\|")


def default(arg: GraphQLArgument) -> str:
    if arg.ast_node is not None and arg.ast_node.default_value is not None:
        return print_ast(arg.ast_node.default_value)
    value = ast_from_value(arg.default_value, arg.type) if arg.default_value is not None else None
    return print_ast(value) if value is not None else ""


def arguments(field: GraphQLField) -> str:
    if not field.args:
        return ""
    shown = []
    for name, arg in field.args.items():
        value = default(arg)
        shown.append(f"`{name}: {arg.type}{f' = {value}' if value else ''}`")
    return "<br>".join(shown)


def fields_table(type_: GraphQLObjectType | GraphQLInterfaceType, schema: GraphQLSchema) -> list[str]:
    rows = ["| field | arguments | type | description |", "| --- | --- | --- | --- |"]
    for name, field in type_.fields.items():
        note = text(field.description)
        if field.deprecation_reason:
            note = f"**Deprecated**: {text(field.deprecation_reason)} {note}".strip()
        rows.append(f"| `{name}` | {arguments(field)} | {type_ref(field.type, schema)} | {note} |")
    return rows


def section(type_: GraphQLNamedType, schema: GraphQLSchema) -> list[str]:
    lines = [f"### {type_.name}", ""]
    if type_.description:
        lines += [text(type_.description), ""]
    if isinstance(type_, GraphQLObjectType | GraphQLInterfaceType):
        if type_.interfaces:
            links = ", ".join(f"[`{i.name}`](#{anchor(i.name)})" for i in type_.interfaces)
            lines += [f"Implements {links}.", ""]
        lines += fields_table(type_, schema)
    elif isinstance(type_, GraphQLUnionType):
        lines.append("One of " + ", ".join(f"[`{t.name}`](#{anchor(t.name)})" for t in type_.types) + ".")
    elif isinstance(type_, GraphQLInputObjectType):
        lines += ["| field | type | default | description |", "| --- | --- | --- | --- |"]
        for name, input_field in type_.fields.items():
            node = input_field.ast_node
            value = print_ast(node.default_value) if node is not None and node.default_value is not None else ""
            shown = f"`{value}`" if value else ""
            lines.append(
                f"| `{name}` | {type_ref(input_field.type, schema)} | {shown} | {text(input_field.description)} |"
            )
    elif isinstance(type_, GraphQLEnumType):
        lines += ["| value | description |", "| --- | --- |"]
        lines += [f"| `{name}` | {text(value.description)} |" for name, value in type_.values.items()]
    elif isinstance(type_, GraphQLScalarType) and type_.specified_by_url:
        lines.append(f"Specified by <{type_.specified_by_url}>.")
    return [*lines, ""]


def page(schema: GraphQLSchema | None = None) -> str:
    schema = schema or load()
    lines = [INTRO, "## Operations", ""]
    for root in roots(schema):
        lines += section(root, schema)
    rest = [t for t in documented_types(schema) if t not in roots(schema)]
    for title, kind in KINDS:
        of_kind = [t for t in rest if isinstance(t, kind)]
        if of_kind:
            lines += [f"## {title}", ""]
            for type_ in of_kind:
                lines += section(type_, schema)
    return "\n".join(lines)
