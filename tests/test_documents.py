"""Persisted queries and trusted documents (gql_service/api/documents.py), over HTTP (GET and
POST) and both websocket protocols, against a live API."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from redis import Redis

from gql_service import keys

from .clients import SUBMIT, TEXT, post, submit
from .service import Service

JOB = "query Job($id: ID!) { job(id: $id) { id status } }"
FOLLOW = "subscription Follow($id: ID!) { jobUpdates(id: $id) { id status stage } }"
HOSTILE = "query { " + " ".join(f'a{i}: job(id: "x") {{ id }}' for i in range(500)) + " }"


def sha(document: str) -> str:
    return hashlib.sha256(document.encode()).hexdigest()


def apq(digest: str) -> dict[str, Any]:
    return {"persistedQuery": {"version": 1, "sha256Hash": digest}}


def error_of(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    return response.status_code, body["errors"][0]["extensions"]["code"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("documents") / "persisted-documents.json"
    path.write_text(json.dumps({sha(d): d for d in (JOB, SUBMIT, FOLLOW)}))
    return path


@pytest.fixture(scope="module")
def trusted_only(e2e_redis: str, manifest: Path) -> Iterator[Service]:
    env = {
        "RQ_QUEUE": "llm-trusted-only",
        "TRUSTED_DOCUMENTS": str(manifest),
        "TRUSTED_DOCUMENTS_ONLY": "true",
        "TRUSTED_DOCUMENTS_ALLOW_PLAYGROUND": "true",
    }
    with Service(e2e_redis, workers=1, env=env) as svc:
        yield svc


# -- automatic persisted queries ---------------------------------------------------------
def test_apq_a_hash_alone_is_not_found_then_registered_with_its_query_and_run_by_hash(service: Service) -> None:
    job_id = submit(service)
    document = JOB + f" # {job_id}"  # a document no other test registered
    digest = sha(document)
    unknown = httpx.post(service.http_url, json={"variables": {"id": job_id}, "extensions": apq(digest)})
    assert error_of(unknown) == (200, "PERSISTED_QUERY_NOT_FOUND")  # 200: Apollo's link retries
    assert unknown.json()["errors"][0]["message"] == "PersistedQueryNotFound"
    registered = httpx.post(
        service.http_url, json={"query": document, "variables": {"id": job_id}, "extensions": apq(digest)}
    )
    assert registered.json()["data"]["job"]["id"] == job_id
    by_hash = httpx.post(service.http_url, json={"variables": {"id": job_id}, "extensions": apq(digest)})
    assert by_hash.json()["data"]["job"]["id"] == job_id
    # GET too, as Apollo's useGETForHashedQueries sends it, even with a browser's Accept.
    params = {"variables": json.dumps({"id": job_id}), "extensions": json.dumps(apq(digest))}
    got = httpx.get(service.http_url, params=params, headers={"accept": "*/*"})
    assert got.json()["data"]["job"]["id"] == job_id


def test_apq_a_query_whose_hash_is_not_the_one_given_is_refused(service: Service, e2e_redis: str) -> None:
    wrong = sha("something else")
    answer = httpx.post(service.http_url, json={"query": "{ __typename }", "extensions": apq(wrong)})
    assert error_of(answer) == (400, "BAD_USER_INPUT")
    assert not Redis.from_url(e2e_redis).hexists(keys.APQ_DOCUMENTS, wrong)  # nothing stored under it
    for bad in ({"persistedQuery": {"version": 2, "sha256Hash": wrong}}, {"persistedQuery": "x"}):
        answer = httpx.post(service.http_url, json={"query": "{ __typename }", "extensions": bad})
        assert "data" not in answer.json() and answer.json()["errors"][0]["extensions"]["code"], answer.text
    short = httpx.post(service.http_url, json={"extensions": apq("abc")})
    assert error_of(short)[1] == "PERSISTED_QUERY_NOT_IN_LIST" and "64" in short.json()["errors"][0]["message"]


@pytest.mark.parametrize("protocol", ["graphql-transport-ws", "graphql-ws"])
async def test_apq_over_both_websocket_protocols(service: Service, protocol: str) -> None:
    job_id = submit(service)
    document = FOLLOW + f" # {protocol}"
    digest = sha(document)
    subscribe = "subscribe" if protocol == "graphql-transport-ws" else "start"
    data = "next" if protocol == "graphql-transport-ws" else "data"
    async with websockets.connect(service.ws_url, subprotocols=[protocol]) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"type": "connection_init"}))
        assert json.loads(await ws.recv())["type"] == "connection_ack"
        payload: dict[str, Any] = {"variables": {"id": job_id}, "extensions": apq(digest)}
        await ws.send(json.dumps({"id": "hash-only", "type": subscribe, "payload": payload}))
        refused = json.loads(await ws.recv())
        assert (refused["type"], refused["id"]) == ("error", "hash-only"), refused
        errors = refused["payload"] if isinstance(refused["payload"], list) else [refused["payload"]]
        assert errors[0]["extensions"]["code"] == "PERSISTED_QUERY_NOT_FOUND"
        # The socket serves on: the query with its hash registers it and runs.
        await ws.send(json.dumps({"id": "full", "type": subscribe, "payload": {**payload, "query": document}}))
        first = json.loads(await ws.recv())
        assert (first["type"], first["id"]) == (data, "full"), first
        assert first["payload"]["data"]["jobUpdates"]["id"] == job_id
        await ws.send(json.dumps({"id": "again", "type": subscribe, "payload": payload}))
        while (message := json.loads(await ws.recv()))["id"] != "again":
            pass
        assert message["type"] == data and message["payload"]["data"]["jobUpdates"]["id"] == job_id


def test_apq_off_answers_not_supported(e2e_redis: str) -> None:
    with Service(e2e_redis, workers=0, env={"APQ": "false", "RQ_QUEUE": "llm-apq-off"}) as svc:
        answer = httpx.post(svc.http_url, json={"extensions": apq(sha("{ __typename }"))})
        assert error_of(answer) == (200, "PERSISTED_QUERY_NOT_SUPPORTED")
        full = httpx.post(svc.http_url, json={"query": "{ __typename }"})  # as Apollo's link then sends
        assert full.json() == {"data": {"__typename": "Query"}}


async def test_a_hostile_client_cant_grow_the_apq_store_past_its_bound(e2e_redis: str) -> None:
    """10,000 distinct documents registered as fast as a client can: the store keeps the
    newest APQ_MAX_DOCUMENTS, each at most APQ_MAX_DOCUMENT_BYTES, and no more."""
    env = {"APQ_MAX_DOCUMENTS": "200", "APQ_MAX_DOCUMENT_BYTES": "1024", "RQ_QUEUE": "llm-apq-bound"}
    redis = Redis.from_url(e2e_redis)
    redis.delete(keys.APQ_DOCUMENTS, keys.APQ_REGISTERED)
    with Service(e2e_redis, workers=0, env=env) as svc:
        async with httpx.AsyncClient(timeout=30) as client:
            gate = asyncio.Semaphore(32)

            async def register(n: int) -> int:
                # A valid document of about 900 bytes, distinct for each n.
                document = f"query Q{n} {{ __typename }}" + " " * 850
                async with gate:
                    answer = await client.post(svc.http_url, json={"query": document, "extensions": apq(sha(document))})
                return answer.status_code

            statuses = await asyncio.gather(*(register(n) for n in range(10_000)))
    assert set(statuses) == {200}
    assert redis.hlen(keys.APQ_DOCUMENTS) == redis.zcard(keys.APQ_REGISTERED) == 200
    used = sum(redis.memory_usage(key) or 0 for key in (keys.APQ_DOCUMENTS, keys.APQ_REGISTERED))
    # The bound docs/api/persisted-queries.md gives: APQ_MAX_DOCUMENTS x APQ_MAX_DOCUMENT_BYTES, plus Redis's
    # own overhead.
    assert used < 200 * 1024 * 1.5, used
    oversized = "{ b: __typename }" + " " * 1100
    with Service(e2e_redis, workers=0, env=env) as svc:
        runs = httpx.post(svc.http_url, json={"query": oversized, "extensions": apq(sha(oversized))})
        assert runs.json()["data"]["b"] == "Query"  # run, but not kept
    assert not redis.hexists(keys.APQ_DOCUMENTS, sha(oversized))


# -- trusted documents -------------------------------------------------------------------
def test_trusted_documents_by_every_kind_of_id(trusted_only: Service) -> None:
    submitted = httpx.post(
        trusted_only.http_url, json={"documentId": f"sha256:{sha(SUBMIT)}", "variables": {"text": TEXT}}
    ).json()
    job_id = submitted["data"]["submitText"]["job"]["id"]
    variables = {"id": job_id}
    for body in (
        {"documentId": f"sha256:{sha(JOB)}"},  # the GraphQL-over-HTTP appendix
        {"documentId": sha(JOB)},  # bare, as GraphQL Code Generator's docs send it
        {"query": "", "documentId": f"sha256:{sha(JOB)}"},  # graphql-ws's client needs a string
        {"doc_id": sha(JOB)},  # Relay
        {"id": sha(JOB)},
        {"extensions": apq(sha(JOB))},  # Apollo's link
        {"query": JOB},  # in full: it is one of them
    ):
        answer = httpx.post(trusted_only.http_url, json={**body, "variables": variables})
        assert answer.json()["data"]["job"]["id"] == job_id, (body, answer.text)
    got = httpx.get(
        trusted_only.http_url, params={"documentId": f"sha256:{sha(JOB)}", "variables": json.dumps(variables)}
    )
    assert got.json()["data"]["job"]["id"] == job_id


def test_trusted_documents_only_refuses_everything_else_before_parsing_it(trusted_only: Service) -> None:
    for body in (
        {"query": "{ __typename }"},
        {"query": HOSTILE},
        {"query": "{ job(id: "},  # would not even parse
        {"documentId": f"sha256:{sha('{ __typename }')}"},
        {"doc_id": sha("nope")},
        {"query": "{ __typename }", "extensions": apq(sha("{ __typename }"))},  # no registering either
    ):
        answer = httpx.post(trusted_only.http_url, json=body)
        assert error_of(answer) == (400, "PERSISTED_QUERY_NOT_IN_LIST"), (body, answer.text)
    # The service's own pages (same Origin), allowed by TRUSTED_DOCUMENTS_ALLOW_PLAYGROUND.
    origin = trusted_only.http_url.removesuffix("/graphql")
    own = httpx.post(trusted_only.http_url, json={"query": "{ __typename }"}, headers={"origin": origin})
    assert own.json() == {"data": {"__typename": "Query"}}
    other = httpx.post(
        trusted_only.http_url, json={"query": "{ __typename }"}, headers={"origin": "http://evil.example"}
    )
    assert error_of(other)[1] == "PERSISTED_QUERY_NOT_IN_LIST"


async def test_trusted_documents_over_websockets(trusted_only: Service) -> None:
    job_id = post(trusted_only, SUBMIT, text=TEXT).json()["data"]["submitText"]["job"]["id"]
    async with websockets.connect(trusted_only.ws_url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"type": "connection_init"}))
        assert json.loads(await ws.recv())["type"] == "connection_ack"
        untrusted = {"query": 'subscription { jobUpdates(id: "x") { id } }'}
        await ws.send(json.dumps({"id": "no", "type": "subscribe", "payload": untrusted}))
        refused = json.loads(await ws.recv())
        assert (refused["type"], refused["payload"][0]["extensions"]["code"]) == (
            "error",
            "PERSISTED_QUERY_NOT_IN_LIST",
        )
        payload = {"documentId": f"sha256:{sha(FOLLOW)}", "variables": {"id": job_id}}
        await ws.send(json.dumps({"id": "yes", "type": "subscribe", "payload": payload}))
        stages = []
        while (message := json.loads(await ws.recv()))["type"] == "next":
            stages.append(message["payload"]["data"]["jobUpdates"]["stage"])
        assert message == {"id": "yes", "type": "complete"} and stages[-1] == "DONE", (message, stages)


def test_ids_required_refuses_even_a_trusted_document_sent_in_full(e2e_redis: str, manifest: Path) -> None:
    env = {"TRUSTED_DOCUMENTS": str(manifest), "TRUSTED_DOCUMENTS_REQUIRE_ID": "true", "RQ_QUEUE": "llm-ids"}
    with Service(e2e_redis, workers=0, env=env) as svc:
        assert error_of(post(svc, SUBMIT, text=TEXT)) == (400, "PERSISTED_QUERY_ID_REQUIRED")
        by_id = httpx.post(svc.http_url, json={"doc_id": sha(SUBMIT), "variables": {"text": TEXT}})
        assert by_id.json()["data"]["submitText"]["job"]["id"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({sha("{ nope }"): "{ nope }"}, "does not validate: Cannot query field 'nope' on type 'Query'."),
        ({sha("x"): "{ __typename }"}, "is not the SHA-256 of its text"),
        (["{ __typename }"], 'must be a JSON object {"<sha256 hex>": "<document>"}'),
    ],
)
def test_a_bad_manifest_stops_start_up_with_one_line_naming_it(tmp_path: Path, content: object, expected: str) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(content))
    env = {"TRUSTED_DOCUMENTS": str(path), "REDIS_URL": "redis://127.0.0.1:1"}
    done = subprocess.run(
        [sys.executable, "-m", "gql_service", "serve", "--port", "1"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gql-service: bad setting: TRUSTED_DOCUMENTS: {path}"), lines
    assert expected in lines[0], lines
