"""Subscriptions over plain HTTP, against a live service with API keys: GraphQL over
Server-Sent Events (both graphql-sse modes) and Apollo's multipart subscriptions. The
same guarantees as the websocket path: the key, snapshot first, typed errors, the
per-tenant bound, and a client that goes frees its subscription at once. (The reference
clients, graphql-sse and Apollo Client, are run against it in tests/test_js_clients.py.)"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .clients import SUBMIT, TEXT
from .service import Service, wait_until

KEY = "sk-http-streams"
AUTH = {"authorization": f"Bearer {KEY}"}
SSE = {"accept": "text/event-stream"}
MULTIPART = {"accept": "multipart/mixed;subscriptionSpec=1.0,application/json"}  # Apollo Client's
MULTIPART_CONTENT_TYPE = 'multipart/mixed; boundary="graphql"; subscriptionSpec="1.0"'
URQL_SUBSCRIPTION_ACCEPT = "text/event-stream, multipart/mixed"  # urql's fetchSubscriptions
UPDATES = "subscription($id: ID!) { jobUpdates(id: $id) { id status stage version } }"


@pytest.fixture(scope="module")
def svc(e2e_redis: str) -> Iterator[Service]:
    env = {
        "RQ_QUEUE": "llm-http-streams",
        "API_KEYS": json.dumps({KEY: "acme", "sk-other-tenant": "globex"}),
        "MAX_WATCHED_JOBS_PER_TENANT": "2",
        "MAX_SUBSCRIPTIONS_PER_CONNECTION": "2",  # operations on one single-connection stream
        "MAX_SSE_RESERVATIONS_PER_TENANT": "2",
        "OFFLINE_STREAM_DELAY_MS": "20",
    }
    with Service(e2e_redis, workers=1, env=env) as service:
        yield service


def _submit(svc: Service) -> str:
    body = httpx.post(svc.http_url, json={"query": SUBMIT, "variables": {"text": TEXT}}, headers=AUTH).json()
    return str(body["data"]["submitText"]["job"]["id"])


def _sse_events(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    event = None
    for line in lines:
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data:") and event is not None:
            data = line.removeprefix("data:").strip()
            yield event, json.loads(data) if data else None
            event = None


def test_sse_follows_a_job_from_its_snapshot_to_its_end(svc: Service) -> None:
    job_id = _submit(svc)
    with httpx.stream(
        "POST", svc.http_url, json={"query": UPDATES, "variables": {"id": job_id}}, headers={**SSE, **AUTH}, timeout=30
    ) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = list(_sse_events(response.iter_lines()))
    updates = [data["data"]["jobUpdates"] for kind, data in events if kind == "next"]
    assert events[-1] == ("complete", None)
    versions = [u["version"] for u in updates]
    assert versions == sorted(set(versions)) and updates[-1]["stage"] == "DONE", updates


def test_multipart_follows_a_job_to_its_end(svc: Service) -> None:
    job_id = _submit(svc)
    with httpx.stream(
        "POST", svc.http_url, json={"query": UPDATES, "variables": {"id": job_id}}, headers={**MULTIPART, **AUTH},
        timeout=30,
    ) as response:  # fmt: skip
        assert response.headers["content-type"] == MULTIPART_CONTENT_TYPE
        body = response.read().decode()
    payloads = [part["payload"] for part in _multipart_parts(body) if part]  # {} is a heartbeat
    assert payloads[-1]["data"]["jobUpdates"]["stage"] == "DONE"


def _multipart_parts(body: str) -> list[Any]:
    """Every part of a multipart/mixed body with boundary "graphql", read as strictly as
    RFC 2046 (and meros) read it: the body opens with the delimiter, parts are separated by
    it, it is closed once, and each part is headers, a blank line, then JSON."""
    assert body.startswith("--graphql\r\n"), body[:60]
    inner, close, epilogue = body.removeprefix("--graphql\r\n").partition("\r\n--graphql--")
    assert close and epilogue in ("", "\r\n") and "--graphql--" not in inner, body[-60:]
    parts = []
    for part in inner.split("\r\n--graphql\r\n"):
        headers, blank, data = part.partition("\r\n\r\n")
        assert blank and "content-type: application/json" in headers.lower(), part
        parts.append(json.loads(data))
    return parts


def test_multipart_framing_is_exact_for_strict_parsers(svc: Service) -> None:
    """The Content-Type named a stray `,application/json`, the first part had no opening
    delimiter and the close came after an empty part (`--graphql\\r\\n--graphql--`): meros
    dropped the first part and read one that was not JSON."""
    job_id = _submit(svc)
    with httpx.stream(
        "POST", svc.http_url, json={"query": UPDATES, "variables": {"id": job_id}},
        headers={"accept": "multipart/mixed;subscriptionSpec=1.0", **AUTH}, timeout=30,
    ) as response:  # fmt: skip
        assert response.headers["content-type"] == MULTIPART_CONTENT_TYPE
        body = response.read().decode()
    parts = _multipart_parts(body)
    updates = [part["payload"]["data"]["jobUpdates"] for part in parts if part]
    assert updates[0]["version"] >= 1 and updates[-1]["stage"] == "DONE", parts


def test_a_query_or_mutation_asked_for_with_multipart_alone_is_answered_in_one_part(svc: Service) -> None:
    """It was an INTERNAL_SERVER_ERROR ("queries are not allowed"); so was a mutation over
    GET on a stream ("mutations are not allowed")."""
    only_multipart = {"accept": "multipart/mixed;subscriptionSpec=1.0", **AUTH}
    answer = httpx.post(svc.http_url, json={"query": SUBMIT, "variables": {"text": TEXT}}, headers=only_multipart)
    assert answer.status_code == 200 and answer.headers["content-type"] == MULTIPART_CONTENT_TYPE
    [payload] = [part["payload"] for part in _multipart_parts(answer.text) if part]
    job_id = payload["data"]["submitText"]["job"]["id"]
    query = "query($id: ID!) { job(id: $id) { id } }"
    answer = httpx.post(svc.http_url, json={"query": query, "variables": {"id": job_id}}, headers=only_multipart)
    [payload] = [part["payload"] for part in _multipart_parts(answer.text) if part]
    assert payload == {"data": {"job": {"id": job_id}}}, payload
    # A mutation over GET is refused as over plain HTTP, on either stream.
    for accept in (only_multipart, {**SSE, **AUTH}):
        over_get = httpx.get(svc.http_url, params={"query": 'mutation { cancelJob(id: "x") { id } }'}, headers=accept)
        assert over_get.status_code == 405 and over_get.headers["allow"] == "POST", over_get.text
        assert over_get.json()["errors"][0]["extensions"]["code"] == "BAD_REQUEST"


def test_sse_events_end_with_two_newlines(svc: Service) -> None:
    """urql's fetchSubscriptions splits an event stream on "\\n\\n": events ended with
    "\\r\\n\\r\\n" were never found ([Network] No Content)."""
    job_id = _submit(svc)
    with httpx.stream(
        "POST", svc.http_url, json={"query": UPDATES, "variables": {"id": job_id}},
        headers={"accept": URQL_SUBSCRIPTION_ACCEPT, **AUTH}, timeout=30,
    ) as response:  # fmt: skip
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read().decode()
    assert "\r" not in body and body.endswith("\n\n"), body[-80:]
    events = [event for event in body.removesuffix("\n\n").split("\n\n") if not event.startswith(":")]
    assert events[-1] == "event: complete\ndata:", events
    updates = [json.loads(event.removeprefix("event: next\ndata: ")) for event in events[:-1]]
    assert updates[-1]["data"]["jobUpdates"]["stage"] == "DONE", updates


def test_a_stream_needs_the_api_key(svc: Service) -> None:
    refused = httpx.post(svc.http_url, json={"query": UPDATES, "variables": {"id": "x"}}, headers=SSE)
    assert refused.status_code == 401 and refused.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


def test_an_unknown_or_anothers_job_ends_the_stream_with_not_found(svc: Service) -> None:
    theirs = _submit(svc)
    for job_id, headers in (("no-such-job", AUTH), (theirs, {"authorization": "Bearer sk-other-tenant"})):
        body = httpx.post(
            svc.http_url, json={"query": UPDATES, "variables": {"id": job_id}}, headers={**SSE, **headers}, timeout=30
        ).text
        events = list(_sse_events(iter(body.splitlines())))
        [(kind, data), end] = events
        assert kind == "next" and data["errors"][0]["extensions"]["code"] == "NOT_FOUND", events
        assert end == ("complete", None)


def test_requests_refused_before_the_stream_opens(svc: Service) -> None:
    ambiguous = 'subscription A { jobUpdates(id: "x") { id } } subscription B { jobUpdates(id: "x") { id } }'
    answer = httpx.post(svc.http_url, json={"query": ambiguous}, headers={**SSE, **AUTH})
    assert answer.status_code == 400
    assert answer.json()["errors"][0]["extensions"]["code"] == "OPERATION_RESOLUTION_FAILURE"
    # Without a stream, a subscription is refused, not run as a query (a 200 with an internal error).
    plain = httpx.post(svc.http_url, json={"query": UPDATES, "variables": {"id": "x"}}, headers=AUTH)
    assert plain.status_code == 400 and "a subscription needs a stream" in plain.json()["errors"][0]["message"]
    mutation = 'mutation { cancelJob(id: "x") { id } }'
    refused = httpx.post(svc.http_url, json={"query": mutation}, headers={**MULTIPART, **AUTH})
    assert "errors" in refused.text and "cancelJob" not in refused.text.split("errors")[0]


def _open_streams(svc: Service) -> dict[str, float]:
    metrics = httpx.get(f"http://127.0.0.1:{svc.port}/metrics").text
    found = dict(re.findall(r'^gqls_http_subscription_streams\{transport="(\w+)"\} (\S+)$', metrics, re.MULTILINE))
    active = re.search(r"^gqls_active_subscriptions (\S+)$", metrics, re.MULTILINE)
    return {**{k: float(v) for k, v in found.items()}, "active": float(active[1]) if active else -1.0}


def test_a_client_that_goes_frees_its_subscription_at_once_and_the_tenant_bound_holds(svc: Service) -> None:
    parked = [_submit_parked(svc) for _ in range(3)]
    body = {"query": UPDATES, "variables": {"id": parked[0]}}
    with httpx.Client(timeout=30) as first, httpx.Client(timeout=30) as second:
        streams = [
            client.stream("POST", svc.http_url, json={**body, "variables": {"id": job}}, headers={**SSE, **AUTH})
            for client, job in ((first, parked[0]), (second, parked[1]))
        ]
        # Each stream's events, kept: an iterator that is dropped closes its response.
        events = [_sse_events(stream.__enter__().iter_lines()) for stream in streams]
        assert [next(e)[1]["data"]["jobUpdates"]["status"] for e in events] == ["QUEUED", "QUEUED"]  # live
        assert _open_streams(svc)["sse"] == 2
        # MAX_WATCHED_JOBS_PER_TENANT is 2: a third is refused, with the code.
        third = httpx.post(svc.http_url, json={**body, "variables": {"id": parked[2]}}, headers={**SSE, **AUTH})
        assert '"RATE_LIMITED"' in third.text
        for stream in streams:
            stream.__exit__(None, None, None)
    started = time.monotonic()
    wait_until(lambda: _open_streams(svc)["sse"] == 0 and _open_streams(svc)["active"] == 0, timeout_s=5,
               what="the streams to close")  # fmt: skip
    assert time.monotonic() - started < 2
    # ...and the tenant may watch two jobs again.
    again = httpx.post(svc.http_url, json={**body, "variables": {"id": "no-such-job"}}, headers={**SSE, **AUTH})
    assert '"NOT_FOUND"' in again.text


def _submit_parked(svc: Service) -> str:
    """A job no worker takes (a queue nobody serves): its subscription stays open."""
    from redis import Redis

    from gql_service import store
    from gql_service.models import JobRecord

    redis = Redis.from_url(svc.env["REDIS_URL"])
    record = JobRecord(id=f"parked-{time.monotonic_ns()}", tenant="acme")
    with redis.pipeline() as pipe:
        store.create_job(pipe, record, text="parked", ttl_s=600)
        pipe.execute()
    redis.close()
    return record.id


def test_what_needs_no_stream_is_answered_in_json_when_the_client_takes_json(svc: Service) -> None:
    """urql's fetchExchange names event streams and multipart beside JSON in every request's
    Accept: its mutations and queries get plain JSON (it failed on an event stream); only a
    client that takes nothing but a stream (graphql-sse's) gets one."""
    urqls_accept = (
        "application/graphql-response+json, application/graphql+json, application/json, text/event-stream, "
        "multipart/mixed"
    )
    answer = httpx.post(svc.http_url, json={"query": SUBMIT, "variables": {"text": TEXT}},
                        headers={"accept": urqls_accept, **AUTH})  # fmt: skip
    assert answer.headers["content-type"].startswith("application/graphql-response+json"), answer.headers
    assert answer.json()["data"]["submitText"]["job"]["id"]
    streamed = httpx.post(svc.http_url, json={"query": SUBMIT, "variables": {"text": TEXT}}, headers={**SSE, **AUTH})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    [(kind, data), end] = list(_sse_events(iter(streamed.text.splitlines())))
    assert kind == "next" and data["data"]["submitText"]["job"]["id"] and end == ("complete", None)


# graphql-sse's single connection mode: a reserved stream, operations by POST with its token.
TOKEN = "x-graphql-event-stream-token"
OTHER_TENANT = {"authorization": "Bearer sk-other-tenant"}


def _reserve(svc: Service, headers: dict[str, str] = AUTH) -> str:
    answer = httpx.put(svc.http_url, headers=headers)
    assert answer.status_code == 201 and answer.headers["content-type"].startswith("text/plain"), answer.text
    return answer.text


def _operation(
    svc: Service, token: str, op_id: str | None, query: str, headers: dict[str, str] = AUTH, **variables: Any
) -> httpx.Response:
    extensions = {"operationId": op_id} if op_id is not None else {}
    body = {"query": query, "variables": variables, "extensions": extensions}
    return httpx.post(svc.http_url, json=body, headers={TOKEN: token, **headers})


def test_single_connection_mode_carries_every_operation_on_one_reserved_stream(svc: Service) -> None:
    """graphql-sse's single connection mode answered 405 to its reservation (a PUT)."""
    job_id = _submit(svc)
    token = _reserve(svc)
    with httpx.stream("GET", svc.http_url, headers={**SSE, **AUTH, TOKEN: token}, timeout=30) as stream:
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(stream.iter_lines())
        assert _operation(svc, token, "follow", UPDATES, id=job_id).status_code == 202
        assert _operation(svc, token, "read", "query($id: ID!) { job(id: $id) { id } }", id=job_id).status_code == 202
        seen: dict[str, list[Any]] = {"follow": [], "read": []}
        ended: list[str] = []
        while len(ended) < 2:
            kind, data = next(events)
            if kind == "next":
                seen[data["id"]].append(data["payload"])
            else:
                assert kind == "complete" and set(data) == {"id"}, (kind, data)
                ended.append(data["id"])
    assert sorted(ended) == ["follow", "read"] and seen["read"] == [{"data": {"job": {"id": job_id}}}], seen
    updates = [payload["data"]["jobUpdates"] for payload in seen["follow"]]
    versions = [u["version"] for u in updates]  # the snapshot first, then each newer version
    assert versions == sorted(set(versions)) and updates[-1]["stage"] == "DONE", updates
    # The stream is gone with its client: so is the token.
    gone = _operation(svc, token, "late", UPDATES, id=job_id)
    assert gone.status_code == 404 and gone.json()["errors"][0]["extensions"]["code"] == "NOT_FOUND"


def test_single_connection_mode_refuses_what_the_protocol_does_not_allow(svc: Service) -> None:
    token = _reserve(svc)
    # The token is its tenant's: to another, and to a made-up one, no such stream.
    for headers, given in ((OTHER_TENANT, token), (AUTH, "made-up")):
        answer = _operation(svc, given, "x", UPDATES, headers=headers, id="x")
        assert answer.status_code == 404 and answer.json()["errors"][0]["extensions"]["code"] == "NOT_FOUND"
        assert httpx.get(svc.http_url, headers={**SSE, **headers, TOKEN: given}).status_code == 404
    assert httpx.put(svc.http_url).status_code == 401  # a reservation needs the API key too
    assert httpx.get(svc.http_url, headers={**AUTH, TOKEN: token}).status_code == 406  # not an event stream
    with httpx.stream("GET", svc.http_url, headers={**SSE, **AUTH, TOKEN: token}, timeout=30) as stream:
        assert stream.status_code == 200
        again = httpx.get(svc.http_url, headers={**SSE, **AUTH, TOKEN: token})
        assert again.status_code == 409  # one stream per reservation, ever
        assert _operation(svc, token, None, UPDATES, id="x").status_code == 400  # no operationId
        ambiguous = 'query A { job(id: "x") { id } } query B { job(id: "x") { id } }'
        answer = _operation(svc, token, "x", ambiguous)
        assert answer.json()["errors"][0]["extensions"]["code"] == "OPERATION_RESOLUTION_FAILURE"
        # Two operations at most on one stream (MAX_SUBSCRIPTIONS_PER_CONNECTION), ids unique.
        parked = [_submit_parked(svc), _submit_parked(svc)]
        assert _operation(svc, token, "a", UPDATES, id=parked[0]).status_code == 202
        assert _operation(svc, token, "a", UPDATES, id=parked[1]).status_code == 409
        assert _operation(svc, token, "b", UPDATES, id=parked[1]).status_code == 202
        third = _operation(svc, token, "c", UPDATES, id=parked[1])
        assert third.status_code == 429 and third.json()["errors"][0]["extensions"]["code"] == "RATE_LIMITED"
    wait_until(lambda: _open_streams(svc)["active"] == 0, timeout_s=5, what="the closed stream's operations to end")


def test_single_connection_operations_stop_on_delete_and_with_their_stream(svc: Service) -> None:
    parked = [_submit_parked(svc), _submit_parked(svc)]
    token = _reserve(svc)
    with httpx.stream("GET", svc.http_url, headers={**SSE, **AUTH, TOKEN: token}, timeout=30) as stream:
        events = _sse_events(stream.iter_lines())
        for op_id, job_id in zip(("a", "b"), parked, strict=True):
            assert _operation(svc, token, op_id, UPDATES, id=job_id).status_code == 202
        firsts = [next(events)[1] for _ in parked]  # each one's snapshot: both are live
        assert sorted(first["id"] for first in firsts) == ["a", "b"]
        assert _open_streams(svc)["sse"] == 2 and _open_streams(svc)["active"] == 2
        stop = httpx.delete(svc.http_url, params={"operationId": "a"}, headers={**AUTH, TOKEN: token})
        assert stop.status_code == 200
        wait_until(lambda: _open_streams(svc)["active"] == 1, timeout_s=5, what="the stopped operation to end")
    # The client went: its other operation ends at once, and its tenant may watch two again.
    wait_until(lambda: _open_streams(svc)["active"] == 0 and _open_streams(svc)["sse"] == 0, timeout_s=5,
               what="the stream's operations to end")  # fmt: skip


def test_reservations_are_bounded_per_tenant(svc: Service) -> None:
    tokens = [_reserve(svc, OTHER_TENANT), _reserve(svc, OTHER_TENANT)]  # MAX_SSE_RESERVATIONS_PER_TENANT is 2
    refused = httpx.put(svc.http_url, headers=OTHER_TENANT)
    assert refused.status_code == 429 and refused.json()["errors"][0]["extensions"]["code"] == "RATE_LIMITED"
    assert httpx.put(svc.http_url, headers=AUTH).status_code == 201  # another tenant's bound is its own
    for token in tokens:  # a stream opened and closed gives its reservation back
        with httpx.stream("GET", svc.http_url, headers={**SSE, **OTHER_TENANT, TOKEN: token}) as stream:
            assert stream.status_code == 200
    wait_until(lambda: httpx.put(svc.http_url, headers=OTHER_TENANT).status_code == 201, timeout_s=5,
               what="a closed stream's reservation to be given back")  # fmt: skip
