"""API keys and tenants, and hostile input over the real transports."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
import websockets
from gql import Client, GraphQLRequest
from gql.transport.exceptions import TransportQueryError
from gql.transport.websockets import WebsocketsTransport
from websockets.exceptions import ConnectionClosed

from .clients import SUBMIT, TEXT, UPDATES, follow, post, submit
from .service import Service

ACME, GLOBEX = "k-acme-0123456789", "k-globex-0123456789"
AS_ACME = {"Authorization": f"Bearer {ACME}"}
AS_GLOBEX = {"Authorization": f"Bearer {GLOBEX}"}
JOB = "query($id: ID!) { job(id: $id) { id status } }"


@pytest.fixture(scope="module")
def secured(e2e_redis: str) -> Iterator[Service]:
    env = {"RQ_QUEUE": "llm-secured", "API_KEYS": json.dumps({ACME: "acme", GLOBEX: "globex"})}
    with Service(e2e_redis, workers=1, env=env) as svc:
        yield svc


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-123"}, {"Authorization": ACME}])
def test_http_without_a_valid_key_is_401_unauthenticated(secured: Service, headers: dict[str, str]) -> None:
    response = post(secured, SUBMIT, headers=headers, text=TEXT)
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"
    assert response.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


def test_rejections_before_the_view_speak_the_media_type_asked_for(secured: Service) -> None:
    """A GraphQL-over-HTTP client asking for application/graphql-response+json gets it on
    the 401 and the 413 too, which middleware answers before Strawberry sees the request."""
    accept = {"Accept": "application/graphql-response+json"}
    unauthenticated = post(secured, SUBMIT, headers=accept, text=TEXT)
    big = json.dumps({"query": SUBMIT, "variables": {"text": "x" * 1_100_000}})
    too_large = httpx.post(secured.http_url, content=big, headers={**accept, "content-type": "application/json"})
    for response, status, code in ((unauthenticated, 401, "UNAUTHENTICATED"), (too_large, 413, "BAD_USER_INPUT")):
        assert response.status_code == status
        assert response.headers["content-type"] == "application/graphql-response+json; charset=utf-8"
        assert response.json()["errors"][0]["extensions"]["code"] == code


def test_a_tenant_never_sees_another_tenants_job(secured: Service) -> None:
    job_id = submit(secured, headers=AS_ACME)
    mine = post(secured, JOB, headers=AS_ACME, id=job_id).json()
    assert mine["data"]["job"]["id"] == job_id
    theirs = post(secured, JOB, headers=AS_GLOBEX, id=job_id).json()
    assert theirs == {"data": {"job": None}}
    cancel = post(secured, "mutation($id: ID!) { cancelJob(id: $id) { id } }", headers=AS_GLOBEX, id=job_id).json()
    assert cancel["errors"][0]["extensions"]["code"] == "NOT_FOUND"


async def test_subscriptions_are_per_tenant_too(secured: Service) -> None:
    job_id = submit(secured, headers=AS_ACME)
    events = await follow(secured, job_id, params=AS_ACME)
    assert events[-1]["status"] == "FINISHED"
    transport = WebsocketsTransport(url=secured.ws_url, init_payload=AS_GLOBEX)
    async with Client(transport=transport) as session:
        with pytest.raises(TransportQueryError) as info:
            async for _ in session.subscribe(GraphQLRequest(UPDATES, variable_values={"id": job_id})):
                pass
    assert info.value.errors is not None and info.value.errors[0]["extensions"]["code"] == "NOT_FOUND"


async def test_idempotency_keys_are_per_tenant(secured: Service) -> None:
    query = (
        'mutation($t: String!) { submitText(input: {text: $t, idempotencyKey: "same"}) { job { id } deduplicated } }'
    )
    a = post(secured, query, headers=AS_ACME, t=TEXT).json()["data"]["submitText"]
    b = post(secured, query, headers=AS_GLOBEX, t=TEXT).json()["data"]["submitText"]
    assert a["job"]["id"] != b["job"]["id"] and not a["deduplicated"] and not b["deduplicated"]


async def test_websocket_without_a_key_is_closed_4403(secured: Service) -> None:
    async with websockets.connect(secured.ws_url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": "Bearer nope-nope-nope"}}))
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 4403


def test_keys_never_reach_the_logs(secured: Service) -> None:
    post(secured, SUBMIT, headers={"Authorization": "Bearer k-leaked-attempt-999"}, text=TEXT)
    logs = secured.logs()
    assert ACME not in logs and GLOBEX not in logs and "k-leaked-attempt-999" not in logs


def test_open_mode_says_so_once_at_start_up(service: Service) -> None:
    assert service.logs().count("API_KEYS is not set") == 1


# -- hostile input -------------------------------------------------------------------


def test_request_body_over_the_limit_is_413(service: Service) -> None:
    big = json.dumps({"query": SUBMIT, "variables": {"text": "x" * 1_100_000}})
    response = httpx.post(service.http_url, content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"

    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b" " * 100_000  # no Content-Length: the limit still holds

    response = httpx.post(service.http_url, content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_text_over_max_text_chars_is_bad_user_input(service: Service) -> None:
    body = post(service, SUBMIT, text="x" * 20_001).json()
    assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT" and "20000" in body["errors"][0]["message"]


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("query { " + " ".join(f"a{i}: __typename" for i in range(31)) + " }", "aliases"),
        ("query { " + "__typename " * 2100 + "}", "token"),
        # Introspection is exempt from the depth count (GraphiQL's own query nests ofType
        # eight deep); a nesting bomb through it is stopped by the parser's nesting guard.
        ("query { __schema { types { fields { type " + "{ ofType " * 700 + "{ name }" + " }" * 700 + " } } } }",
         "nested too deeply"),
    ],
)  # fmt: skip
def test_hostile_queries_are_refused_over_http(service: Service, query: str, fragment: str) -> None:
    body = post(service, query).json()
    assert body.get("data") is None and fragment in body["errors"][0]["message"].lower()


async def test_subscriptions_per_connection_are_capped(e2e_redis: str) -> None:
    env = {"RQ_QUEUE": "llm-cap", "MAX_SUBSCRIPTIONS_PER_CONNECTION": "3"}
    with Service(e2e_redis, workers=0, env=env) as svc:
        job_id = submit(svc)  # never runs: its subscriptions stay open
        query = 'subscription { jobUpdates(id: "%s") { version } }' % job_id
        async with websockets.connect(svc.ws_url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
            await ws.send(json.dumps({"type": "connection_init"}))
            assert json.loads(await ws.recv())["type"] == "connection_ack"
            for i in range(4):
                await ws.send(json.dumps({"id": str(i), "type": "subscribe", "payload": {"query": query}}))
            replies = [json.loads(await ws.recv()) for _ in range(4)]
        by_id = {r["id"]: r for r in replies}
        assert [by_id[str(i)]["type"] for i in range(3)] == ["next"] * 3
        assert by_id["3"]["type"] == "error" and "limit" in by_id["3"]["payload"][0]["message"].lower()


async def test_missing_connection_init_times_out_4408(e2e_redis: str) -> None:
    with Service(e2e_redis, workers=0, env={"WS_INIT_TIMEOUT_S": "0.5"}) as svc:
        async with websockets.connect(svc.ws_url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 4408


async def test_oversized_websocket_frame_closes_1009(service: Service) -> None:
    async with websockets.connect(service.ws_url, subprotocols=["graphql-transport-ws"], max_size=None) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"type": "connection_init"}))
        assert json.loads(await ws.recv())["type"] == "connection_ack"
        await ws.send("x" * 1_100_000)
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


def test_wrong_types_and_unknown_fields_never_create_a_job(service: Service) -> None:
    for variables in ({"text": ["a"]}, {"text": None}, {"text": {"x": 1}}):
        body = post(service, SUBMIT, **variables).json()
        assert body.get("data") is None and body["errors"]
    body = post(service, 'mutation { submitText(input: {text: "x", admin: true}) { job { id } } }').json()
    assert "admin" in body["errors"][0]["message"]
