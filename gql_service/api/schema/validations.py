"""Validation's answers, remembered per parsed document."""

from __future__ import annotations

from graphql import ASTValidationRule, DocumentNode, GraphQLError, GraphQLSchema
from strawberry.schema.schema import validate_document

Rules = tuple[type[ASTValidationRule], ...]


class ValidationsByDocument:
    """`validate_document` with its answers kept for the last `maxsize` documents, found by
    the document's identity.

    Strawberry's ValidationCache is an lru_cache keyed on the document, and graphql-core's
    nodes are frozen dataclasses whose hash walks the whole tree, on every request (measured:
    2 % of a submitText's CPU). The documents validated here come from the parse cache, one
    object per query text, so their identity finds them; each entry holds its document, so
    an id is not reused while its entry lives."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._entries: dict[int, tuple[GraphQLSchema, DocumentNode, Rules, list[GraphQLError]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __call__(self, schema: GraphQLSchema, document: DocumentNode, rules: Rules) -> list[GraphQLError]:
        entry = self._entries.pop(id(document), None)
        if entry is None or entry[0] is not schema or entry[1] is not document or entry[2] != rules:
            entry = (schema, document, rules, validate_document(schema, document, rules))
            if len(self._entries) >= self.maxsize:
                del self._entries[next(iter(self._entries))]  # the least recently used
        self._entries[id(document)] = entry  # (re)inserted last: the most recently used
        return entry[3]
