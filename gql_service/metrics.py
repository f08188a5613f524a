"""Prometheus metrics.

API-side figures (GraphQL operations and errors, counted by `operations`; subscriptions,
queue depth) come from the process serving `/metrics`. Job figures (final status and error
code, stage durations, LLM latency, tokens, provider-limit waits) are written by the
workers into Redis, one pipeline per attempt, and read at scrape time: every API replica
reports the same cluster-wide job totals, so aggregate them with `max`, not `sum`.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from dataclasses import field as default
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError
from rq.executions import WORKER_EXECUTIONS_KEY_TEMPLATE
from rq.worker_registration import REDIS_WORKER_KEYS

from gql_service import budgets, keys, store

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

REGISTRY = CollectorRegistry()  # the API process's own counters (see `operations`)


# -- written by workers -------------------------------------------------------------------
def _observe(pipe: Any, key: str, seconds: float) -> None:
    # Its bucket and the sum: the count is the buckets' total, read so at scrape time.
    index = bisect.bisect_left(BUCKETS, seconds)
    pipe.hincrby(key, str(BUCKETS[index]) if index < len(BUCKETS) else "+Inf", 1)
    pipe.hincrbyfloat(key, "sum", seconds)


@dataclass
class LimitWaits:
    """What the shared provider limits cost one attempt (gql_service.worker.provider_limits)."""

    seconds: float = 0.0  # waiting for a call slot or for a pause to end
    rate_limited: int = 0  # 429s received
    pauses: int = 0  # pauses this attempt applied to every worker (Retry-After, rate headers)
    # By endpoint+model (a provider's `endpoint`): calls made, and those that failed in a way
    # a fallback is for (gql_service.worker.breaker); and how often the attempt fell over.
    calls: Counter[str] = default(default_factory=Counter)
    failures: Counter[str] = default(default_factory=Counter)
    fallbacks: int = 0


async def record_attempt(
    redis: AsyncRedis,
    *,
    final: tuple[str, str] | None,
    stage_seconds: Iterable[tuple[str, float]],
    llm_seconds: Iterable[float],
    prompt_tokens: int,
    completion_tokens: int,
    waits: LimitWaits | None = None,
) -> None:
    """One round trip at the end of an attempt; `final` is (status, error code) when it ended."""
    async with redis.pipeline(transaction=False) as pipe:
        if final is not None:
            pipe.hincrby(keys.metrics("jobs"), f"{final[0]}|{final[1]}", 1)
        for stage, seconds in stage_seconds:
            _observe(pipe, keys.metrics(f"stage_seconds:{stage}"), seconds)
        for seconds in llm_seconds:
            _observe(pipe, keys.metrics("llm_call_seconds"), seconds)
        pipe.hincrby(keys.metrics("tokens"), "prompt", prompt_tokens)
        pipe.hincrby(keys.metrics("tokens"), "completion", completion_tokens)
        if waits is not None:
            # Only what happened: a field never written reads as 0 at scrape time.
            for name, amount in (("rate_limited", waits.rate_limited), ("pauses", waits.pauses),
                                 ("fallbacks", waits.fallbacks)):  # fmt: skip
                if amount:
                    pipe.hincrby(keys.metrics("llm_limits"), name, amount)
            if waits.seconds:
                pipe.hincrbyfloat(keys.metrics("llm_limits"), "wait_seconds", waits.seconds)
            for kind, counts in (("calls", waits.calls), ("failures", waits.failures)):
                for endpoint, count in counts.items():
                    pipe.hincrby(keys.metrics("llm_providers"), f"{kind}|{endpoint}", count)
        await pipe.execute()


async def record_delivery(redis: AsyncRedis, outcome: str, *, attempt_s: float, since_end_s: float | None) -> None:
    """One webhook attempt: its outcome (DELIVERED, RETRYING, FAILED) and how long it took;
    when delivered, how long after the job ended."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hincrby(keys.metrics("webhooks"), outcome, 1)
        _observe(pipe, keys.metrics("webhook_attempt_seconds"), attempt_s)
        if since_end_s is not None:
            _observe(pipe, keys.metrics("webhook_delivery_seconds"), since_end_s)
        await pipe.execute()


def record_spans_dropped(redis: Redis, count: int) -> None:
    """Spans a worker process dropped (its export queue full), added to the cluster's count
    (from gql_service.worker.trace_drops, on a thread: the one synchronous writer here)."""
    redis.hincrby(keys.metrics("tracing"), "spans_dropped", count)


# -- read by the API at scrape time ---------------------------------------------------------
def _histogram(name: str, doc: str, rows: list[tuple[dict[str, str], dict[bytes, bytes]]]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=sorted({k for labels, _ in rows for k in labels}))
    for labels, raw in rows:
        counts = {k.decode(): float(v) for k, v in raw.items()}
        cumulative, buckets = 0.0, []
        for bound in (*BUCKETS, "+Inf"):
            cumulative += counts.get(str(bound), 0.0)
            buckets.append((str(bound), cumulative))
        family.add_metric(list(labels.values()), buckets, counts.get("sum", 0.0))
    return family


class _Snapshot(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


async def render(
    redis: AsyncRedis,
    *,
    queue_keys: dict[str, str],
    webhook_queue_key: str,
    subscribers: int,
    timeout_s: float,
    outbox_max_len: int = store.OUTBOX_MAX_LEN,
    budget_limits: Sequence[tuple[str, budgets.Limit]] = (),
) -> bytes:
    """The API's own figures always; the cluster-wide job figures when Redis answers in time
    (a scrape during an outage still shows the process, with gqls_redis_up 0).
    `budget_limits`: (tenant, budget) of every tenant with one, to say how much of each is used."""
    stages = ("CALLING_LLM", "VALIDATING", "REPAIRING")
    families: list[Metric] = [
        GaugeMetricFamily("gqls_active_subscriptions", "Open jobUpdates subscriptions", value=subscribers)
    ]
    try:
        async with asyncio.timeout(timeout_s), redis.pipeline(transaction=False) as pipe:
            if budget_limits:
                pipe.mget([limit.key for _, limit in budget_limits])
            pipe.hget(keys.metrics("tracing"), "spans_dropped")
            pipe.hgetall(keys.metrics("llm_providers"))
            pipe.hgetall(keys.metrics("jobs"))
            pipe.hgetall(keys.metrics("tokens"))
            pipe.hgetall(keys.metrics("llm_limits"))
            pipe.hgetall(keys.metrics("llm_call_seconds"))
            for stage in stages:
                pipe.hgetall(keys.metrics(f"stage_seconds:{stage}"))
            pipe.smembers(REDIS_WORKER_KEYS)
            pipe.xlen(keys.ARCHIVE_OUTBOX)
            pipe.xrange(keys.ARCHIVE_OUTBOX, count=1)
            pipe.hgetall(keys.metrics("webhooks"))
            pipe.hgetall(keys.metrics("webhook_attempt_seconds"))
            pipe.hgetall(keys.metrics("webhook_delivery_seconds"))
            pipe.llen(webhook_queue_key)
            pipe.xlen(keys.WEBHOOK_OUTBOX)
            for box in keys.OUTBOXES.values():
                pipe.xlen(box.stream)
                pipe.xlen(box.dead)
            for queue_key in queue_keys.values():  # last: the LLM queues' depths, one per priority
                pipe.llen(queue_key)
            everything = await pipe.execute()
            used = everything.pop(0) if budget_limits else []
            spans_dropped, providers, *replies = everything
            depths, replies = replies[len(replies) - len(queue_keys) :], replies[: len(replies) - len(queue_keys)]
            jobs, tokens, limits, llm = replies[:4]
            stage_rows = replies[4 : 4 + len(stages)]
            boxes = replies[-2 * len(keys.OUTBOXES) :]
            workers, outbox, oldest, *hooks = replies[4 + len(stages) : -len(boxes)]
            in_flight = await _jobs_in_flight(redis, workers)
            by_provider = await _provider_families(redis, providers)
    except (RedisError, OSError, TimeoutError):
        families.append(GaugeMetricFamily("gqls_redis_up", "Whether Redis answered this scrape", value=0))
        return generate_latest(REGISTRY) + _expose(families)
    finished = CounterMetricFamily(
        "gqls_jobs_finished", "Jobs by final status and error code", labels=["status", "code"]
    )
    for field, count in jobs.items():
        status, _, code = field.decode().partition("|")
        finished.add_metric([status, code or "none"], float(count))
    token_family = CounterMetricFamily("gqls_llm_tokens", "LLM tokens used, over every attempt", labels=["kind"])
    for kind, count in tokens.items():
        token_family.add_metric([kind.decode()], float(count))
    limit = {k.decode(): float(v) for k, v in limits.items()}
    families += [
        finished,
        token_family,
        CounterMetricFamily(
            "gqls_llm_limit_wait_seconds",
            "Time attempts waited for an LLM call slot or a provider pause",
            value=limit.get("wait_seconds", 0.0),
        ),
        CounterMetricFamily(
            "gqls_llm_rate_limited", "429 answers received from the LLM endpoint", value=limit.get("rate_limited", 0.0)
        ),
        CounterMetricFamily(
            "gqls_llm_fallbacks", "Calls that went to the next LLM fallback", value=limit.get("fallbacks", 0.0)
        ),
        *by_provider,
        CounterMetricFamily(
            "gqls_llm_pauses",
            "Pauses applied to every worker: a 429 with Retry-After, or rate headers saying a budget is spent",
            value=limit.get("pauses", 0.0),
        ),
        _histogram("gqls_llm_call_seconds", "Latency of one LLM call", [({}, llm)]),
        _histogram(
            "gqls_stage_seconds",
            "Time jobs spend in each stage",
            [({"stage": s}, raw) for s, raw in zip(stages, stage_rows, strict=True)],
        ),  # fmt: skip
        _queue_depths(dict(zip(queue_keys, depths, strict=True))),
        GaugeMetricFamily(
            "gqls_archive_outbox_depth", "Ended jobs not yet written to the PostgreSQL history", value=float(outbox)
        ),
        GaugeMetricFamily(
            "gqls_archive_outbox_oldest_seconds",
            "Age of the oldest ended job not yet written to the history (0: none waiting)",
            value=outbox_age_s(oldest),
        ),
        *_webhook_families(*hooks),
        *_outbox_families(boxes, outbox_max_len),
        in_flight,
        CounterMetricFamily(
            "gqls_worker_trace_spans_dropped",
            "Spans the workers dropped because their export queue was full (collector slow or away)",
            value=float(spans_dropped or 0),
        ),
        _budget_family(budget_limits, used),
        GaugeMetricFamily("gqls_redis_up", "Whether Redis answered this scrape", value=1),
    ]
    return generate_latest(REGISTRY) + _expose(families)


def _budget_family(limits: Sequence[tuple[str, budgets.Limit]], used: list[bytes | None]) -> Metric:
    family = GaugeMetricFamily(
        "gqls_tenant_budget_used_ratio",
        "How much of each tenant's budget (TENANT_BUDGETS) its jobs have used this UTC day or month; "
        "1 or more: spent, submissions are refused",
        labels=["tenant", "budget"],
    )
    for (tenant, limit), value in zip(limits, used, strict=True):
        spent = float(value or 0)
        # A zero budget is spent from the start (every submission is refused).
        family.add_metric([tenant, limit.name], spent / limit.limit if limit.limit else 1.0)
    return family


def _queue_depths(depths: dict[str, int]) -> Metric:
    """Jobs waiting on each priority's queue (held by a tenant cap or waiting for a retry: not yet)."""
    family = GaugeMetricFamily("gqls_queue_depth", "Jobs waiting in the RQ queue of each priority", labels=["priority"])
    for priority, depth in depths.items():
        family.add_metric([priority], float(depth))
    return family


BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


async def _provider_families(redis: AsyncRedis, raw: dict[bytes, bytes]) -> list[Metric]:
    """Calls and failures per LLM endpoint+model, and each one's circuit breaker (0 closed,
    1 half-open, 2 open; gql_service.worker.breaker). The label values come from the workers'
    settings (the primary and LLM_FALLBACKS), never from clients."""
    labels = ["base_url", "model"]
    calls = CounterMetricFamily("gqls_llm_provider_calls", "LLM calls by endpoint and model", labels=labels)
    failures = CounterMetricFamily(
        "gqls_llm_provider_failures",
        "LLM calls that failed in a way a fallback is for (5xx, connection, timeout, 429 not waited out)",
        labels=labels,
    )
    state = GaugeMetricFamily(
        "gqls_llm_breaker_state", "Circuit breaker of each LLM endpoint and model: 0 closed, 1 half-open, 2 open",
        labels=labels,
    )  # fmt: skip
    endpoints: list[str] = []
    for name, count in raw.items():
        kind, _, endpoint = name.decode().partition("|")
        family = calls if kind == "calls" else failures
        family.add_metric(_provider_labels(endpoint), float(count))
        if kind == "calls":
            endpoints.append(endpoint)
    if endpoints:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.time()
            for endpoint in endpoints:
                pipe.hget(keys.llm_breaker(endpoint), "open_until")
            (seconds, micros), *open_until = await pipe.execute()
        now_ms = seconds * 1000 + micros // 1000
        for endpoint, until in zip(endpoints, open_until, strict=True):
            shown = "closed" if until is None else "open" if int(until) > now_ms else "half_open"
            state.add_metric(_provider_labels(endpoint), BREAKER_STATES[shown])
    return [calls, failures, state]


def _provider_labels(endpoint: str) -> list[str]:
    """`base_url|model` (a provider's `endpoint`) as label values, without any password."""
    base_url, _, model = endpoint.rpartition("|")
    parts = urlsplit(base_url)
    if parts.password is not None or parts.username is not None:
        base_url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return [base_url.rstrip("/"), model]  # as configured: the SDK adds a slash


def _webhook_families(
    outcomes: dict[bytes, bytes], attempts: dict[bytes, bytes], latency: dict[bytes, bytes], depth: int, outbox: int
) -> list[Metric]:
    counted = CounterMetricFamily(
        "gqls_webhook_attempts",
        "Webhook delivery attempts by outcome (DELIVERED, RETRYING, FAILED)",
        labels=["outcome"],
    )
    for outcome in ("DELIVERED", "RETRYING", "FAILED"):
        counted.add_metric([outcome], float(outcomes.get(outcome.encode(), 0)))
    return [
        counted,
        _histogram("gqls_webhook_attempt_seconds", "Duration of one webhook delivery attempt", [({}, attempts)]),
        _histogram(
            "gqls_webhook_delivery_seconds", "From a job's end to its webhook's delivery", [({}, latency)]
        ),
        GaugeMetricFamily(
            "gqls_webhook_queue_depth", "Webhook deliveries waiting for a worker (retries not yet due excluded)",
            value=float(depth),
        ),
        GaugeMetricFamily(
            "gqls_webhook_outbox_depth", "Ended jobs whose webhook is not yet on its queue", value=float(outbox)
        ),
    ]  # fmt: skip


def _outbox_families(lengths: list[int], max_len: int) -> list[Metric]:
    """Every outbox's depth and dead letters (XLEN of each: cheap at any size), and the bound
    on its length: an outbox at its bound is dropping its oldest entries."""
    depth = GaugeMetricFamily("gqls_outbox_depth", "Entries in each outbox, not yet done", labels=["outbox"])
    dead = GaugeMetricFamily(
        "gqls_outbox_dead_letters",
        "Outbox entries that could not be done, kept for `gql-service outbox replay`",
        labels=["outbox"],
    )
    for n, name in enumerate(keys.OUTBOXES):
        depth.add_metric([name], float(lengths[2 * n]))
        dead.add_metric([name], float(lengths[2 * n + 1]))
    bound = GaugeMetricFamily(
        "gqls_outbox_max_len", "OUTBOX_MAX_LEN: past it, an outbox drops its oldest entries", value=float(max_len)
    )
    return [depth, dead, bound]


def outbox_age_s(oldest: list[tuple[bytes, object]]) -> float:
    """From the first entry of the outbox stream: its id starts with its time in ms."""
    if not oldest:
        return 0.0
    added_ms = int(oldest[0][0].split(b"-")[0])
    return max(0.0, time.time() - added_ms / 1000)


async def outbox_age(redis: AsyncRedis) -> float:
    oldest: Any = await redis.xrange(keys.ARCHIVE_OUTBOX, count=1)
    return outbox_age_s(oldest)


async def _jobs_in_flight(redis: AsyncRedis, worker_keys: set[bytes]) -> GaugeMetricFamily:
    """RQ's own record of what each worker runs: one execution per job in flight."""
    names = sorted(key.decode().rpartition(":")[2] for key in worker_keys)
    family = GaugeMetricFamily("gqls_worker_jobs_in_flight", "Jobs each RQ worker is running", labels=["worker"])
    if names:
        async with redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.scard(WORKER_EXECUTIONS_KEY_TEMPLATE.format(name))
            counts = await pipe.execute()
        for name, count in zip(names, counts, strict=True):
            family.add_metric([name], float(count))
    return family


def _expose(families: list[Metric]) -> bytes:
    snapshot = CollectorRegistry()
    snapshot.register(_Snapshot(families))
    return generate_latest(snapshot)
