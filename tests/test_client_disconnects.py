"""A client that goes while the server is sending to it (a closed tab, a dropped network) is
an ordinary end: nothing at ERROR, no traceback in the API's log. Real clients against a real
API process, each dropping its connection while a flood of a job's versions is being sent.
(These drops logged "Exception in worker task" for graphql-transport-ws and "Task exception
was never retrieved" for graphql-ws, with Starlette's traceback.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
import websockets

from .flood import Flood
from .service import Service, wait_until
from .test_websocket_protocol import LEGACY_WS, TRANSPORT_WS, init

UPDATES = "subscription($id: ID!) { jobUpdates(id: $id) { version } }"


@pytest.fixture(scope="module")
def api(e2e_redis: str) -> Iterator[Service]:
    with Service(e2e_redis, workers=0, env={"RQ_QUEUE": "llm-disconnects"}) as svc:
        yield svc


def log_of(svc: Service) -> str:
    return next(p for p in svc.procs if p.name == "api").output()


@pytest.mark.parametrize("protocol", [TRANSPORT_WS, LEGACY_WS])
async def test_a_websocket_client_that_goes_mid_send_leaves_no_error_in_the_log(
    api: Service, e2e_redis: str, protocol: str
) -> None:
    start = "subscribe" if protocol == TRANSPORT_WS else "start"
    before = len(log_of(api))
    with Flood(e2e_redis) as flood:
        for n in range(16):
            # max_queue=None: the client reads on while it closes (with its default bound, the
            # flood fills its queue, it stops reading, and waits 10 s for the server's close
            # frame stuck behind the flood).
            async with websockets.connect(api.ws_url, subprotocols=[protocol], max_queue=None) as ws:  # type: ignore[list-item]
                await init(ws)
                for i in range(20):
                    payload = {"query": UPDATES, "variables": {"id": flood.job_id}}
                    await ws.send(json.dumps({"id": f"s{i}", "type": start, "payload": payload}))
                received = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(40)]
                assert {m["type"] for m in received} <= {"next", "data", "ka"}, received  # frames are flowing
                if n % 2:
                    ws.transport.abort()  # the network drops: no closing handshake
                else:
                    await ws.close()  # the client closes while the server sends
    logged = log_of(api)[before:]
    assert " ERROR " not in logged and "Traceback" not in logged, logged[-3000:]


@pytest.mark.parametrize(
    "accept", ["text/event-stream", "multipart/mixed;subscriptionSpec=1.0"], ids=["sse", "multipart"]
)
def test_an_http_stream_dropped_mid_send_leaves_no_error_in_the_log(api: Service, e2e_redis: str, accept: str) -> None:
    before = len(log_of(api))
    with Flood(e2e_redis) as flood:
        body = {"query": UPDATES, "variables": {"id": flood.job_id}}
        for _ in range(8):
            with httpx.stream("POST", api.http_url, json=body, headers={"accept": accept}, timeout=30) as response:
                assert response.status_code == 200
                received = b"".join(chunk for chunk, _ in zip(response.iter_raw(), range(20), strict=False))
                assert received.count(b'"version"') >= 2  # frames are flowing
            # Leaving the block drops the connection while the server sends.
    logged = log_of(api)[before:]
    assert " ERROR " not in logged and "Traceback" not in logged, logged[-3000:]


def active_subscriptions(svc: Service) -> float:
    metrics = httpx.get(svc.http_url.replace("/graphql", "/metrics")).text
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("gqls_active_subscriptions"))


@pytest.mark.parametrize(
    "accept", ["text/event-stream", "multipart/mixed;subscriptionSpec=1.0"], ids=["sse", "multipart"]
)
def test_an_http_stream_dropped_mid_send_frees_its_subscription(api: Service, e2e_redis: str, accept: str) -> None:
    """Its watch slots too (MAX_WATCHED_JOBS_PER_TENANT): a stream the client dropped while the
    server was sending once stayed subscribed for good."""
    with Flood(e2e_redis) as flood:
        body = {"query": UPDATES, "variables": {"id": flood.job_id}}
        for _ in range(4):
            with httpx.stream("POST", api.http_url, json=body, headers={"accept": accept}, timeout=30) as response:
                received = b"".join(chunk for chunk, _ in zip(response.iter_raw(), range(20), strict=False))
                assert received.count(b'"version"') >= 2  # frames are flowing
        wait_until(
            lambda: active_subscriptions(api) == 0, timeout_s=15, what="the dropped streams' subscriptions to end"
        )
