"""The circuit breaker of an LLM endpoint+model, when there are fallbacks to go to (LLM_FALLBACKS).

An endpoint+model that fails LLM_BREAKER_FAILURES calls in a row (a 5xx, no connection, a
timeout, a 429 that says nothing usable about when to come back) is open: every worker skips
it for LLM_BREAKER_OPEN_S and goes to the next fallback at once. Then it is half-open: one
call, cluster-wide, tries it again; an answer closes it, a failure opens it again.

The state lives in Redis (`keys.llm_breaker`) and is read and written in the steps the shared
limits take anyway (gql_service.worker.provider_limits): the check in the step that checks the
pause and takes the call's slot, the count in the step that gives the slot back. On the
healthy path, that is no round trip more than without a breaker. Times are Redis's own
(TIME), so hosts with skewed clocks agree on when a breaker half-opens.

"In a row" is counted across every worker: a failure adds one, an answer resets the count
(when the call found one to reset when it started: the step that takes the slot says so, so
a healthy endpoint's answers write nothing).
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass

from gql_service.models import JobErrorCode
from gql_service.worker.llm import LLMError

log = logging.getLogger(__name__)

# A 429 that says to come back within this long is waited out (a pause of every worker, the
# call tried again within its attempt); a longer or missing Retry-After is a failure.
MAX_PAUSE_S = 60.0


@dataclass(frozen=True)
class Breaker:
    failures: int  # LLM_BREAKER_FAILURES
    open_s: float  # LLM_BREAKER_OPEN_S


class Outcome(enum.Enum):
    ANSWERED = "ok"  # the endpoint answered (even a refusal or a cut-off answer): it works
    FAILED = "fail"  # what a fallback is for: counts towards opening the breaker
    NEITHER = "none"  # a usable 429 (a pause), a canceled call: says nothing about the endpoint


def falls_over(exc: LLMError) -> bool:
    """Whether the next fallback should be tried after `exc`: the endpoint failed, and another
    may not (5xx, connection, timeout, a stream that broke off, a 429 without a usable
    Retry-After). An invalid request or a refusal would fail anywhere."""
    return exc.retryable and not usable_pause(exc)


def usable_pause(exc: LLMError) -> bool:
    return exc.code is JobErrorCode.RATE_LIMITED and exc.retry_after_s is not None and exc.retry_after_s <= MAX_PAUSE_S


def outcome_of(exc: BaseException | None) -> Outcome:
    if exc is None:
        return Outcome.ANSWERED
    if isinstance(exc, LLMError):
        return Outcome.FAILED if falls_over(exc) else Outcome.NEITHER if usable_pause(exc) else Outcome.ANSWERED
    return Outcome.NEITHER


class BreakerOpen(LLMError):
    """The endpoint+model is skipped: its breaker is open (or half-open, with its one trial
    call out). Retryable: the next fallback is tried, or, after the last, the attempt is."""

    def __init__(self, endpoint: str) -> None:
        model = endpoint.rpartition("|")[2]
        super().__init__(JobErrorCode.PROVIDER_ERROR, f"{model}: skipped, its circuit breaker is open", retryable=True)


# Per process: endpoints known to be open, until when (monotonic). A call skips them without
# a round trip, and without taking from their LLM_RPM / LLM_TPM budget first.
_open_here: dict[str, float] = {}


def known_open(endpoint: str) -> bool:
    until = _open_here.get(endpoint)
    if until is None:
        return False
    if time.monotonic() < until:
        return True
    _open_here.pop(endpoint, None)  # half-open now: Redis decides which call tries it
    return False


def note_open(endpoint: str, for_ms: int) -> None:
    _open_here[endpoint] = time.monotonic() + for_ms / 1000


def opened(endpoint: str, breaker: Breaker) -> None:
    note_open(endpoint, int(breaker.open_s * 1000))
    log.warning(
        "LLM endpoint %s failed %d calls in a row (or its trial call): every worker skips it for %.0f s",
        endpoint, breaker.failures, breaker.open_s,
    )  # fmt: skip
