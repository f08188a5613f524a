"""LLM_FALLBACKS: the endpoints and models tried, in order, when the one before fails,
read from one JSON setting (gql_service.settings reads it once, at start-up)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Fallback:
    """An LLM endpoint+model tried when the one before it fails (LLM_FALLBACKS): any
    OpenAI-compatible endpoint, with limits of its own (unset: LLM_MAX_IN_FLIGHT, LLM_RPM
    and LLM_TPM apply to it as to the primary, counted separately)."""

    model: str
    base_url: str | None = None  # None: OPENAI_BASE_URL
    api_key: str | None = field(default=None, repr=False)  # None: OPENAI_API_KEY
    max_in_flight: int | None = None
    rpm: int | None = None
    tpm: int | None = None


_FALLBACK_FIELDS = {"model", "baseUrl", "apiKeyEnv", "maxInFlight", "rpm", "tpm"}


HEADER_UNSAFE = "holds a character an HTTP header can't carry (a typographic dash or ellipsis, pasted?)"


def header_safe(key: str) -> bool:
    """Whether an API key can go in an HTTP header as it is (printable ASCII, no padding)."""
    return key.isascii() and key.isprintable() and key == key.strip()


def parse_fallbacks(value: str) -> tuple[Fallback, ...]:
    """LLM_FALLBACKS, a JSON list of {"model", "baseUrl", "apiKeyEnv", "maxInFlight", "rpm",
    "tpm"} (all but `model` optional); raises ValueError saying what is wrong, in one line
    that never holds a key."""
    try:
        items = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(items, list):
        raise ValueError('must be a JSON list of {"model": ..., "baseUrl": ..., "apiKeyEnv": ...}')
    fallbacks = []
    for n, item in enumerate(items):
        where = f"entry {n}"
        if not isinstance(item, dict):
            raise ValueError(f"{where} is not an object")
        if unknown := sorted(set(item) - _FALLBACK_FIELDS):
            raise ValueError(f"{where}: unknown field {unknown[0]!r}")
        model, base_url, key_env = item.get("model"), item.get("baseUrl"), item.get("apiKeyEnv")
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"{where} needs a model")
        if base_url is not None and (not isinstance(base_url, str) or not base_url.startswith(("http://", "https://"))):
            raise ValueError(f"{where}: baseUrl must be an http(s) URL")
        api_key = None
        if key_env is not None:
            if not isinstance(key_env, str) or not os.environ.get(key_env):
                # Read from the process's environment only (not .env): the key is a secret
                # the deployment provides, as OPENAI_API_KEY usually is.
                raise ValueError(f"{where}: apiKeyEnv names {key_env!r}, which is not set")
            api_key = os.environ[key_env]
            if not header_safe(api_key):
                raise ValueError(f"{where}: the key in {key_env} {HEADER_UNSAFE}")
        limits = {}
        for name in ("maxInFlight", "rpm", "tpm"):
            number = item.get(name)
            if number is not None and (not isinstance(number, int) or isinstance(number, bool) or number < 1):
                raise ValueError(f"{where}: {name} must be a whole number of at least 1")
            limits[name] = number
        fallbacks.append(Fallback(model, base_url, api_key, limits["maxInFlight"], limits["rpm"], limits["tpm"]))
    return tuple(fallbacks)
