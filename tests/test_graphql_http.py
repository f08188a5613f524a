"""GraphQL over HTTP: the graphql-http audit of the spec against a live service, and each
case it (and hostile clients) cares about, one by one."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from .service import Service

CONFORMANCE = Path(__file__).resolve().parent / "conformance"
GRAPHQL_RESPONSE = "application/graphql-response+json"
SUBMIT = (
    "mutation($text: String!, $key: String) { submitText(input: {text: $text, idempotencyKey: $key}) { deduplicated } }"
)


def post(service: Service, body: object, *, accept: str | None = None, raw: bytes | None = None) -> httpx.Response:
    headers = {"content-type": "application/json", **({"accept": accept} if accept else {})}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(service.http_url, content=content, headers=headers)


def request_error(response: httpx.Response, status: int, media_type: str = "application/json") -> dict[str, Any]:
    """A request error: the given status, a GraphQL-shaped JSON body with a code and no `data`."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith(media_type), response.headers["content-type"]
    body = response.json()
    assert "data" not in body and body["errors"][0]["message"], body
    assert body["errors"][0]["extensions"]["code"], body
    return dict(body["errors"][0])


def test_graphql_http_audit_passes_every_check(service: Service) -> None:
    npm = shutil.which("npm")
    assert npm, "Node.js and npm are needed for the graphql-http audit"
    installed = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=CONFORMANCE, capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    audit = subprocess.run(
        ["node", "audit.mjs", service.http_url], cwd=CONFORMANCE, capture_output=True, text=True, timeout=120
    )
    assert audit.returncode == 0, audit.stderr[-3000:]
    results = json.loads(audit.stdout)
    counts = Counter(result["status"] for result in results)
    print(f"graphql-http audit: {len(results)} checks, {dict(counts)}")
    failed = [result for result in results if result["status"] != "ok"]
    assert len(results) > 50 and not failed, json.dumps(failed, indent=1)


# --- application/graphql-response+json: the spec's status codes -------------------------------


def test_graphql_response_json_is_served_when_asked_for(service: Service) -> None:
    response = post(service, {"query": "{ __typename }"}, accept=GRAPHQL_RESPONSE)
    assert response.status_code == 200 and response.headers["content-type"].startswith(GRAPHQL_RESPONSE)
    assert response.json() == {"data": {"__typename": "Query"}}
    # A client that prefers it (graphql-http's and Apollo Client's default Accept) gets it too.
    preferred = post(service, {"query": "{ __typename }"}, accept=f"{GRAPHQL_RESPONSE}, application/json;q=0.9")
    assert preferred.headers["content-type"].startswith(GRAPHQL_RESPONSE)


@pytest.mark.parametrize(
    ("query", "variables", "code"),
    [
        ("{", None, "GRAPHQL_PARSE_FAILED"),
        ("{ noSuchField }", None, "GRAPHQL_VALIDATION_FAILED"),
        ('query($id: ID!) { job(id: $id) { id } }', {"id": {"not": "an id"}}, "BAD_USER_INPUT"),
        ('query($id: ID!) { job(id: $id) { id } }', None, "BAD_USER_INPUT"),
    ],
)  # fmt: skip
def test_request_errors_are_400_without_data_in_graphql_response_json(
    service: Service, query: str, variables: dict[str, object] | None, code: str
) -> None:
    response = post(service, {"query": query, "variables": variables}, accept=GRAPHQL_RESPONSE)
    assert request_error(response, 400, GRAPHQL_RESPONSE)["extensions"]["code"] == code


@pytest.mark.parametrize("accept", [None, "*/*", "application/json", f"application/json, {GRAPHQL_RESPONSE};q=0.5"])
def test_application_json_keeps_200_and_data_null_with_a_code(service: Service, accept: str | None) -> None:
    response = post(service, {"query": "{ noSuchField }"}, accept=accept)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["data"] is None and body["errors"][0]["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED"


def test_a_field_error_is_200_with_data_in_graphql_response_json(service: Service) -> None:
    # Execution ran: the spec's 2xx with `data` present, even when `data` is null.
    response = post(service, {"query": SUBMIT, "variables": {"text": "   "}}, accept=GRAPHQL_RESPONSE)
    assert response.status_code == 200 and response.headers["content-type"].startswith(GRAPHQL_RESPONSE)
    body = response.json()
    assert body["data"] is None and body["errors"][0]["path"] == ["submitText"]
    assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"


# --- operations in the document -----------------------------------------------------------------


@pytest.mark.parametrize("names", [("A", "B"), ("", "")], ids=["named", "anonymous"])
@pytest.mark.parametrize("accept", [None, GRAPHQL_RESPONSE])
def test_two_operations_without_operation_name_run_neither(
    service: Service, accept: str | None, names: tuple[str, str]
) -> None:
    key = uuid.uuid4().hex
    first, second = names
    submit = f'submitText(input: {{text: "hello", idempotencyKey: "{key}"}}) {{ deduplicated }}'
    document = f"mutation {first} {{ {submit} }}"
    response = post(service, {"query": document + f" query {second} {{ __typename }}"}, accept=accept)
    error = request_error(response, 400, accept or "application/json")
    assert error["extensions"]["code"] == "OPERATION_RESOLUTION_FAILURE" and "operationName" in error["message"]
    # The mutation did not run: its idempotency key is still unused.
    first = post(service, {"query": SUBMIT, "variables": {"text": "hello", "key": key}}).json()
    assert first == {"data": {"submitText": {"deduplicated": False}}}


def test_operation_name_picks_one_of_several(service: Service) -> None:
    body = {"query": "query A { a: __typename } query B { b: __typename }", "operationName": "B"}
    assert post(service, body).json() == {"data": {"b": "Query"}}


@pytest.mark.parametrize("accept", [None, GRAPHQL_RESPONSE])
def test_an_unknown_operation_name_is_a_json_error(service: Service, accept: str | None) -> None:
    response = post(service, {"query": "query A { __typename }", "operationName": "C"}, accept=accept)
    error = request_error(response, 400, accept or "application/json")
    assert error["extensions"]["code"] == "OPERATION_RESOLUTION_FAILURE" and '"C"' in error["message"]


# --- bodies that are not a GraphQL request ------------------------------------------------------


@pytest.mark.parametrize("raw", [b'"hello"', b"null", b"[]", b"42", b"  true ", b"", b"{not json", b"\xff\xfe"])
@pytest.mark.parametrize("accept", [None, GRAPHQL_RESPONSE])
def test_a_body_that_is_not_a_request_object_is_a_400_json_error(
    service: Service, raw: bytes, accept: str | None
) -> None:
    response = post(service, None, raw=raw, accept=accept)
    assert request_error(response, 400, accept or "application/json")["extensions"]["code"] == "BAD_REQUEST"


@pytest.mark.parametrize(
    "body",
    [{"query": 5}, {"query": "{ __typename }", "variables": []}, {"query": "{ __typename }", "extensions": "x"}, {}],
)
def test_wrong_request_parameters_are_a_400_json_error(service: Service, body: dict[str, object]) -> None:
    assert request_error(post(service, body), 400)["extensions"]["code"] == "BAD_REQUEST"


def test_unsupported_content_type_is_a_json_error(service: Service) -> None:
    response = httpx.post(service.http_url, content=b"{ __typename }", headers={"content-type": "text/plain"})
    assert request_error(response, 400)["extensions"]["code"] == "BAD_REQUEST"


def test_a_mutation_over_get_is_405_and_does_not_run(service: Service) -> None:
    mutation = 'mutation { submitText(input: {text: "x"}) { deduplicated } }'
    response = httpx.get(service.http_url, params={"query": mutation})
    assert request_error(response, 405)["extensions"]["code"] == "BAD_REQUEST"
    assert response.headers["allow"] == "POST"
    # Queries still work over GET.
    assert httpx.get(service.http_url, params={"query": "{ __typename }"}).json() == {"data": {"__typename": "Query"}}


def test_other_methods_are_405_json(service: Service) -> None:
    # PUT and DELETE are graphql-sse's (single connection mode: tests/test_http_subscriptions.py).
    response = httpx.patch(service.http_url, content=b"{}")
    assert request_error(response, 405)["extensions"]["code"] == "BAD_REQUEST"
    assert response.headers["allow"] == "GET, POST, PUT, DELETE"
