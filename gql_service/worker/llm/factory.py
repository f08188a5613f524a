"""Pick and build the provider the settings ask for."""

from __future__ import annotations

from gql_service.settings import Settings
from gql_service.worker.llm.base import Provider


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
