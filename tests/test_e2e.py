"""End to end: real uvicorn, real RQ worker processes, real GraphQL clients on both protocols."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from gql import Client, GraphQLRequest
from gql.transport.websockets import WebsocketsTransport
from redis import Redis

from .clients import SUBMIT, TEXT, UPDATES, follow, post, submit
from .openai_stub import VALID_EXTRACTION, OpenAIStub
from .service import Service, wait_until


def assert_full_run(events: list[dict[str, Any]]) -> None:
    versions = [e["version"] for e in events]
    assert versions == sorted(set(versions)), versions
    assert events[-1]["status"] == "FINISHED" and events[-1]["stage"] == "DONE"
    result = events[-1]["result"]
    assert result["sentiment"] == "POSITIVE" and result["language"] == "en"
    assert 1 <= len(result["tags"]) <= 5
    assert {"type": "PERSON", "value": "Dr. Rao", "confidence": 0.85} in result["entities"]
    assert events[-1]["usage"]["totalTokens"] > 0


@pytest.mark.parametrize(
    "protocol", [WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL, WebsocketsTransport.APOLLO_SUBPROTOCOL]
)
async def test_submit_then_follow_to_done(service: Service, protocol: str) -> None:
    job_id = submit(service)
    events = await follow(service, job_id, protocol)
    assert_full_run(events)


async def test_subscriber_that_arrives_first_sees_queued_through_done(e2e_redis: str) -> None:
    # No worker yet: the job waits QUEUED while we subscribe, then a worker starts.
    with Service(e2e_redis, workers=0, env={"RQ_QUEUE": "llm-late-worker"}) as svc:
        job_id = submit(svc)
        task = asyncio.create_task(
            follow(svc, job_id, WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL, first_seen := asyncio.Event())
        )
        await asyncio.wait_for(first_seen.wait(), 10)
        svc.start_worker(1)
        events = await task
    assert [(e["version"], e["status"], e["stage"]) for e in events] == [
        (1, "QUEUED", "QUEUED"),
        (2, "STARTED", "CALLING_LLM"),
        (3, "STARTED", "VALIDATING"),
        (4, "FINISHED", "DONE"),
    ]
    assert_full_run(events)


async def test_many_concurrent_jobs_all_reach_done(service: Service) -> None:
    ids = [submit(service, f"{TEXT} Number {i}.") for i in range(12)]
    results = await asyncio.gather(*(follow(service, i, WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL) for i in ids))
    for events in results:
        assert_full_run(events)


async def test_late_subscriber_gets_exactly_the_final_state(service: Service) -> None:
    job_id = submit(service)
    await follow(service, job_id, WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL)
    late = await follow(service, job_id, WebsocketsTransport.APOLLO_SUBPROTOCOL)
    assert len(late) == 1 and late[0]["stage"] == "DONE"


async def test_unknown_job_subscription_errors_not_found(service: Service) -> None:
    transport = WebsocketsTransport(url=service.ws_url, subprotocols=[WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL])
    from gql.transport.exceptions import TransportQueryError

    async with Client(transport=transport) as session:
        with pytest.raises(TransportQueryError) as info:
            async for _ in session.subscribe(GraphQLRequest(UPDATES, variable_values={"id": "nope"})):
                pass
    assert info.value.errors[0]["extensions"]["code"] == "NOT_FOUND"


def test_http_query_and_request_id(service: Service) -> None:
    response = post(service, SUBMIT, headers={"X-Request-ID": "req-123"}, text=TEXT)
    assert response.headers["x-request-id"] == "req-123"
    job = response.json()["data"]["submitText"]["job"]
    assert job["requestId"] == "req-123" and job["status"] == "QUEUED" and job["version"] == 1
    got = post(service, "query($id: ID!) { job(id: $id) { id requestId } }", id=job["id"]).json()
    assert got == {"data": {"job": {"id": job["id"], "requestId": "req-123"}}}
    assert post(service, 'query { job(id: "missing") { id } }').json() == {"data": {"job": None}}


def test_bad_input_over_http(service: Service) -> None:
    body = post(service, SUBMIT, text="   ").json()
    assert body["data"] is None and body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    body = post(service, SUBMIT, text=42).json()
    assert "String cannot represent" in body["errors"][0]["message"]
    response = httpx.post(service.http_url, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400


def test_health_and_readiness(service: Service) -> None:
    assert httpx.get(f"http://127.0.0.1:{service.port}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"http://127.0.0.1:{service.port}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_graphiql_playground_is_served(service: Service) -> None:
    page = httpx.get(service.http_url, headers={"accept": "text/html"})
    assert page.status_code == 200 and "graphiql" in page.text.lower()


async def test_closing_the_socket_unsubscribes(e2e_redis: str) -> None:
    import websockets

    with Service(e2e_redis, workers=0, env={"RQ_QUEUE": "llm-unsubscribe"}) as svc:
        job_id = submit(svc)  # never runs: no worker on this queue
        channel = f"gqls:job:{job_id}:events"
        redis = Redis.from_url(e2e_redis)
        query = '{"query": "subscription { jobUpdates(id: \\"%s\\") { version } }"}' % job_id
        async with websockets.connect(svc.ws_url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
            await ws.send('{"type": "connection_init"}')
            assert '"connection_ack"' in await ws.recv()
            await ws.send('{"id": "1", "type": "subscribe", "payload": %s}' % query)
            assert '"next"' in await ws.recv()
            assert dict(redis.pubsub_numsub(channel))[channel.encode()] == 1
        wait_until(
            lambda: dict(redis.pubsub_numsub(channel))[channel.encode()] == 0, what="the channel to be unsubscribed"
        )
        redis.close()


def test_openai_provider_end_to_end(e2e_redis: str, openai_stub: OpenAIStub) -> None:
    openai_stub.reset()
    env = {
        "RQ_QUEUE": "llm-openai",
        **openai_stub.env,
        "OPENAI_MODEL": "stub-e2e",
    }
    with Service(e2e_redis, workers=1, env=env) as svc:
        job_id = submit(svc)
        events = asyncio.run(follow(svc, job_id, WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL))
    final = events[-1]
    assert final["status"] == "FINISHED" and final["model"] == "stub-e2e"
    expected = {**VALID_EXTRACTION, "sentiment": "POSITIVE"}
    expected["toxicityScore"] = expected.pop("toxicity_score")
    assert final["result"] == expected
    assert final["usage"] == {"promptTokens": 100, "completionTokens": 50, "totalTokens": 150}
    assert any(TEXT in m["content"] for m in openai_stub.requests[-1]["messages"])


def test_readyz_fails_while_redis_is_unreachable_but_healthz_answers() -> None:
    from gql_service.cli.embedded_redis import free_port

    with Service(f"redis://127.0.0.1:{free_port()}/0", workers=0) as svc:
        base = f"http://127.0.0.1:{svc.port}"
        assert httpx.get(f"{base}/healthz").status_code == 200
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
        body = post(svc, SUBMIT, text=TEXT).json()
        assert body["errors"][0]["extensions"]["code"] == "SERVICE_UNAVAILABLE"
        assert "Traceback" not in str(body)


async def test_concurrent_duplicate_submissions_create_one_job(service: Service) -> None:
    query = 'mutation { submitText(input: {text: "Once only.", idempotencyKey: "pay-77"}) { job { id } deduplicated } }'
    async with httpx.AsyncClient() as client:
        replies = await asyncio.gather(*(client.post(service.http_url, json={"query": query}) for _ in range(20)))
    payloads = [r.json()["data"]["submitText"] for r in replies]
    assert len({p["job"]["id"] for p in payloads}) == 1
    assert sorted(p["deduplicated"] for p in payloads) == [False] + [True] * 19


async def test_simple_worker_class_runs_jobs_too(e2e_redis: str) -> None:
    with Service(e2e_redis, workers=2, env={"RQ_QUEUE": "llm-simple", "WORKER_CLASS": "simple"}) as svc:
        events = await follow(svc, submit(svc))
        assert "simple process" in svc.procs[0].output()
    assert_full_run(events)
