"""LLM_FALLBACKS and the circuit breaker: real worker processes against two OpenAI-compatible
stubs (a primary and a fallback) that count the calls each gets, a real OTLP receiver, and
the breaker's steps against the tests' real Redis."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis as AsyncRedis

from gql_service import keys
from gql_service.models import JobErrorCode
from gql_service.settings import load_settings
from gql_service.worker.breaker import Breaker, BreakerOpen
from gql_service.worker.fallbacks import routes
from gql_service.worker.llm import LLMError
from gql_service.worker.llm.offline import OfflineProvider
from gql_service.worker.provider_limits import ProviderLimits

from .clients import follow, submit
from .openai_stub import Fault, OpenAIStub
from .otlp_receiver import OtlpReceiver, ReceivedSpan, service_env
from .service import Service, wait_until
from .test_cli import run_cli
from .test_observability import metric


@pytest.fixture(scope="module")
def second_stub() -> Iterator[OpenAIStub]:
    stub = OpenAIStub().start()
    yield stub
    stub.stop()


@pytest.fixture
def fallback(second_stub: OpenAIStub) -> OpenAIStub:
    second_stub.reset()
    return second_stub


def fallback_env(primary: OpenAIStub, fallback: OpenAIStub, primary_model: str) -> dict[str, str]:
    entry = {"model": "fallback-model", "baseUrl": fallback.base_url, "apiKeyEnv": "FALLBACK_KEY"}
    return {**primary.env, "OPENAI_MODEL": primary_model, "FALLBACK_KEY": "sk-fallback",
            "LLM_FALLBACKS": json.dumps([entry])}  # fmt: skip


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("[{model: x}]", "not JSON"),
        ('[{"baseUrl": "http://127.0.0.1:9/v1"}]', "entry 0 needs a model"),
        ('[{"model": "m", "apiKeyEnv": "GQLS_NO_SUCH_KEY"}]', "'GQLS_NO_SUCH_KEY', which is not set"),
    ],
    ids=["not-json", "no-model", "unset-key"],
)
def test_a_bad_llm_fallbacks_is_one_line_at_start_up(tmp_path: Path, value: str, says: str) -> None:
    result = run_cli("worker", env={"LLM_FALLBACKS": value, "OPENAI_API_KEY": "sk-x"}, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("gql-service: bad setting: LLM_FALLBACKS:") and says in lines[0], lines


def test_each_endpoint_has_limits_of_its_own() -> None:
    settings = load_settings(
        _env_file=None, llm_max_in_flight=10, llm_rpm=600, openai_api_key="sk-x",
        llm_fallbacks='[{"model": "a"}, {"model": "b", "maxInFlight": 3, "tpm": 9000}]',
    )  # fmt: skip
    primary = OfflineProvider()
    others = (OfflineProvider(), OfflineProvider())
    got = routes(AsyncRedis(), settings, primary, others)
    assert [(r.limits.max_in_flight, r.limits.rpm, r.limits.tpm) for r in got if r.limits] == [
        (10, 600, None), (10, 600, None), (3, 600, 9000),
    ]  # fmt: skip
    assert all(r.limits and r.limits.breaker == Breaker(5, 30.0) for r in got)
    # Nowhere else to go: no breaker.
    [alone] = routes(AsyncRedis(), load_settings(_env_file=None, llm_max_in_flight=10), primary, ())
    assert alone.limits is not None and alone.limits.breaker is None


def _chats(spans: list[ReceivedSpan], job_span: ReceivedSpan) -> list[ReceivedSpan]:
    return [s for s in spans if s.name.startswith("chat ") and s.parent_span_id == job_span.span_id]


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_a_failing_primary_falls_over_within_the_attempt_and_the_spans_say_so(
    e2e_redis: str, stub: OpenAIStub, fallback: OpenAIStub, stream: bool
) -> None:
    stub.script(Fault.http(503))
    with OtlpReceiver() as receiver:
        env = {**fallback_env(stub, fallback, f"primary-traced-{stream}"), **service_env(receiver),
               "RQ_QUEUE": f"llm-fallback-{stream}", "LLM_STREAM": str(stream).lower()}  # fmt: skip
        with Service(e2e_redis, workers=1, env=env) as svc:
            job_id = submit(svc)
            events = await follow(svc, job_id)

            def attempt(spans: list[ReceivedSpan]) -> ReceivedSpan | None:
                job = [s for s in spans if s.name == "job extract" and s.attributes.get("gqls.job.id") == job_id]
                return job[0] if job and len(_chats(spans, job[0])) == 2 else None

            spans = receiver.wait_for(lambda got: attempt(got) is not None, what="the attempt and its two calls")
            url = f"http://127.0.0.1:{svc.port}/metrics"
            # Written at the attempt's very end, after its span.
            mine = f'model="primary-traced-{stream}"'  # this test's primary: the tests share one Redis
            wait_until(lambda: mine in httpx.get(url).text, what="the attempt's metrics")
            text = httpx.get(url).text
    final = events[-1]
    assert (final["status"], final["attempts"], final["model"]) == ("FINISHED", 1, "fallback-model")
    assert not any(e["status"] == "RETRYING" for e in events)
    assert len(stub.requests) == 1 and len(fallback.requests) == 1
    assert bool(fallback.requests[0].get("stream")) is stream
    job_span = attempt(spans)
    assert job_span is not None
    failed, answered = sorted(_chats(spans, job_span), key=lambda s: s.start_ns)
    assert failed.name == f"chat primary-traced-{stream}" and failed.attributes["error.type"] == "PROVIDER_ERROR"
    assert answered.name == "chat fallback-model" and "error.type" not in answered.attributes
    assert answered.attributes["gen_ai.response.model"] == "fallback-model"
    [(_, fell)] = [(name, attrs) for name, attrs in job_span.events if name == "llm.fallback"]
    assert (fell["gqls.llm.from"], fell["gqls.llm.to"]) == (f"primary-traced-{stream}", "fallback-model")
    assert "503" in fell["gqls.reason"]
    primary = {"base_url": stub.base_url, "model": f"primary-traced-{stream}"}
    assert metric(text, "gqls_llm_provider_failures_total", **primary) >= 1
    assert metric(text, "gqls_llm_provider_calls_total", base_url=fallback.base_url, model="fallback-model") >= 1
    assert metric(text, "gqls_llm_fallbacks_total") >= 1


FAILURES, OPEN_S = 3, 2.0


def _most_in_a_window(arrivals: list[float], window_s: float) -> int:
    return max((sum(1 for t in arrivals if start <= t < start + window_s) for start in arrivals), default=0)


async def test_a_primary_that_is_down_is_left_alone_by_every_worker_and_taken_back_when_it_recovers(
    e2e_redis: str, stub: OpenAIStub, fallback: OpenAIStub
) -> None:
    """The primary answers 500 to everything: every job ends FINISHED in one attempt with the
    fallback's model; the primary gets at most LLM_BREAKER_FAILURES + 1 calls in any
    LLM_BREAKER_OPEN_S (two worker processes share the breaker); once it answers again, one
    trial call closes the breaker and jobs go back to it."""
    stub.fail_all = 500
    fallback.latency_s = 0.15  # 60 jobs over two processes take about 4.5 s: two open periods
    env = {**fallback_env(stub, fallback, "primary-model"), "RQ_QUEUE": "llm-breaker", "WORKER_CONCURRENCY": "1",
           "LLM_BREAKER_FAILURES": str(FAILURES), "LLM_BREAKER_OPEN_S": str(OPEN_S)}  # fmt: skip
    with Service(e2e_redis, workers=2, env=env) as svc:
        job_ids = [submit(svc) for _ in range(60)]
        finals = [events[-1] for events in await asyncio.gather(*(follow(svc, job_id) for job_id in job_ids))]
        metrics_url = f"http://127.0.0.1:{svc.port}/metrics"
        labels = {"base_url": stub.base_url, "model": "primary-model"}
        down = httpx.get(metrics_url).text
        calls_while_down = list(stub.arrivals)
        stub.fail_all = None  # it recovers
        recovered_at = len(stub.arrivals)
        for _ in range(int(OPEN_S * 10)):  # a job every 0.2 s until one is answered by the primary again
            last = (await follow(svc, submit(svc)))[-1]
            if last["model"] == "primary-model":
                break
        after = [(await follow(svc, job_id))[-1] for job_id in [submit(svc) for _ in range(5)]]
        closed = httpx.get(metrics_url).text
    assert [(f["status"], f["attempts"], f["model"]) for f in finals] == [("FINISHED", 1, "fallback-model")] * 60
    most = _most_in_a_window(calls_while_down, OPEN_S)
    print(f"primary: {len(calls_while_down)} calls while down, at most {most} in {OPEN_S} s; fallback: "
          f"{len(fallback.arrivals)} calls")  # fmt: skip
    assert most <= FAILURES + 1, f"{most} calls to the primary within {OPEN_S} s: {calls_while_down}"
    assert len(calls_while_down) >= FAILURES + 1  # and a trial call after the first open period
    assert len(fallback.arrivals) >= 60 - len(calls_while_down)
    assert metric(down, "gqls_llm_breaker_state", **labels) in (1, 2)  # open, or half-open
    assert metric(down, "gqls_llm_provider_failures_total", **labels) == len(calls_while_down)
    assert last["model"] == "primary-model", "the primary was not taken back"
    assert [(f["status"], f["model"]) for f in after] == [("FINISHED", "primary-model")] * 5
    assert len(stub.arrivals) > recovered_at and metric(closed, "gqls_llm_breaker_state", **labels) == 0


def _limits(redis: AsyncRedis, endpoint: str, *, failures: int = 3) -> ProviderLimits:
    return ProviderLimits(redis, endpoint=endpoint, max_in_flight=None, call_timeout_s=5, breaker=Breaker(failures, 30))


async def _fail(limits: ProviderLimits) -> None:
    with pytest.raises(LLMError):
        async with limits.slot():
            raise LLMError(JobErrorCode.PROVIDER_ERROR, "the LLM endpoint answered 500", retryable=True)


async def test_the_breaker_opens_after_failures_in_a_row_and_half_opens_for_exactly_one_call(
    async_redis: AsyncRedis, redis_url: str
) -> None:
    endpoint = "http://breaker.invalid/v1|half-open"
    await async_redis.delete(keys.llm_breaker(endpoint))
    # Separate clients, as separate worker processes have.
    clients = [AsyncRedis.from_url(redis_url) for _ in range(4)]
    workers = [_limits(client, endpoint) for client in clients]
    try:
        await _fail(workers[0])
        async with workers[1].slot():
            pass  # an answer between failures: the count starts again
        for limits in workers[:3]:
            await _fail(limits)  # three in a row, from three workers
        with pytest.raises(BreakerOpen):
            async with workers[3].slot():
                pass
        assert await async_redis.pttl(keys.llm_breaker(endpoint)) > 0
        # Open time over: half-open. Forty calls from four workers at once: one goes.
        await async_redis.hset(keys.llm_breaker(endpoint), "open_until", 0)
        trial_out, release = asyncio.Event(), asyncio.Event()  # each slot() asks Redis: no memory decides

        async def call(limits: ProviderLimits) -> bool:
            try:
                async with limits.slot():
                    trial_out.set()
                    await release.wait()  # the trial call is on the wire while the others try
                    return True
            except BreakerOpen:
                return False

        skipped, all_skipped = [0], asyncio.Event()
        tasks = [asyncio.create_task(call(_limits(c, endpoint))) for c in clients for _ in range(10)]

        async def counted(task: asyncio.Task[bool]) -> None:
            if not await task:
                skipped[0] += 1
                if skipped[0] == len(tasks) - 1:
                    all_skipped.set()

        counting = [asyncio.create_task(counted(t)) for t in tasks]
        await trial_out.wait()
        async with asyncio.timeout(10):  # with a second call let through, it would hang here
            await all_skipped.wait()
        release.set()
        await asyncio.gather(*counting)
        went = [await t for t in tasks]
        assert went.count(True) == 1, went.count(True)
        # The trial call answered: closed, and nothing on record.
        assert not await async_redis.exists(keys.llm_breaker(endpoint))
        # A trial call that fails opens it again at once.
        for limits in workers[:3]:
            await _fail(limits)
        await async_redis.hset(keys.llm_breaker(endpoint), "open_until", 0)
        await _fail(_limits(clients[0], endpoint))
        assert int(await async_redis.hget(keys.llm_breaker(endpoint), "open_until") or 0) > 0
        with pytest.raises(BreakerOpen):
            async with _limits(clients[1], endpoint).slot():
                pass
    finally:
        for client in clients:
            await client.aclose()


async def _sent(redis: AsyncRedis, endpoint: str, work: Callable[[], Awaitable[None]]) -> list[str]:
    """The commands about `endpoint` that `work` sends to Redis, seen by MONITOR (without the
    ones its scripts run inside Redis)."""
    marker, digest = uuid.uuid4().hex, keys.llm_breaker(endpoint).rpartition(":")[2]
    async with redis.monitor() as monitor:
        await work()
        await redis.echo(marker)
        sent = []
        while marker not in (seen := await monitor.next_command())["command"]:
            if seen["client_type"] != "lua" and digest in seen["command"]:
                sent.append(seen["command"].split()[0].upper())
    return sent


async def test_a_healthy_call_costs_the_breaker_no_round_trip(async_redis: AsyncRedis) -> None:
    """With fallbacks on and no LLM_MAX_IN_FLIGHT, a call that is answered sends one command,
    the step that checks the pause and the breaker, as a call without them sends one (the
    pause check); with LLM_MAX_IN_FLIGHT, two, as without: the slot taken and given back."""
    for n, (max_in_flight, breaker) in enumerate(
        [(None, None), (None, Breaker(3, 30)), (4, None), (4, Breaker(3, 30))]
    ):
        endpoint = f"http://breaker.invalid/v1|healthy-{n}"
        limits = ProviderLimits(
            async_redis, endpoint=endpoint, max_in_flight=max_in_flight, call_timeout_s=5, breaker=breaker
        )

        async def call() -> None:
            async with limits.slot():  # noqa: B023
                pass

        await call()  # loads the script
        assert len(await _sent(async_redis, endpoint, call)) == (1 if max_in_flight is None else 2), n
    # After a failure, the next answer resets the count (and says so in that step).
    endpoint = "http://breaker.invalid/v1|reset"
    limits = _limits(async_redis, endpoint)
    await _fail(limits)
    assert await async_redis.hget(keys.llm_breaker(endpoint), "failures") == b"1"
    assert await _sent(async_redis, endpoint, lambda: _slot(limits)) == ["EVALSHA", "EVALSHA"]
    assert not await async_redis.exists(keys.llm_breaker(endpoint))


async def _slot(limits: ProviderLimits) -> None:
    async with limits.slot():
        pass
