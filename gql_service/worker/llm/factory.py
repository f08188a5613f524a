"""Pick and build the provider the settings ask for."""

from __future__ import annotations

from gql_service.settings import Settings
from gql_service.worker.llm.base import Provider


def make_fallbacks(settings: Settings) -> tuple[Provider, ...]:
    """LLM_FALLBACKS, each an `openai` provider (any OpenAI-compatible endpoint); an entry's
    unset baseUrl and apiKeyEnv are the primary's (OPENAI_BASE_URL, OPENAI_API_KEY)."""
    if not settings.fallbacks:
        return ()
    from gql_service.worker.llm.openai_provider import OpenAIProvider, make_client

    primary_key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    providers: list[Provider] = []
    for entry in settings.fallbacks:
        api_key = entry.api_key or primary_key
        assert api_key is not None  # enforced by Settings
        base_url = entry.base_url or settings.openai_base_url
        client = make_client(api_key=api_key, base_url=base_url, timeout_s=settings.llm_timeout_s)
        providers.append(OpenAIProvider(client, model=entry.model, stream=settings.llm_stream))
    return tuple(providers)


def make_provider(settings: Settings) -> Provider:
    if settings.provider == "openai":
        from gql_service.worker.llm.openai_provider import OpenAIProvider, make_client

        assert settings.openai_api_key is not None  # enforced by Settings
        client = make_client(
            api_key=settings.openai_api_key.get_secret_value(),
            base_url=settings.openai_base_url,
            timeout_s=settings.llm_timeout_s,
        )
        return OpenAIProvider(client, model=settings.openai_model, stream=settings.llm_stream)
    from gql_service.worker.llm.offline import OfflineProvider

    return OfflineProvider(stream_delay_s=settings.offline_stream_delay_ms / 1000)
