"""Limits on LLM calls shared through Redis by every worker process: real worker pools
against the OpenAI-compatible stub, which counts the calls open at once and when each came."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator

import httpx
import pytest
from redis.asyncio import Redis as AsyncRedis

from gql_service import keys
from gql_service.worker.llm import rate_headers
from gql_service.worker.provider_limits import ProviderLimits

from .clients import follow, submit
from .openai_stub import Fault, OpenAIStub
from .service import Service, wait_until
from .test_observability import metric


@pytest.fixture
def slow_stub(stub: OpenAIStub) -> Iterator[OpenAIStub]:
    stub.latency_s = 0.3
    yield stub
    stub.latency_s = 0.0


async def test_llm_max_in_flight_holds_across_worker_processes(e2e_redis: str, slow_stub: OpenAIStub) -> None:
    """Two async worker processes of 64 jobs each: 128 could call at once; 10 may."""
    # The stub holds the first calls until ten are open: a busy machine sends the granted
    # calls with delays of its own (seven open at most, once on CI, with no hold), and a
    # limiter that granted fewer than ten would leave them held until the client's timeout.
    slow_stub.hold_until_open = 10
    env = {**slow_stub.env, "RQ_QUEUE": "llm-in-flight", "LLM_MAX_IN_FLIGHT": "10", "LLM_TIMEOUT_S": "10"}
    with Service(e2e_redis, workers=1, env={**env, "WORKER_CONCURRENCY": "64"}) as svc:
        svc.start_worker(1)
        job_ids = [submit(svc) for _ in range(60)]
        finals = [events[-1] for events in await asyncio.gather(*(follow(svc, job_id) for job_id in job_ids))]
        waited = metric(httpx.get(f"http://127.0.0.1:{svc.port}/metrics").text, "gqls_llm_limit_wait_seconds_total")
    assert [(f["status"], f["attempts"]) for f in finals] == [("FINISHED", 1)] * 60
    assert slow_stub.most_open_calls == 10, slow_stub.most_open_calls
    assert waited > 0  # calls did wait for a slot


async def test_a_429_with_retry_after_pauses_every_worker(e2e_redis: str, stub: OpenAIStub) -> None:
    """Retry-After: 2 on one call: no worker calls for 2 s, then all carry on; no job is
    RETRYING or FAILED for it, and waiting spent no attempt."""
    stub.script(Fault.rate_limited("2"))
    with Service(e2e_redis, workers=4, env={**stub.env, "RQ_QUEUE": "llm-pause", "LLM_TIMEOUT_S": "10"}) as svc:
        metrics = f"http://127.0.0.1:{svc.port}/metrics"
        before = metric(httpx.get(metrics).text, "gqls_llm_pauses_total")  # the tests share one Redis
        job_ids = [submit(svc)]  # its call is answered 429
        # The other seven come once the pause is on record, so every call they make starts
        # within it: none may reach the provider before it ends. (Submitted together, a call
        # granted just before the pause reached the stub 0.3 s after the 429 on a busy machine.)
        wait_until(lambda: metric(httpx.get(metrics).text, "gqls_llm_pauses_total") > before, what="the pause")
        job_ids += [submit(svc) for _ in range(7)]
        all_events = await asyncio.gather(*(follow(svc, job_id) for job_id in job_ids))
        text = httpx.get(metrics).text
    assert [(e[-1]["status"], e[-1]["attempts"]) for e in all_events] == [("FINISHED", 1)] * 8
    assert not any(event["status"] == "RETRYING" for events in all_events for event in events)
    paused_at = stub.arrivals[0]  # the call answered 429
    early = [round(t - paused_at, 2) for t in stub.arrivals[1:] if t - paused_at < 1.95]
    assert early == [], f"calls made during the pause, at {early}"
    assert len(stub.arrivals) == 9
    assert metric(text, "gqls_llm_rate_limited_total") >= 1
    assert metric(text, "gqls_llm_limit_wait_seconds_total") >= 1.5  # the calls held back by the pause


async def test_calls_waiting_for_a_slot_when_a_pause_begins_wait_for_its_end(e2e_redis: str, stub: OpenAIStub) -> None:
    """LLM_MAX_IN_FLIGHT=10, two worker processes, 60 queued jobs, one 429 with Retry-After: 3.
    Calls that were already waiting for a slot when the pause began went out as slots freed:
    50 calls reached the provider in the next 2.5 s. Now only those already on the wire may."""
    stub.latency_s = 0.3
    # Answered at once while the nine other calls in flight hold their slots for 0.3 s: the
    # slots they free during the pause are what the calls waiting for one took.
    stub.script(*[Fault.ok()] * 15, Fault.rate_limited("3", at_once=True))
    env = {**stub.env, "RQ_QUEUE": "llm-pause-slots", "LLM_MAX_IN_FLIGHT": "10", "LLM_TIMEOUT_S": "10"}
    with Service(e2e_redis, workers=0, env={**env, "WORKER_CONCURRENCY": "64"}) as svc:
        job_ids = [submit(svc) for _ in range(60)]
        svc.start_worker(2)  # all 60 queued: ten calls go, fifty wait for a slot
        finals = [events[-1] for events in await asyncio.gather(*(follow(svc, job_id) for job_id in job_ids))]
    assert [(f["status"], f["attempts"]) for f in finals] == [("FINISHED", 1)] * 60
    limited = stub.arrivals[15]  # the call answered 429 at once
    after = [round(t - limited, 2) for t in stub.arrivals[16:] if t - limited < 2.5]
    # Only calls that took a slot before the 429's answer was written down as a pause may
    # come (0.2 s is ample for the worker to write it): none of those waiting for a slot.
    assert all(t < 0.2 for t in after), f"calls during the pause, at {after}"


SPENT = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s",
         "x-ratelimit-remaining-tokens": "39000", "x-ratelimit-reset-tokens": "120ms"}  # fmt: skip


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_rate_headers_saying_the_budget_is_spent_pause_every_worker_before_any_429(
    e2e_redis: str, stub: OpenAIStub, stream: bool
) -> None:
    """`x-ratelimit-remaining-requests: 0`, reset in 2 s, on one answer: no call in those 2 s."""
    stub.script(Fault.ok(headers=SPENT))
    env = {**stub.env, "RQ_QUEUE": f"llm-spent-{stream}", "LLM_STREAM": str(stream).lower()}
    with Service(e2e_redis, workers=4, env=env) as svc:
        metrics = f"http://127.0.0.1:{svc.port}/metrics"
        before = metric(httpx.get(metrics).text, "gqls_llm_pauses_total")  # the tests share one Redis
        job_ids = [submit(svc)]
        wait_until(lambda: metric(httpx.get(metrics).text, "gqls_llm_pauses_total") > before, what="the pause")
        job_ids += [submit(svc) for _ in range(5)]
        all_events = await asyncio.gather(*(follow(svc, job_id) for job_id in job_ids))
    assert [(e[-1]["status"], e[-1]["attempts"]) for e in all_events] == [("FINISHED", 1)] * 6
    spent_at = stub.arrivals[0]
    early = [round(t - spent_at, 2) for t in stub.arrivals[1:] if t - spent_at < 1.95]
    assert early == [] and len(stub.arrivals) == 6, f"calls before the budget's reset, at {early}"


@pytest.mark.parametrize(
    "headers",
    [
        {"x-ratelimit-remaining-requests": "-3", "x-ratelimit-reset-requests": "2s"},
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "soon"},
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "-2s"},
        {"x-ratelimit-remaining-requests": "0"},
        {"x-ratelimit-remaining-tokens": "zero", "x-ratelimit-reset-tokens": "1m"},
    ],
    ids=["negative", "unreadable-reset", "negative-reset", "no-reset", "unreadable-remaining"],
)
def test_rate_headers_that_make_no_sense_change_nothing(headers: dict[str, str]) -> None:
    assert rate_headers.spent_for_s(headers) is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("2s", 2.0), ("6m0s", 360.0), ("1h2m3.5s", 3723.5), ("20ms", 0.02), ("2.5", 2.5), ("1m30s", 90.0)],
)
def test_reset_durations_as_providers_write_them(value: str, seconds: float) -> None:
    assert rate_headers.duration_s(value) == pytest.approx(seconds)
    assert rate_headers.spent_for_s({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": value}) == (
        pytest.approx(seconds)
    )


async def test_llm_rpm_spreads_the_calls_and_the_provider_never_says_429(e2e_redis: str, stub: OpenAIStub) -> None:
    """LLM_RPM=120 over two async worker processes: never more than 2 calls in a second
    (the minute's budget, spread), so a provider enforcing the same 120/min never refuses."""
    stub.enforce_rpm = 120
    env = {**stub.env, "RQ_QUEUE": "llm-rpm", "LLM_RPM": "120", "LLM_TIMEOUT_S": "10"}
    with Service(e2e_redis, workers=1, env=env) as svc:
        svc.start_worker(1)
        job_ids = [submit(svc) for _ in range(12)]
        finals = [events[-1] for events in await asyncio.gather(*(follow(svc, job_id) for job_id in job_ids))]
        waited = metric(httpx.get(f"http://127.0.0.1:{svc.port}/metrics").text, "gqls_llm_limit_wait_seconds_total")
    assert [(f["status"], f["attempts"]) for f in finals] == [("FINISHED", 1)] * 12
    assert stub.over_limit == 0 and len(stub.arrivals) == 12
    # Any five calls span at least two seconds, less half a second: the stub sees each call
    # some time after its slot was granted, and on a busy machine that delay varies by a
    # few hundred ms (0.83 s for three calls, once on CI). A burst lands within ~0.1 s; 3 a
    # second would span 1.33 s.
    assert min(later - first for first, later in zip(stub.arrivals, stub.arrivals[4:], strict=False)) > 1.5
    assert waited > 5  # twelve calls at two a second: most of them waited


async def _waits(call: Awaitable[float], seconds: float = 0.5) -> bool:
    """Whether `call` is still waiting for the budget after `seconds` (the window is 61 s)."""
    try:
        async with asyncio.timeout(seconds):
            await call
    except TimeoutError:
        return True
    return False


async def test_llm_tpm_holds_a_call_the_minute_cannot_afford_and_charges_what_was_used(async_redis: AsyncRedis) -> None:
    def limits(endpoint: str) -> ProviderLimits:
        return ProviderLimits(async_redis, endpoint=endpoint, max_in_flight=None, call_timeout_s=5, tpm=1000)

    spent = limits("tpm-spent")
    assert await spent.take_budget(600) < 0.5
    assert await _waits(spent.take_budget(600))  # 1,200 tokens would exceed the minute's 1,000
    # Estimated 300, used 900: the 600 more are charged, and a 200-token call no longer fits.
    charged, control = limits("tpm-charged"), limits("tpm-control")
    for budget in (charged, control):
        await budget.take_budget(300)
    await charged.charge_tokens(300, 900)
    assert await _waits(charged.take_budget(200))
    assert not await _waits(control.take_budget(200))


async def test_a_pause_is_only_ever_extended_even_by_concurrent_429s(async_redis: AsyncRedis) -> None:
    """Many workers answered 429 at once, with short and long Retry-After: the longest wins.
    (Read-then-set in two round trips let a short one overwrite a long one.)"""
    limits = [
        ProviderLimits(async_redis, endpoint="pause-race", max_in_flight=None, call_timeout_s=5) for _ in range(2)
    ]
    for _ in range(20):
        await async_redis.delete(keys.llm_paused("pause-race"))
        await asyncio.gather(*(limits[n % 2].pause(30.0 if n % 2 else 1.0) for n in range(40)))
        assert await async_redis.pttl(keys.llm_paused("pause-race")) > 20_000
