"""Malformed and out-of-order websocket traffic ends with the protocol's close codes."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import websockets
from redis import Redis
from websockets.exceptions import ConnectionClosed

from gql_service import store
from gql_service.models import JobRecord

from .service import Service

TRANSPORT_WS = "graphql-transport-ws"
LEGACY_WS = "graphql-ws"


async def closed_with(ws: Any) -> tuple[int | None, str]:
    with pytest.raises(ConnectionClosed) as info:
        for _ in range(10):
            await ws.recv()
    rcvd = info.value.rcvd
    assert rcvd is not None, "the server must close with a code"
    return rcvd.code, rcvd.reason


def connect(service: Service, protocol: str = TRANSPORT_WS) -> Any:
    return websockets.connect(service.ws_url, subprotocols=[protocol])  # type: ignore[list-item]


async def init(ws: Any) -> None:
    await ws.send(json.dumps({"type": "connection_init"}))
    assert json.loads(await ws.recv())["type"] == "connection_ack"


async def test_non_json_message_closes_4400(service: Service) -> None:
    async with connect(service) as ws:
        await ws.send("this is not json")
        code, _ = await closed_with(ws)
    assert code == 4400


async def test_unknown_message_type_closes_4400(service: Service) -> None:
    async with connect(service) as ws:
        await init(ws)
        await ws.send(json.dumps({"type": "bogus"}))
        code, _ = await closed_with(ws)
    assert code == 4400


async def test_subscribe_before_connection_init_closes_4401(service: Service) -> None:
    async with connect(service) as ws:
        await ws.send(
            json.dumps(
                {"id": "1", "type": "subscribe", "payload": {"query": 'subscription { jobUpdates(id: "x") { id } }'}}
            )
        )
        code, reason = await closed_with(ws)
    assert code == 4401 and reason == "Unauthorized"


async def test_second_connection_init_closes_4429(service: Service) -> None:
    async with connect(service) as ws:
        await init(ws)
        await ws.send(json.dumps({"type": "connection_init"}))
        code, _ = await closed_with(ws)
    assert code == 4429


def parked_job(redis_url: str) -> str:
    """A QUEUED job that no worker will take: its subscription stays open."""
    record = JobRecord(id=uuid.uuid4().hex)
    client = Redis.from_url(redis_url)
    with client.pipeline() as pipe:
        store.create_job(pipe, record, text="parked", ttl_s=600)
        pipe.execute()
    client.close()
    return record.id


async def test_duplicate_subscription_id_closes_4409(service: Service, e2e_redis: str) -> None:
    query = 'subscription { jobUpdates(id: "%s") { version } }' % parked_job(e2e_redis)
    message = {"id": "same", "type": "subscribe", "payload": {"query": query}}
    async with connect(service) as ws:
        await init(ws)
        await ws.send(json.dumps(message))
        assert json.loads(await ws.recv())["type"] == "next"
        await ws.send(json.dumps(message))
        code, reason = await closed_with(ws)
    assert code == 4409 and "already exists" in reason


async def test_invalid_query_is_an_error_message_not_a_crash(service: Service) -> None:
    async with connect(service) as ws:
        await init(ws)
        await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": "subscription { nope }"}}))
        reply = json.loads(await ws.recv())
        assert reply["type"] == "error" and reply["id"] == "1"
        assert "nope" in reply["payload"][0]["message"]
        # The connection survives and still serves.
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await ws.recv())["type"] == "pong"


async def test_unsupported_subprotocol_is_refused(service: Service) -> None:
    with pytest.raises(Exception) as info:
        async with websockets.connect(service.ws_url, subprotocols=["chat"]) as ws:  # type: ignore[list-item]
            await ws.recv()
    assert "4406" in str(info.value) or "subprotocol" in str(info.value).lower() or "403" in str(info.value)


async def test_malformed_json_shapes_close_4400(service: Service) -> None:
    for bad in ("[1, 2]", '"just a string"', "42", '{"type": 7}', "null"):
        async with connect(service) as ws:
            await init(ws)
            await ws.send(bad)
            code, _ = await closed_with(ws)
        assert code == 4400, bad


async def legacy_init(ws: Any) -> None:
    await ws.send(json.dumps({"type": "connection_init"}))
    assert json.loads(await ws.recv())["type"] == "connection_ack"


async def test_legacy_unknown_job_ends_with_not_found(service: Service) -> None:
    async with connect(service, LEGACY_WS) as ws:
        await legacy_init(ws)
        await ws.send(
            json.dumps(
                {"type": "start", "id": "1", "payload": {"query": 'subscription { jobUpdates(id: "x") { id } }'}}
            )
        )
        reply = json.loads(await ws.recv())
        assert reply["id"] == "1"
        errors = reply["payload"] if isinstance(reply["payload"], list) else reply["payload"]["errors"]
        assert errors[0]["extensions"]["code"] == "NOT_FOUND"


async def test_legacy_malformed_messages_get_error_replies_and_the_connection_lives(service: Service) -> None:
    async with connect(service, LEGACY_WS) as ws:
        await legacy_init(ws)
        for bad, expected in [
            ("[1]", "Invalid message type!"),
            ('{"type": "subscribe"}', "Invalid message type!"),
            ('{"type": "start", "payload": {"query": "{ __typename }"}}', "the message needs a string id"),
            ('{"type": "start", "id": "2", "payload": "nope"}', "the payload must be an object"),
        ]:
            await ws.send(bad)
            reply = json.loads(await ws.recv())
            assert reply["type"] == "error" and reply["payload"]["message"] == expected, bad
        await ws.send("not json at all")  # ignored, as by the reference server's clients never sent
        await ws.send(
            json.dumps(
                {"type": "start", "id": "3", "payload": {"query": 'subscription { jobUpdates(id: "x") { id } }'}}
            )
        )
        assert json.loads(await ws.recv())["id"] == "3"
