"""`Query.usage`: a tenant's jobs, tokens and cost over a window, by UTC day (gql_service.api.usage)."""

from __future__ import annotations

import datetime as dt

import strawberry

from gql_service.api import usage
from gql_service.api.schema.types import TokenUsage
from gql_service.models import JobStatus


@strawberry.type(description="Jobs by their status now; they add up to `total`.")
class UsageJobs:
    total: int
    queued: int
    started: int
    retrying: int
    finished: int
    failed: int
    canceled: int


@strawberry.type(description="Jobs, tokens and cost summed over a set of jobs.")
class UsageTotals:
    jobs: UsageJobs
    tokens: TokenUsage = strawberry.field(description="Over every attempt, as each job's `usage`.")
    cost_usd: float = strawberry.field(description="The sum of the jobs' `costUsd` (jobs without one add 0).")
    unpriced_jobs: int = strawberry.field(description="Jobs whose model has no price (their `costUsd` is null).")

    @classmethod
    def of(cls, t: usage.Totals) -> UsageTotals:
        by = {status: t.jobs.get(status, 0) for status in JobStatus}
        jobs = UsageJobs(
            total=sum(by.values()), queued=by[JobStatus.QUEUED], started=by[JobStatus.STARTED],
            retrying=by[JobStatus.RETRYING], finished=by[JobStatus.FINISHED], failed=by[JobStatus.FAILED],
            canceled=by[JobStatus.CANCELED],
        )  # fmt: skip
        tokens = TokenUsage(
            prompt_tokens=t.prompt_tokens, completion_tokens=t.completion_tokens, total_tokens=t.total_tokens
        )
        return cls(jobs=jobs, tokens=tokens, cost_usd=t.cost_usd, unpriced_jobs=t.unpriced)


@strawberry.type(description="One UTC day's jobs (by the day they were created).")
class UsageDay(UsageTotals):
    date: dt.date


@strawberry.type(
    description="Your jobs created in [from, to): the sum over them, and day by day (UTC, only days with "
    "jobs). With the job history on, jobs Redis no longer holds are counted too, each job once."
)
class Usage(UsageTotals):
    from_: dt.datetime = strawberry.field(name="from")
    to: dt.datetime
    days: list[UsageDay]

    @classmethod
    def of_report(cls, report: usage.Report, start: dt.datetime, end: dt.datetime) -> Usage:
        days = [UsageDay(date=day, **vars(UsageTotals.of(t))) for day, t in report.days.items()]
        return cls(from_=start, to=end, days=days, **vars(UsageTotals.of(report.total)))
