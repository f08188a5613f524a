"""The endpoints+models one attempt may ask, in order: the primary, then each of
LLM_FALLBACKS, each with the shared limits of its own (gql_service.worker.provider_limits).

The pipeline (gql_service.worker.pipeline `Attempt._ask`) goes to the next one, within the
same attempt, when one fails in a way another may not; its circuit breaker
(gql_service.worker.breaker) makes every worker skip one that keeps failing.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from gql_service.fallback_settings import Fallback
from gql_service.settings import Settings
from gql_service.worker.breaker import Breaker
from gql_service.worker.llm import Provider
from gql_service.worker.provider_limits import ProviderLimits


@dataclass(frozen=True)
class Route:
    provider: Provider
    limits: ProviderLimits | None


def routes(redis: Redis, settings: Settings, primary: Provider, fallbacks: tuple[Provider, ...]) -> list[Route]:
    """The primary and the fallbacks with their limits: LLM_MAX_IN_FLIGHT, LLM_RPM and LLM_TPM
    apply to each endpoint+model on its own, unless its LLM_FALLBACKS entry sets its own. The
    breaker is on only when there is somewhere else to go."""
    breaker = Breaker(settings.llm_breaker_failures, settings.llm_breaker_open_s) if fallbacks else None
    own: tuple[Fallback | None, ...] = (None, *settings.fallbacks)

    def limits(provider: Provider, entry: Fallback | None) -> ProviderLimits:
        mine = entry or Fallback(model=provider.model)  # the primary: the settings' own

        def pick(own: int | None, default: int | None) -> int | None:
            return own if own is not None else default

        return ProviderLimits(
            redis,
            endpoint=provider.endpoint,
            max_in_flight=pick(mine.max_in_flight, settings.llm_max_in_flight),
            call_timeout_s=settings.llm_timeout_s,
            rpm=pick(mine.rpm, settings.llm_rpm),
            tpm=pick(mine.tpm, settings.llm_tpm),
            breaker=breaker,
        )

    return [Route(p, limits(p, entry)) for p, entry in zip((primary, *fallbacks), own, strict=True)]
