"""Streamed partial results end to end: real uvicorn, a real RQ worker process with the real
`openai` SDK streaming from the loopback stub, and gql's clients on both websocket protocols."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from gql import Client, GraphQLRequest, gql
from gql.transport.websockets import WebsocketsTransport

from .clients import LEGACY_WS, TRANSPORT_WS, submit
from .openai_stub import VALID_EXTRACTION, Fault, OpenAIStub
from .service import Service

JOB_FIELDS = """id status stage version attempts
  result { summary sentiment tags entities { type value confidence } language toxicityScore }
  error { code message retryable } usage { totalTokens }
  partial { summary sentiment tags entities { type value confidence } language toxicityScore }
  partialSeq"""
FOLLOW = gql(
    f"subscription($id: ID!, $partial: Boolean) {{ jobUpdates(id: $id, partial: $partial) {{ {JOB_FIELDS} }} }}"
)
FOLLOW_MANY = gql(
    f"subscription($ids: [ID!]!, $partial: Boolean) {{ jobsUpdates(ids: $ids, partial: $partial) {{ {JOB_FIELDS} }} }}"
)


@pytest.fixture(scope="module")
def llm_service(e2e_redis: str, openai_stub: OpenAIStub) -> Iterator[Service]:
    env = {**openai_stub.env, "RQ_QUEUE": "llm-partials", "LLM_MAX_ATTEMPTS": "2"}
    with Service(e2e_redis, workers=1, env=env) as svc:
        yield svc


async def subscribe(
    svc: Service, ids: list[str], *, partial: bool, protocol: str = TRANSPORT_WS, seen: asyncio.Event | None = None
) -> list[dict[str, Any]]:
    """Every frame until the subscription completes; `seen` is set at the first one."""
    transport = WebsocketsTransport(url=svc.ws_url, subprotocols=[protocol])
    one = len(ids) == 1
    request = (
        GraphQLRequest(FOLLOW, variable_values={"id": ids[0], "partial": partial})
        if one
        else GraphQLRequest(FOLLOW_MANY, variable_values={"ids": ids, "partial": partial})
    )
    frames = []
    async with asyncio.timeout(60), Client(transport=transport) as session:
        async for data in session.subscribe(request):
            frames.append(data["jobUpdates" if one else "jobsUpdates"])
            if seen is not None:
                seen.set()
    return frames


def interim(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if f["partial"] is not None]


@pytest.mark.parametrize("protocol", [TRANSPORT_WS, LEGACY_WS])
async def test_a_partial_subscriber_watches_the_summary_grow_and_others_see_what_they_always_did(
    llm_service: Service, stub: OpenAIStub, protocol: str
) -> None:
    # 4 s of answer: subscribing takes a while when the machine is busy (the suite's other
    # file runs beside this one), and the frames it sees are those still to come.
    stub.stream_chunks, stub.stream_seconds = 60, 4.0
    job_id = submit(llm_service)
    watching, plain = await asyncio.gather(
        subscribe(llm_service, [job_id], partial=True, protocol=protocol),
        subscribe(llm_service, [job_id], partial=False, protocol=protocol),
    )
    frames = interim(watching)
    assert len(frames) >= 3, watching
    summaries = [f["partial"]["summary"] or "" for f in frames]
    assert all(a == b[: len(a)] for a, b in zip(summaries, summaries[1:], strict=False)), summaries
    assert len(set(summaries)) >= 3, summaries
    assert all(f["stage"] == "CALLING_LLM" and f["partialSeq"] is not None for f in frames)
    order = [(f["version"], f["partialSeq"] or 0) for f in watching]
    assert order == sorted(order)
    done = watching[-1]
    assert (done["status"], done["stage"], done["partial"], done["partialSeq"]) == ("FINISHED", "DONE", None, None)
    assert done["result"]["summary"] == VALID_EXTRACTION["summary"] and done["usage"]["totalTokens"] == 150
    # Without the flag: one frame per version, as before, and the same final frame.
    assert interim(plain) == [] and all(f["partialSeq"] is None for f in plain)
    versions = [f["version"] for f in plain]
    assert versions == sorted(set(versions))
    records = [f for f in watching if f["partial"] is None]  # both subscribed about when the job began
    first = max(records[0]["version"], plain[0]["version"])
    assert [f for f in records if f["version"] >= first] == [f for f in plain if f["version"] >= first]


async def test_a_late_partial_subscriber_gets_the_latest_frame_right_after_the_snapshot(
    llm_service: Service, stub: OpenAIStub
) -> None:
    stub.stream_chunks, stub.stream_seconds = 60, 4.0
    job_id = submit(llm_service)
    calling = asyncio.Event()

    async def until_calling() -> list[dict[str, Any]]:
        # A plain subscriber tells when the call has begun (nobody wanted frames then).
        transport = WebsocketsTransport(url=llm_service.ws_url, subprotocols=[TRANSPORT_WS])
        seen = []
        async with asyncio.timeout(60), Client(transport=transport) as session:
            async for data in session.subscribe(GraphQLRequest(FOLLOW, variable_values={"id": job_id})):
                seen.append(data["jobUpdates"])
                if seen[-1]["stage"] == "CALLING_LLM":
                    calling.set()
        return seen

    plain = asyncio.create_task(until_calling())
    await asyncio.wait_for(calling.wait(), 30)
    late = await subscribe(llm_service, [job_id], partial=True)
    await plain
    snapshot, first = late[0], late[1]
    assert snapshot["stage"] == "CALLING_LLM" and snapshot["partial"] is None
    assert first["partial"] is not None and first["version"] == snapshot["version"], late[:3]
    assert first["partial"]["summary"], first
    assert late[-1]["stage"] == "DONE"


async def test_many_jobs_over_one_subscription_each_with_its_own_frames(llm_service: Service, stub: OpenAIStub) -> None:
    stub.stream_chunks, stub.stream_seconds = 40, 1.0
    ids = [submit(llm_service, f"Text number {i}: Dr. Rao was kind.") for i in range(3)]
    frames = await subscribe(llm_service, ids, partial=True, protocol=LEGACY_WS)
    for job_id in ids:
        mine = [f for f in frames if f["id"] == job_id]
        assert mine[-1]["stage"] == "DONE"
        order = [(f["version"], f["partialSeq"] or 0) for f in mine]
        assert order == sorted(order)
    assert {f["id"] for f in interim(frames)} <= set(ids) and interim(frames)


async def test_a_stream_cut_midway_retries_then_finishes(llm_service: Service, stub: OpenAIStub) -> None:
    stub.script(Fault.cut(after_chunks=3))
    frames = await subscribe(llm_service, [submit(llm_service)], partial=True)
    statuses = [(f["status"], f["stage"]) for f in frames if f["partial"] is None]
    assert ("RETRYING", "QUEUED") in statuses and statuses[-1] == ("FINISHED", "DONE"), frames
    retrying = next(f for f in frames if f["status"] == "RETRYING")
    assert retrying["error"]["code"] == "PROVIDER_ERROR" and "broke off" in retrying["error"]["message"]
    assert frames[-1]["attempts"] == 2 and len(stub.requests) == 2


@pytest.mark.parametrize(("fault", "code"), [(Fault.refusal(), "REFUSED"), (Fault.truncated(), "TRUNCATED")])
async def test_a_streamed_refusal_or_truncation_fails_the_job_as_before(
    llm_service: Service, stub: OpenAIStub, fault: Fault, code: str
) -> None:
    stub.script(fault)
    frames = await subscribe(llm_service, [submit(llm_service)], partial=True)
    final = frames[-1]
    assert (final["status"], final["stage"], final["error"]["code"]) == ("FAILED", "FAILED", code)
    assert final["usage"]["totalTokens"] == 150  # from the stream's usage chunk
    assert stub.requests[-1]["stream"] is True and len(stub.requests) == 1
    assert interim(frames) == [] or all(f["stage"] == "CALLING_LLM" for f in interim(frames))
