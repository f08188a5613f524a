"""What a provider's rate-limit headers say about the next call.

OpenAI (and Azure OpenAI, Groq, Together and others after it) answer every call with
`x-ratelimit-remaining-requests` / `-tokens` and `x-ratelimit-reset-requests` / `-tokens`
(a duration: `1s`, `6m0s`, `20ms`, or plain seconds). When a budget is spent, every worker
waits for its reset before the next call (the shared pause, as for a 429's Retry-After)
instead of collecting the 429 first. A value that makes no sense (missing, negative, not a
number) says nothing: it never slows a call down.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# Go's time.Duration text, which OpenAI sends: one or more number+unit parts.
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
MAX_RESET_S = 24 * 3600.0  # past a day it is not a reset we should wait for


def duration_s(value: str) -> float | None:
    """Seconds in `1s`, `6m0s`, `1h2m3.5s`, `20ms` or `2.5`; None if it is none of those."""
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        parts = _PART.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            return None
        seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    return seconds if 0 <= seconds <= MAX_RESET_S else None


def spent_for_s(headers: Mapping[str, str]) -> float | None:
    """How long to wait before the next call, if a budget the provider reports is spent."""
    wait = None
    for kind in ("requests", "tokens"):
        remaining = headers.get(f"x-ratelimit-remaining-{kind}")
        reset = headers.get(f"x-ratelimit-reset-{kind}")
        if remaining is None or reset is None or remaining.strip() != "0":
            continue  # budget left, or nothing (sensible) said about it
        if (seconds := duration_s(reset)) is not None and seconds > 0:
            wait = max(wait or 0.0, seconds)
    return wait
