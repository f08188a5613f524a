"""Settings, read once from the environment and `.env`, validated at start-up."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(Exception):
    """Raised with one human-readable line per bad setting."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    redis_url: str | None = None
    # The PostgreSQL job history (postgresql://…). Unset: jobs live in Redis only.
    database_url: str | None = None
    # Whether the history keeps each job's submitted text.
    archive_text: bool = True
    # Ended jobs older than this are deleted from the history (hourly).
    archive_retention_days: int = Field(30, ge=1, le=36_500)
    # An archive batch a worker took and did not confirm (it died) is taken over by another
    # worker after this long.
    archive_claim_after_s: float = Field(30.0, gt=0)
    # The port of the Redis that `dev` starts when REDIS_URL is unset; unset: any free port.
    embedded_redis_port: int | None = Field(None, ge=1, le=65535)
    rq_queue: str = Field("llm", min_length=1)
    llm_provider: Literal["openai", "offline"] | None = None
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    openai_model: str = Field("gpt-4o-mini", min_length=1)
    llm_timeout_s: float = Field(60.0, gt=0)
    # Ask the LLM for a streamed answer, so subscribers can watch it form (`partial: true`).
    llm_stream: bool = True
    # Interim frames of one job go out at most this often (the latest text wins).
    partial_interval_ms: int = Field(100, ge=0, le=60_000)
    # The offline provider reveals its answer a piece (about a word) every this many ms;
    # 0: all at once. `dev` sets 20 when unset, so the console shows it being written.
    offline_stream_delay_ms: float = Field(0.0, ge=0, le=10_000)
    llm_max_attempts: int = Field(3, ge=1, le=20)
    # Seconds before the first retry of a transient LLM failure; doubles each time.
    retry_backoff_s: float = Field(2.0, ge=0)
    # The most LLM calls open at once across every worker process and host (unset: no limit).
    llm_max_in_flight: int | None = Field(None, ge=1)
    # Requests and tokens per minute for the LLM endpoint, across every worker (unset: none).
    llm_rpm: int | None = Field(None, ge=1)
    llm_tpm: int | None = Field(None, ge=1)
    job_timeout_s: int = Field(180, gt=0)
    result_ttl_s: int = Field(7 * 24 * 3600, gt=0)
    # How long RQ keeps its own job entries; the job record (RESULT_TTL_S) is what clients read.
    rq_result_ttl_s: int = Field(3600, ge=0)
    max_text_chars: int = Field(20_000, gt=0, le=1_000_000)
    idempotency_ttl_s: int = Field(24 * 3600, gt=0)
    # A job whose worker died is noticed this long after its last heartbeat, then retried.
    worker_lost_after_s: int = Field(60, ge=3)
    # async: many jobs at once per process on one event loop; fork: a work horse process per
    # job (RQ's Worker); simple: one job at a time in the worker itself (RQ's SimpleWorker).
    worker_class: Literal["async", "fork", "simple"] = "async"
    # The most jobs of one tenant queued for or running on the workers at once, cluster-wide
    # (unset: no cap); the rest wait as QUEUED and go in oldest first as slots free.
    tenant_max_in_flight: int | None = Field(None, ge=1)
    # Jobs one async worker process runs at once (`gql-service worker --concurrency`).
    worker_concurrency: int = Field(64, ge=1, le=10_000)
    # API keys as JSON, key -> tenant. Unset: the service is open (one tenant, "public").
    api_keys: dict[str, str] | None = Field(None, repr=False)
    max_body_bytes: int = Field(1_048_576, ge=1024)
    max_subscriptions_per_connection: int = Field(100, ge=1)
    ws_init_timeout_s: float = Field(10.0, gt=0)
    # The most one API operation waits on Redis (a connection from the pool included):
    # an unreachable or hung Redis is SERVICE_UNAVAILABLE after this, never a hang.
    redis_timeout_s: float = Field(2.0, gt=0)
    # Jobs one tenant may watch at once over subscriptions, per API process (jobUpdates
    # counts 1, jobsUpdates its number of ids).
    max_watched_jobs_per_tenant: int = Field(1000, ge=1)
    # The pub/sub link is pinged after this long without traffic; no answer within as long
    # again counts as a drop (a half-open TCP connection, a hung Redis).
    pubsub_health_check_s: float = Field(5.0, gt=0)
    # Command connections per API process (pub/sub has one more of its own). Requests share
    # them; a burst waits for a free one rather than opening more.
    redis_max_connections: int = Field(2, ge=1, le=1000)
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _pick_provider(self) -> Settings:
        # Decision 5: real LLM when a key is configured, the offline one otherwise.
        if self.llm_provider is None:
            provider = "openai" if self.openai_api_key else "offline"
            object.__setattr__(self, "llm_provider", provider)
        if self.llm_provider == "openai" and not self.openai_api_key:
            raise ValueError("LLM_PROVIDER=openai needs OPENAI_API_KEY")
        return self

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            if not value:
                raise ValueError("API_KEYS must map at least one key to a tenant")
            if any(len(k) < 8 or not t.strip() for k, t in value.items()):
                raise ValueError("every API key needs 8+ characters and a non-empty tenant")
        return value

    @property
    def provider(self) -> Literal["openai", "offline"]:
        assert self.llm_provider is not None
        return self.llm_provider


def load_settings(**overrides: object) -> Settings:
    """Build the settings or raise SettingsError with one line per bad value."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = "_".join(str(p) for p in err["loc"]).upper() or "SETTINGS"
            lines.append(f"{name}: {err['msg']}")  # never err["input"]: it may be a secret
        raise SettingsError("\n".join(lines)) from None
