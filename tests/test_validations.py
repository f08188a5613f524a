"""gql_service/api/schema/validations.py: validation's answers, found again by the document."""

from __future__ import annotations

from graphql import parse
from graphql.validation import specified_rules

from gql_service.api.operations import core_schema
from gql_service.api.query_limits import QueryLimits
from gql_service.api.schema import schema
from gql_service.api.schema.validations import ValidationsByDocument

RULES = (*specified_rules, QueryLimits)
GRAPHQL = core_schema(schema)


def test_the_same_document_is_validated_once_and_its_errors_kept() -> None:
    validations = ValidationsByDocument(maxsize=4)
    good, bad = parse("{ __typename }"), parse("{ noSuchField }")
    assert validations(GRAPHQL, good, RULES) == []
    errors = validations(GRAPHQL, bad, RULES)
    assert [e.message for e in errors] == ["Cannot query field 'noSuchField' on type 'Query'."]
    assert validations(GRAPHQL, bad, RULES) is errors  # found, not validated again
    assert len(validations) == 2


def test_another_document_or_other_rules_are_validated_afresh() -> None:
    validations = ValidationsByDocument(maxsize=4)
    document = parse("{ noSuchField }")
    first = validations(GRAPHQL, document, RULES)
    # An equal document that is another object: its own entry (the parse cache hands out
    # one object per query text, so that is what a repeat looks like).
    again = validations(GRAPHQL, parse("{ noSuchField }"), RULES)
    assert again == first and again is not first
    assert validations(GRAPHQL, document, ()) == []  # no rules, no errors: not the kept answer


def test_it_keeps_the_most_recently_used_documents() -> None:
    validations = ValidationsByDocument(maxsize=2)
    a, b, c = (parse(f"{{ a{n}: __typename }}") for n in range(3))
    kept_a = validations(GRAPHQL, a, RULES)
    validations(GRAPHQL, b, RULES)
    assert validations(GRAPHQL, a, RULES) is kept_a  # a used again: b is now the oldest
    validations(GRAPHQL, c, RULES)
    assert len(validations) == 2
    assert validations(GRAPHQL, a, RULES) is kept_a  # a kept, b dropped
    assert len(validations) == 2
