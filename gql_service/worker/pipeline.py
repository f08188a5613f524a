"""One extraction attempt, stage by stage, each stage a published transition.

CALLING_LLM -> VALIDATING (-> REPAIRING -> VALIDATING) -> DONE, or FAILED with a JobError.
Transient LLM errors leave the job RETRYING and re-raise so that RQ schedules the next
attempt; everything else ends the job here.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence

from opentelemetry.trace import INVALID_SPAN, Span
from pydantic import ValidationError
from redis.asyncio import Redis

from gql_service import logs, metrics, pricing, redis_conn, store
from gql_service.models import Extraction, JobError, JobErrorCode, JobRecord, JobStage, JobStatus, TokenUsage, utcnow
from gql_service.partials import PartialStream
from gql_service.pricing import Price
from gql_service.settings import ReplicaAck
from gql_service.worker import job_spans
from gql_service.worker.breaker import MAX_PAUSE_S, falls_over, usable_pause
from gql_service.worker.fallbacks import Route
from gql_service.worker.job_ends import ForAttempt, get_for_attempt, two_steps
from gql_service.worker.job_ends import transition as _transition
from gql_service.worker.llm import Completion, LLMError, Provider, Repair, prompt
from gql_service.worker.llm.base import OnText
from gql_service.worker.llm.provider_batches import stored_answer
from gql_service.worker.provider_limits import ProviderLimits

log = logging.getLogger(__name__)


# A call told to come back later (429 Retry-After) tries again this many times within its
# attempt, if told to wait no more than MAX_PAUSE_S (longer waits would run into the job's
# timeout); otherwise the 429 counts like any other (the next fallback, or RETRYING).
MAX_PAUSES_PER_CALL = 5
# How long a transition waits for an unreachable Redis before the attempt gives up (and RQ
# retries the job, or abandoned-job detection does once Redis is back).
REDIS_OUTAGE_WAIT_S = 30.0


class RetryLater(Exception):
    """Raised to hand a transiently failed attempt back to RQ's retry schedule."""


class InvalidOutput(Exception):
    pass


def validate(content: str) -> Extraction:
    """Parse and validate model output; the message says what to fix, in a few words."""
    try:
        data = json.loads(content)
    except json.JSONDecodeError as exc:
        raise InvalidOutput(f"not valid JSON ({exc.msg} at position {exc.pos})") from None
    try:
        return Extraction.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'object'}: {err['msg']}" for err in exc.errors()[:10]
        )
        raise InvalidOutput(problems) from None


class Attempt:
    """Runs one attempt of one job; every state change goes through `store.transition`."""

    def __init__(
        self,
        redis: Redis,
        provider: Provider,
        job_id: str,
        *,
        ttl_s: int,
        limits: ProviderLimits | None = None,
        fallbacks: Sequence[Route] = (),
        partials: PartialStream | None = None,
        outbox_max_len: int = store.OUTBOX_MAX_LEN,
        ack: ReplicaAck | None = None,
        prices: dict[str, Price] | None = None,
        batch_discount: float = 1.0,
    ) -> None:
        self.redis = redis
        self.prices = prices  # LLM_PRICES: the job's cost is written with its usage
        self.batch_discount = batch_discount  # LLM_BATCH_DISCOUNT, for what a provider batch answered
        self.outbox_max_len = outbox_max_len  # OUTBOX_MAX_LEN, for the outboxes the job's end goes to
        self.ack = ack  # the end of the job waits for replicas (REDIS_MIN_REPLICAS_ACKED)
        self.provider = provider
        self.limits = limits
        # The primary, then each fallback (LLM_FALLBACKS) in order.
        self.routes = (Route(provider, limits), *fallbacks)
        self.partials = partials
        self.job_id = job_id
        self.ttl_s = ttl_s
        self.usage = TokenUsage()  # over every attempt, as the record shows it
        # For the metrics: this attempt's tokens, LLM calls, and time in each stage.
        self.spent = TokenUsage()
        self.llm_seconds: list[float] = []
        self.waits = metrics.LimitWaits()
        self.stage_seconds: list[tuple[str, float]] = []
        self._stage: tuple[JobStage, float] | None = None
        self.last: JobRecord | None = None
        self._watchers = 0  # subscribers of interim frames when the last transition was written
        self.span: Span = INVALID_SPAN  # this attempt's (gql_service.worker.job_spans), while tracing is on

    def _entered(self, record: JobRecord) -> None:
        now = time.monotonic()
        if self._stage is not None and self._stage[0] is not record.stage:
            self.stage_seconds.append((self._stage[0].value, now - self._stage[1]))
        if self._stage is None or self._stage[0] is not record.stage:
            self._stage = (record.stage, now)
        self.last = record
        job_spans.stage(self.span, record)

    def _change(self, changes: dict[str, object]) -> store.Change:
        def change(job: JobRecord) -> JobRecord:
            changed = job.model_copy(update=changes)
            if "usage" in changes:
                # The cost goes with the usage, at the prices of the model that answered last.
                changed.cost_usd = pricing.job_cost(
                    self.prices, changed.model, changed.usage, batch_usage=changed.batch_usage,
                    batch_discount=self.batch_discount,
                )  # fmt: skip
            return changed

        return change

    async def _set(self, **changes: object) -> JobRecord | None:
        return self._wrote(await self._write(self._change(changes), self.last))

    async def _set_two(self, first: dict[str, object], then: dict[str, object]) -> JobRecord | None:
        """`_set(**first)`, then `_set(**then)`, in one round trip (worker/job_ends.py
        `two_steps`): both written and published, in order. Step by step when the second must
        wait for replicas (REDIS_MIN_REPLICAS_ACKED)."""
        last = self.last
        if self.ack is not None or last is None:
            await self._set(**first)
            return await self._set(**then)
        tokens = (_token(), _token())

        async def write() -> tuple[store.Transition, store.Transition]:
            return await two_steps(
                self.redis, self.job_id, self._change(first), self._change(then), last, ttl_s=self.ttl_s,
                outbox_max_len=self.outbox_max_len, tokens=tokens,
            )  # fmt: skip

        one, two = await self._outage().call(write)
        self._watchers = two.partial_watchers
        self._wrote(one)
        return self._wrote(two)

    def _wrote(self, done: store.Transition) -> JobRecord | None:
        record, changed = done.record, done.changed
        if changed and record is not None:
            # The start and the end at INFO; the stages between at DEBUG (a worker running
            # hundreds of jobs at once would spend a few percent of its CPU on them).
            level = logging.INFO if record.terminal else logging.DEBUG
            log.log(
                level, "job %s: %s / %s (v%d)", self.job_id, record.status.value, record.stage.value, record.version
            )
            self._entered(record)
        return record if changed else None

    def _outage(self) -> redis_conn.Outage:
        return redis_conn.Outage(f"job {self.job_id}", log, give_up_after_s=REDIS_OUTAGE_WAIT_S, base_s=0.1)

    async def _write(self, change: store.Change, last_seen: JobRecord | None) -> store.Transition:
        """A transition of this job, written once Redis answers: through a short outage (a
        restart, a failover) the job carries on where it was instead of failing."""
        token = _token()

        async def write() -> store.Transition:
            return await _transition(
                self.redis, self.job_id, change, ttl_s=self.ttl_s, outbox_max_len=self.outbox_max_len, ack=self.ack,
                last_seen=last_seen, token=token,
            )  # fmt: skip

        done = await self._outage().call(write)
        self._watchers = done.partial_watchers
        return done

    def _add_usage(self, usage: TokenUsage) -> None:
        self.usage = self.usage + usage
        self.spent = self.spent + usage

    async def _ask(self, text: str, repair: Repair | None = None) -> Completion:
        """The answer of the first endpoint+model that gives one: when one fails in a way
        another may not (5xx, no connection, a timeout, a 429 not waited out, its breaker
        open), the next fallback is asked at once, within this attempt."""
        for n, route in enumerate(self.routes):
            try:
                return await self._ask_route(route, text, repair)
            except LLMError as exc:
                if n == len(self.routes) - 1 or not exc.retryable:
                    raise
                to = self.routes[n + 1].provider.model
                log.debug("job %s: %s failed (%s); asking %s", self.job_id, route.provider.model, exc, to)
                job_spans.event(self.span, "llm.fallback", str(exc), **{"gqls.llm.from": route.provider.model,
                                                                        "gqls.llm.to": to})  # fmt: skip
                self.waits.fallbacks += 1
        raise AssertionError("unreachable")

    async def _ask_route(self, route: Route, text: str, repair: Repair | None) -> Completion:
        limits = route.limits
        for pauses in range(MAX_PAUSES_PER_CALL + 1):
            try:
                completion = await self._call(route, text, repair)
            except LLMError as exc:
                self._add_usage(exc.usage)
                if exc.code is JobErrorCode.RATE_LIMITED:
                    self.waits.rate_limited += 1
                wait = exc.retry_after_s
                if limits is None or wait is None or not usable_pause(exc) or pauses == MAX_PAUSES_PER_CALL:
                    raise
                # The endpoint said when to come back: every worker waits that long, and
                # this call tries again then, without spending an attempt.
                job_spans.event(self.span, "llm.pause", exc.code.value, **{"gqls.pause.seconds": wait})
                await limits.pause(wait)
                self.waits.pauses += 1
                continue
            self._add_usage(completion.usage)
            return completion
        raise AssertionError("unreachable")

    async def _call(self, route: Route, text: str, repair: Repair | None) -> Completion:
        limits = route.limits
        if limits is None:
            return await self._extract(route.provider, text, repair)
        limits.skip_if_open()
        estimate = prompt.estimated_tokens(text, repair)
        self.waits.seconds += await limits.take_budget(estimate)
        async with limits.slot() as waited:
            self.waits.seconds += waited
            completion = await self._extract(route.provider, text, repair)
        await limits.charge_tokens(estimate, completion.usage.total_tokens)
        if completion.spent_for_s is not None:
            # The endpoint's rate headers say a budget is spent until then: every worker
            # waits for it, rather than for the 429 the next call would get.
            wait = min(completion.spent_for_s, MAX_PAUSE_S)
            job_spans.event(self.span, "llm.pause", "rate limit headers", **{"gqls.pause.seconds": wait})
            await limits.pause(wait)
            self.waits.pauses += 1
        return completion

    async def _extract(self, provider: Provider, text: str, repair: Repair | None) -> Completion:
        """One LLM call, timed and counted; its answer streams to the interim frames while it
        is written (a fallback's answer starts them afresh)."""
        partials = self.partials
        if partials is not None and self.last is not None:
            partials.begin(self.last.version, watchers=self._watchers)
        started = time.monotonic()
        self.waits.calls[provider.endpoint] += 1
        try:
            with job_spans.chat_span(provider, text=text, repair=repair is not None) as chat:
                on_text: OnText | None = partials.feed if partials is not None else None
                if on_text is not None and chat.is_recording():
                    on_text = job_spans.first_token_noted(chat, on_text)
                completion = await provider.extract(text, repair=repair, on_text=on_text)
                job_spans.completed(chat, completion)
                return completion
        except LLMError as exc:
            if falls_over(exc):
                self.waits.failures[provider.endpoint] += 1
            raise
        finally:
            self.llm_seconds.append(time.monotonic() - started)
            if partials is not None:
                await partials.end()

    async def run(self, *, retries_left: int, read: ForAttempt | None = None) -> JobRecord | None:
        """`read`: what `get_for_attempt` (worker/job_ends.py) answers, when the caller read it already (with
        the other reads of a job's start, in one round trip: gql_service.worker.tasks)."""
        try:
            return await self._run(retries_left=retries_left, read=read)
        finally:
            await self._record_metrics()

    async def _record_metrics(self) -> None:
        if self.last is None:
            return  # nothing ran
        final = None
        if self.last.terminal:
            final = (self.last.status.value, self.last.error.code.value if self.last.error else "")
        try:
            await metrics.record_attempt(
                self.redis,
                final=final,
                stage_seconds=self.stage_seconds,
                llm_seconds=self.llm_seconds,
                prompt_tokens=self.spent.prompt_tokens,
                completion_tokens=self.spent.completion_tokens,
                waits=self.waits,
            )
        except Exception:  # metrics must never fail a job
            log.exception("job %s: could not record metrics", self.job_id)

    async def _run(self, *, retries_left: int, read: ForAttempt | None) -> JobRecord | None:
        current, text, answer = read or await get_for_attempt(self.redis, self.job_id)
        if current is None:
            log.info("job %s is gone, canceled or finished; nothing to do", self.job_id)
            return None
        # An ECONOMY batch's job whose provider batch answered (gql_service.worker.economy):
        # that answer is validated (and repaired) as an interactive one would be.
        batched = stored_answer(answer) if answer and current.stage is JobStage.PROVIDER_BATCH else None
        with job_spans.job_span(current) as span:
            self.span = span
            try:
                return await self._attempt(current, text, batched, retries_left=retries_left)
            finally:
                self.span = INVALID_SPAN  # ended: nothing more goes on it

    async def _attempt(
        self, current: JobRecord, text: str, batched: Completion | None, *, retries_left: int
    ) -> JobRecord | None:
        started = await self._start(current, batched)
        if started is None:
            log.info("job %s is gone, canceled or finished; nothing to do", self.job_id)
            return None
        logs.request_id.set(started.request_id)  # worker log lines about this job carry it
        log.info("job %s: attempt %d with %s", self.job_id, started.attempts, started.model)
        self.usage = started.usage or TokenUsage()
        try:
            if batched is not None:
                completion = batched
                self._add_usage(batched.usage)
            else:
                completion = await self._ask(text)
            try:
                result = validate(completion.content)
            except InvalidOutput as first:
                await self._set(stage=JobStage.VALIDATING, usage=self.usage)
                log.info("job %s: invalid output (%s); asking for a repair", self.job_id, first)
                job_spans.event(self.span, "validation_failed", str(first))
                job_spans.event(self.span, "repair", str(first))
                await self._set(stage=JobStage.REPAIRING)
                completion = await self._ask(text, Repair(completion.content, str(first)))
                await self._set(stage=JobStage.VALIDATING, usage=self.usage)
                result = validate(completion.content)
            else:
                # Valid at once, as most answers are: VALIDATING and DONE in one round trip,
                # each written and published as ever (the validation ran just before).
                return await self._set_two({"stage": JobStage.VALIDATING, "usage": self.usage},
                                           self._finished(result, completion))  # fmt: skip
        except InvalidOutput as exc:
            job_spans.event(self.span, "validation_failed", str(exc))
            return await self._fail(
                JobError(code=JobErrorCode.INVALID_OUTPUT, message=f"invalid output after repair: {exc}")
            )
        except LLMError as exc:
            error = JobError(code=exc.code, message=exc.message, retryable=exc.retryable)
            if exc.retryable and retries_left > 0:
                await self._set(status=JobStatus.RETRYING, stage=JobStage.QUEUED, error=error, usage=self.usage)
                raise RetryLater(str(exc)) from exc
            return await self._fail(error)
        return await self._set(**self._finished(result, completion))

    def _finished(self, result: Extraction, completion: Completion) -> dict[str, object]:
        return {
            "status": JobStatus.FINISHED, "stage": JobStage.DONE, "result": result, "error": None,
            "usage": self.usage, "model": completion.model, "finished_at": utcnow(),
        }  # fmt: skip

    async def _start(self, current: JobRecord, batched: Completion | None) -> JobRecord | None:
        def change(job: JobRecord) -> JobRecord:
            update = {
                "status": JobStatus.STARTED,
                "stage": JobStage.CALLING_LLM,
                "attempts": job.attempts + 1,
                "started_at": job.started_at or utcnow(),
                "model": self.provider.model,
                "trace": job_spans.own_trace(self.span, job),
            }
            if batched is not None:  # answered already: it goes on to VALIDATING
                update.update(stage=JobStage.PROVIDER_BATCH, model=batched.model, batch_usage=batched.usage)
            return job.model_copy(update=update)

        done = await self._write(change, current)
        if done.changed and done.record is not None:
            self._entered(done.record)
        return done.record if done.changed else None

    async def _fail(self, error: JobError) -> JobRecord | None:
        log.warning("job %s failed: %s: %s", self.job_id, error.code.value, error.message)
        return await self._set(
            status=JobStatus.FAILED, stage=JobStage.FAILED, error=error, usage=self.usage, finished_at=utcnow()
        )


def _token() -> str:
    """A step's token: the same on every try, so it lands once. 128 random bits from Python's
    generator (seeded from the OS, reseeded after a fork), not uuid4's os.urandom: a system
    call that hands the GIL to RQ's threads, and the loop waits to get it back."""
    return f"{random.getrandbits(128):032x}"
