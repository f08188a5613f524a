"""GraphQL clients for the end-to-end tests: httpx for HTTP, gql for subscriptions."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from gql import Client, GraphQLRequest, gql
from gql.transport.websockets import WebsocketsTransport

from .service import Service

TRANSPORT_WS = WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL
LEGACY_WS = WebsocketsTransport.APOLLO_SUBPROTOCOL

SUBMIT = "mutation($text: String!) { submitText(input: {text: $text}) { job { id status version requestId } } }"
UPDATES = gql(
    """subscription($id: ID!) {
      jobUpdates(id: $id) {
        id status stage version attempts model
        result { summary sentiment tags entities { type value confidence } language toxicityScore }
        error { code message retryable }
        usage { promptTokens completionTokens totalTokens }
      }
    }"""
)
SUBMIT_WITH_KEY = """mutation($text: String!, $key: String) {
  submitText(input: {text: $text, idempotencyKey: $key}) { job { id } deduplicated }
}"""
TEXT = "I loved the clinic. Dr. Rao was kind. Waiting time was 10 minutes at Springfield General Hospital in Boston."


def post(svc: Service, query: str, headers: dict[str, str] | None = None, **variables: Any) -> httpx.Response:
    return httpx.post(svc.http_url, json={"query": query, "variables": variables}, headers=headers or {}, timeout=10)


def submit(svc: Service, text: str = TEXT, headers: dict[str, str] | None = None) -> str:
    body = post(svc, SUBMIT, headers=headers, text=text).json()
    assert "errors" not in body, body
    return str(body["data"]["submitText"]["job"]["id"])


SUBMIT_MANY = "mutation($inputs: [SubmitTextInput!]!) { submitTexts(inputs: $inputs) { job { id } } }"


def submit_many(
    svc: Service, n: int, headers: dict[str, str] | None = None, *, priority: str | None = None
) -> list[str]:
    """`n` jobs, in submitTexts calls of 100; their ids in order."""
    ids: list[str] = []
    for start in range(0, n, 100):
        inputs: list[dict[str, Any]] = [
            {"text": f"{TEXT} ({priority or ''} {i})"} for i in range(start, min(n, start + 100))
        ]
        if priority is not None:
            inputs = [{**item, "priority": priority} for item in inputs]
        body = post(svc, SUBMIT_MANY, headers=headers, inputs=inputs).json()
        assert "errors" not in body, body
        ids += [answer["job"]["id"] for answer in body["data"]["submitTexts"]]
    return ids


# A guard against a hang, not a speed check: a worker process started while the whole suite
# runs beside it took 30 s to import and take its first job on a 2-core CI machine.
FOLLOW_GUARD_S = 90


async def follow(
    svc: Service,
    job_id: str,
    protocol: str = TRANSPORT_WS,
    first_seen: asyncio.Event | None = None,
    *,
    until_stage: str | None = None,
    params: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Every jobUpdates event until completion; with `until_stage`, `first_seen` is set
    when that stage arrives instead of on the first event."""
    transport = WebsocketsTransport(url=svc.ws_url, subprotocols=[protocol], init_payload=params or {})
    events = []
    async with asyncio.timeout(FOLLOW_GUARD_S), Client(transport=transport) as session:
        async for data in session.subscribe(GraphQLRequest(UPDATES, variable_values={"id": job_id})):
            events.append(data["jobUpdates"])
            if first_seen is not None and (until_stage is None or events[-1]["stage"] == until_stage):
                first_seen.set()
    return events


@dataclass
class SteadySubmitter:
    """Submits jobs one after the other, as a client would, noting each outcome."""

    svc: Service
    ok: list[tuple[float, str]] = field(default_factory=list)
    failed: list[tuple[float, str, str]] = field(default_factory=list)  # (when, code, message)
    stop: threading.Event = field(default_factory=threading.Event)
    interval_s: float = 0.02
    _thread: threading.Thread | None = None

    def start(self) -> SteadySubmitter:
        self._thread = threading.Thread(target=self.run, name="steady-submitter", daemon=True)
        self._thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(15)

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                payload = {"query": SUBMIT_WITH_KEY, "variables": {"text": f"{TEXT} ({n})"}}
                try:
                    body = client.post(self.svc.http_url, json=payload).json()
                except httpx.HTTPError as exc:  # the API itself is away
                    self.failed.append((time.monotonic(), "HTTP", str(exc)))
                else:
                    now = time.monotonic()
                    if body.get("errors"):
                        error = body["errors"][0]
                        self.failed.append((now, error.get("extensions", {}).get("code", "?"), error["message"]))
                    else:
                        self.ok.append((now, body["data"]["submitText"]["job"]["id"]))
                time.sleep(self.interval_s)
