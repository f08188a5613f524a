"""A client's mistake is counted under its own code and logged at INFO without a traceback;
only our own faults are INTERNAL_SERVER_ERROR, at ERROR with theirs. The code a client sees,
the one counted and the one logged are the same (gql_service/api/error_codes.py)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import strawberry

from gql_service.api.error_codes import ValidationCodes
from gql_service.api.operations import OperationMetrics, Schema
from gql_service.api.schema import Context, schema
from gql_service.metrics import REGISTRY

SUBMIT = "mutation($text: String!) { submitText(input: {text: $text}) { job { id } } }"
PAGE = "query($first: Int) { jobs(first: $first) { edges { cursor } } }"
SINCE = "query($at: DateTime) { jobs(createdAfter: $at) { edges { cursor } } }"


def counted(kind: str, field: str, code: str) -> float:
    labels = {"type": kind, "field": field, "code": code}
    return REGISTRY.get_sample_value("gqls_graphql_errors_total", labels) or 0.0


@pytest.mark.parametrize(
    ("query", "variables", "field", "code"),
    [
        # Was counted and logged as INTERNAL_SERVER_ERROR, at ERROR with a traceback.
        (SUBMIT, {"text": 123}, "submitText", "BAD_USER_INPUT"),
        (PAGE, {"first": "twenty"}, "jobs", "BAD_USER_INPUT"),
        (SINCE, {"at": "noon"}, "jobs", "BAD_USER_INPUT"),
        # A null for a variable whose default was meant to keep it from a non-null argument:
        # graphql-core finds it as the field's arguments are read, with a path.
        ('query($id: ID = "x") { job(id: $id) { id } }', {"id": None}, "job", "BAD_USER_INPUT"),
        ("{ job(id: ", {}, "invalid", "GRAPHQL_PARSE_FAILED"),
        ('{ job(id: "x") { nope } }', {}, "job", "GRAPHQL_VALIDATION_FAILED"),
        (SUBMIT, {"text": "  "}, "submitText", "BAD_USER_INPUT"),
        ('mutation { cancelJob(id: "no-such-job") { id } }', {}, "cancelJob", "NOT_FOUND"),
    ],
)
async def test_a_client_mistake_is_counted_under_its_code_and_logged_at_info(
    context: Context, caplog: pytest.LogCaptureFixture, query: str, variables: dict[str, Any], field: str, code: str
) -> None:
    kind = "mutation" if query.startswith("mutation") else "invalid" if field == "invalid" else "query"
    internal_before, before = counted(kind, field, "INTERNAL_SERVER_ERROR"), counted(kind, field, code)
    with caplog.at_level(logging.DEBUG, logger="gql_service"):
        result = await schema.execute(query, variable_values=variables, context_value=context)
    assert [(e.extensions or {}).get("code") for e in result.errors or []] == [code]
    assert counted(kind, field, code) == before + 1
    assert counted(kind, field, "INTERNAL_SERVER_ERROR") == internal_before
    ours = [r for r in caplog.records if r.name == "gql_service.graphql"]
    assert [(r.levelname, r.getMessage().split(" at ")[0]) for r in ours] == [("INFO", f"client error {code}")]
    assert all(r.exc_info is None for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@strawberry.type
class _Broken:
    @strawberry.field
    def boom(self) -> int:
        raise RuntimeError("a bug of ours")


async def test_our_own_fault_is_still_internal_and_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    broken = Schema(query=_Broken, extensions=[ValidationCodes, OperationMetrics])
    before = counted("query", "boom", "INTERNAL_SERVER_ERROR")
    with caplog.at_level(logging.INFO, logger="gql_service"):
        result = await broken.execute("{ boom }")
    assert [(e.extensions or {}).get("code") for e in result.errors or []] == ["INTERNAL_SERVER_ERROR"]
    assert counted("query", "boom", "INTERNAL_SERVER_ERROR") == before + 1
    [record] = [r for r in caplog.records if r.name == "gql_service.graphql"]
    assert record.levelname == "ERROR" and record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)
