"""Tenant budgets, job costs and `Query.usage` (issue 28, items 2 and 3), against real parts:
Redis, PostgreSQL, the API and worker processes, and the OpenAI-compatible stub."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from gql_service import budgets, history, keys, store
from gql_service.models import JobRecord, JobStage, JobStatus, TokenUsage
from gql_service.pricing import Price, job_cost, price_of
from gql_service.settings import SettingsError, load_settings

from .clients import post
from .embedded_postgres import EmbeddedPostgres
from .openai_stub import USAGE, Fault, OpenAIStub
from .service import Service, wait_until

RUN = uuid.uuid4().hex[:8]  # tenants of this run only: the shared Redis keeps other files' counters
TENANT_A, TENANT_B = f"budget-a-{RUN}", f"budget-b-{RUN}"
KEY_A, KEY_B = "budget-key-aaaa", "budget-key-bbbb"
AS_A, AS_B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
PRICE = {"inputPerMTok": 0.15, "outputPerMTok": 0.6}
JOB_COST = (USAGE["prompt_tokens"] * 0.15 + USAGE["completion_tokens"] * 0.6) / 1e6
SUBMIT = "mutation($t: String!) { submitText(input: {text: $t}) { job { id status } } }"
SUBMIT_MANY = "mutation($ts: [SubmitTextInput!]!) { submitTexts(inputs: $ts) { job { id } } }"
JOB = "query($id: ID!) { job(id: $id) { id status createdAt costUsd " \
    "usage { promptTokens completionTokens totalTokens } } }"  # fmt: skip
TOTALS = "jobs { total queued started retrying finished failed canceled } " \
    "tokens { promptTokens completionTokens totalTokens } costUsd unpricedJobs"  # fmt: skip
USAGE_QUERY = (
    f"query($from: DateTime!, $to: DateTime!) {{ usage(from: $from, to: $to) {{ {TOTALS} days {{ date {TOTALS} }} }} }}"
)


# -- settings and prices ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("TENANT_BUDGETS", "{not json", "TENANT_BUDGETS: "),
        ("TENANT_BUDGETS", '{"a": {"tokensPerDay": -1}}', "TENANT_BUDGETS_A_TOKENSPERDAY: "),
        ("TENANT_BUDGETS", '{"a": {"tokensPerWeek": 5}}', "TENANT_BUDGETS_A_TOKENSPERWEEK: "),
        ("LLM_PRICES", '{"m": {"inputPerMTok": 1}}', "LLM_PRICES_M_OUTPUTPERMTOK: "),
        ("LLM_PRICES", '{"m": {"inputPerMTok": 1, "outputPerMTok": -2}}', "LLM_PRICES_M_OUTPUTPERMTOK: "),
    ],
)
def test_bad_budgets_and_prices_are_one_line_errors(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, says: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert str(raised.value).startswith(says) and "\n" not in str(raised.value), str(raised.value)


def test_a_model_is_priced_by_its_name_or_the_name_its_snapshot_extends() -> None:
    prices = {
        "gpt-4o": Price.model_validate({"inputPerMTok": 2.5, "outputPerMTok": 10}),
        "gpt-4o-mini": Price.model_validate({"inputPerMTok": 0.15, "outputPerMTok": 0.6, "cachedInputPerMTok": 0.075}),
    }
    assert price_of(prices, "gpt-4o-mini-2024-07-18") is prices["gpt-4o-mini"]  # the longest name it extends
    assert price_of(prices, "gpt-4o-2024-08-06") is prices["gpt-4o"]
    assert price_of(prices, "gpt-4omni") is None and price_of(prices, None) is None
    usage = TokenUsage(prompt_tokens=1000, completion_tokens=100, total_tokens=1100, cached_tokens=400)
    assert job_cost(prices, "gpt-4o-mini", usage) == pytest.approx((600 * 0.15 + 400 * 0.075 + 100 * 0.6) / 1e6)
    assert job_cost(prices, "gpt-4o", usage) == pytest.approx((1000 * 2.5 + 100 * 10) / 1e6)  # no cached price
    assert job_cost(prices, "llama", usage) is None


# -- the counters -----------------------------------------------------------------------
async def test_a_jobs_end_counts_once_into_its_tenants_day_and_month(async_redis: AsyncRedis) -> None:
    record = JobRecord(id=uuid.uuid4().hex, tenant="counted")
    async with async_redis.pipeline(transaction=True) as pipe:
        store.create_job(pipe, record, text="t", ttl_s=60)
        await pipe.execute()

    def end(job: JobRecord) -> JobRecord:
        usage = TokenUsage(prompt_tokens=100, completion_tokens=50, total_tokens=150)
        return job.model_copy(update={"status": JobStatus.FINISHED, "stage": JobStage.DONE, "usage": usage,
                                      "cost_usd": 0.25})  # fmt: skip

    first = await store.transition(async_redis, record.id, end, ttl_s=60, token="end-token")
    # The same step again (its reply lost, redis-py sent it again): reported, not counted again.
    again = await store.transition(async_redis, record.id, end, ttl_s=60, token="end-token", last_seen=record)
    assert first.changed and again.changed and again.record == first.record
    assert first.record is not None
    counters = budgets.Counters.of("counted", budgets.Period.of(first.record.updated_at))
    used = await async_redis.mget([counters.day_tokens, counters.month_tokens, counters.month_cost])
    assert [int(v) for v in used] == [150, 150, 250_000_000]  # the cost in nano-dollars
    day_ends = budgets.Period.of(first.record.updated_at).day_ends + budgets.GRACE
    left = day_ends.timestamp() - datetime.now(UTC).timestamp()
    assert left - 5 <= await async_redis.ttl(counters.day_tokens) <= left + 1  # gone after its day


# -- the service ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def module_stub() -> Iterator[OpenAIStub]:
    stub = OpenAIStub().start()
    yield stub
    stub.stop()


@pytest.fixture(scope="module")
def budgeted(e2e_redis: str, postgres: EmbeddedPostgres, module_stub: OpenAIStub) -> Iterator[Service]:
    env = {
        **module_stub.env,
        "LLM_STREAM": "false",
        "OPENAI_MODEL": "gpt-4o-mini",
        "API_KEYS": json.dumps({KEY_A: TENANT_A, KEY_B: TENANT_B}),
        # One job of the stub's (150 tokens) spends tenant A's day; B falls under "*".
        "TENANT_BUDGETS": json.dumps({TENANT_A: {"tokensPerDay": 150}, "*": {"tokensPerMonth": 1_000_000}}),
        "LLM_PRICES": json.dumps({"gpt-4o-mini": PRICE}),
        "DATABASE_URL": postgres.url,
        "RQ_QUEUE": "llm-budgets",
    }
    with Service(e2e_redis, workers=1, env=env) as svc:
        yield svc


def job(svc: Service, job_id: str, headers: dict[str, str]) -> dict[str, object]:
    found: dict[str, object] = post(svc, JOB, headers=headers, id=job_id).json()["data"]["job"]
    return found


def ended(svc: Service, job_id: str, headers: dict[str, str]) -> dict[str, object]:
    wait_until(lambda: job(svc, job_id, headers)["status"] == "FINISHED", timeout_s=60, what=f"job {job_id}")
    return job(svc, job_id, headers)


def submitted(svc: Service, headers: dict[str, str]) -> str:
    answer = post(svc, SUBMIT, headers=headers, t="The clinic in Boston was fine.").json()
    assert "errors" not in answer, answer
    return str(answer["data"]["submitText"]["job"]["id"])


def test_a_spent_budget_refuses_its_tenant_while_others_go_on_and_running_jobs_finish(
    budgeted: Service, module_stub: OpenAIStub, postgres: EmbeddedPostgres, e2e_redis: str
) -> None:
    module_stub.reset()
    gate = threading.Event()
    module_stub.script(Fault.gated(gate))  # the first call stays in flight until the gate opens
    try:
        running = submitted(budgeted, AS_A)
        wait_until(lambda: len(module_stub.requests) == 1, timeout_s=60, what="the first job's LLM call")
        spending = submitted(budgeted, AS_A)  # nothing is counted yet: taken
        assert ended(budgeted, spending, AS_A)["costUsd"] == pytest.approx(JOB_COST)
        # 150 tokens today: tenant A's tokensPerDay is spent.
        refused = post(budgeted, SUBMIT, headers=AS_A, t="One more, please.").json()
        assert refused["data"] is None, refused
        [error] = refused["errors"]
        tomorrow = (datetime.now(UTC) + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        assert error["extensions"] == {"code": "QUOTA_EXCEEDED", "budget": "tokensPerDay",
                                       "resetsAt": tomorrow.isoformat()}  # fmt: skip
        many = post(budgeted, SUBMIT_MANY, headers=AS_A, ts=[{"text": "x"}, {"text": "y"}]).json()
        assert [e["extensions"]["code"] for e in many["errors"]] == ["QUOTA_EXCEEDED"] * 2, many
        # Tenant B goes on.
        theirs = submitted(budgeted, AS_B)
        assert ended(budgeted, theirs, AS_B)["status"] == "FINISHED"
        # The job that was running when the budget ran out was left alone, and finishes.
        assert job(budgeted, running, AS_A)["status"] == "STARTED"
    finally:
        gate.set()
    assert ended(budgeted, running, AS_A)["costUsd"] == pytest.approx(JOB_COST)
    metrics = httpx.get(f"http://127.0.0.1:{budgeted.port}/metrics").text
    assert f'gqls_tenant_budget_used_ratio{{budget="tokensPerDay",tenant="{TENANT_A}"}} 2.0' in metrics, metrics
    assert f'gqls_tenant_budget_used_ratio{{budget="tokensPerMonth",tenant="{TENANT_B}"}} 0.00015' in metrics


def test_usage_is_the_sum_of_the_tenants_jobs_in_redis_and_the_history(
    budgeted: Service, postgres: EmbeddedPostgres, e2e_redis: str
) -> None:
    # Tenant B's jobs: two of now (one of them then only in the history), and two the
    # history alone holds from two days ago, one priced and one not.
    now = datetime.now(UTC)
    live = [submitted(budgeted, AS_B) for _ in range(2)]
    for job_id in live:
        ended(budgeted, job_id, AS_B)
    wait_until(lambda: len(archived(postgres, *live)) == 2, timeout_s=30, what="the jobs' rows")
    assert Redis.from_url(e2e_redis).delete(keys.job(live[0])) == 1  # as if RESULT_TTL_S had passed
    old = now - timedelta(days=2)
    usage = TokenUsage(prompt_tokens=7, completion_tokens=3, total_tokens=10)
    ended_then = {"tenant": TENANT_B, "stage": JobStage.DONE, "created_at": old, "finished_at": old, "usage": usage}
    past = [
        JobRecord(id=f"past-priced-{RUN}", status=JobStatus.FINISHED, cost_usd=0.5, **ended_then),
        JobRecord(id=f"past-unpriced-{RUN}", status=JobStatus.FAILED, **ended_then),
    ]
    asyncio.run(write_history(postgres, past))
    with psycopg.connect(postgres.url) as conn:
        assert conn.execute("SELECT cost_usd FROM jobs WHERE id = %s", (past[0].id,)).fetchone() == (0.5,)

    window = {"from": (now - timedelta(days=3)).isoformat(), "to": (now + timedelta(minutes=5)).isoformat()}
    answer = post(budgeted, USAGE_QUERY, headers=AS_B, **window).json()
    assert "errors" not in answer, answer
    got = answer["data"]["usage"]
    # The sum over every job of the tenant, each read as clients read it (Redis, else the history).
    ids = [*all_ids(e2e_redis, TENANT_B), *(r.id for r in past)]
    jobs = [job(budgeted, job_id, AS_B) for job_id in dict.fromkeys(ids)]
    assert got == expected(jobs) | {"days": [expected(jobs, day) for day in sorted({created(j) for j in jobs})]}
    assert got["jobs"]["total"] == len(jobs) >= 4 and got["unpricedJobs"] == 1
    # Another tenant sees only its own.
    theirs = post(budgeted, USAGE_QUERY, headers=AS_A, **window).json()["data"]["usage"]
    assert theirs["jobs"]["total"] == 2 and theirs["tokens"]["totalTokens"] == 300
    backwards = post(budgeted, USAGE_QUERY, headers=AS_B, **{"from": window["to"], "to": window["from"]}).json()
    assert backwards["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"


async def write_history(pg: EmbeddedPostgres, records: list[JobRecord]) -> None:
    async with await psycopg.AsyncConnection.connect(pg.url) as conn:
        await history.upsert(conn, [history.row(r, None) for r in records])


def archived(pg: EmbeddedPostgres, *job_ids: str) -> list[str]:
    with psycopg.connect(pg.url) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM jobs WHERE id = ANY(%s)", (list(job_ids),)).fetchall()]


def all_ids(redis_url: str, tenant: str) -> list[str]:
    """Every job the tenant has: the index in Redis (the deleted record's id included)."""
    return [i.decode() for i in Redis.from_url(redis_url).zrange(keys.tenant_jobs(tenant), 0, -1)]


def created(job: dict[str, object]) -> str:
    return datetime.fromisoformat(str(job["createdAt"])).astimezone(UTC).date().isoformat()


def expected(jobs: list[dict[str, object]], day: str | None = None) -> dict[str, object]:
    mine = [j for j in jobs if day is None or created(j) == day]
    statuses = Counter(str(j["status"]).lower() for j in mine)
    tokens = Counter[str]()
    for j in mine:
        tokens.update(j["usage"] or {})  # type: ignore[arg-type]
    out: dict[str, object] = {
        "jobs": {
            "total": len(mine),
            **{s: statuses[s] for s in ("queued", "started", "retrying", "finished", "failed", "canceled")},
        },  # fmt: skip
        "tokens": {k: tokens[k] for k in ("promptTokens", "completionTokens", "totalTokens")},
        "costUsd": pytest.approx(sum(float(j["costUsd"] or 0) for j in mine)),  # type: ignore[arg-type]
        "unpricedJobs": sum(j["costUsd"] is None for j in mine),
    }
    return out | ({"date": day} if day is not None else {})
