"""Settings, read once from the environment and `.env`, validated at start-up."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gql_service.budgets import Budget
from gql_service.fallback_settings import Fallback, parse_fallbacks
from gql_service.pricing import Price

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is: a server's URL, or sentinels and the name of the primary they watch.

    With sentinels, `url` gives only the primary's username, password and database.
    """

    url: str = field(default=DEFAULT_REDIS_URL, repr=False)  # it may hold a password
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = "mymaster"
    sentinel_password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        # For logs and messages: never a password.
        if self.sentinels:
            where = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"sentinel {where}, primary {self.master!r}"
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


@dataclass(frozen=True)
class ReplicaAck:
    """A write counts once this many replicas have it (Redis WAIT), within `timeout_ms`."""

    replicas: int
    timeout_ms: int


class SettingsError(Exception):
    """Raised with one human-readable line per bad setting."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    redis_url: str | None = None
    # Redis behind Sentinel: `host:port,host:port`; the primary named REDIS_SENTINEL_MASTER is
    # found through them (REDIS_URL then gives only its password and database).
    redis_sentinels: str | None = None
    redis_sentinel_master: str = Field("mymaster", min_length=1)
    redis_sentinel_password: SecretStr | None = Field(None, repr=False)
    # Submissions (and jobs' ends) answer only once this many replicas have their writes
    # (Redis WAIT); 0: as soon as the primary has them.
    redis_min_replicas_acked: int = Field(0, ge=0, le=16)
    redis_replica_ack_timeout_ms: int = Field(1000, ge=1, le=60_000)
    # How often the workers look for jobs whose queue entry is gone (a failover lost it),
    # and how long such a job's record must have stood still before it is queued again.
    reconcile_interval_s: float = Field(30.0, gt=0, le=3600)
    # The PostgreSQL job history (postgresql://…). Unset: jobs live in Redis only.
    database_url: str | None = None
    # Whether the history keeps each job's submitted text.
    archive_text: bool = True
    # Ended jobs older than this are deleted from the history (hourly).
    archive_retention_days: int = Field(30, ge=1, le=36_500)
    # An archive batch a worker took and did not confirm (it died) is taken over by another
    # worker after this long.
    archive_claim_after_s: float = Field(30.0, gt=0)
    # An outbox entry (archive, webhooks) taken this many times and never done is moved to
    # its outbox's dead letters (`gql-service outbox`), so it can't hold up the ones after it.
    outbox_max_deliveries: int = Field(5, ge=1, le=1000)
    # A safety bound on each outbox stream (and its dead letters), applied as XADD MAXLEN ~:
    # past it, the oldest entries are dropped rather than Redis's memory filling up.
    outbox_max_len: int = Field(1_000_000, ge=1000)
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
    # ECONOMY batches (gql_service.worker.economy): their waiting jobs are sent when the batch
    # closes, ECONOMY_FLUSH_S after the first came, or once ECONOMY_MAX_REQUESTS wait; each
    # provider batch is read every ECONOMY_POLL_S; what it does not answer runs interactively
    # (or FAILS, ECONOMY_FALLBACK=fail).
    economy_flush_s: float = Field(300.0, gt=0, le=24 * 3600)
    economy_max_requests: int = Field(50_000, ge=1, le=50_000)
    economy_poll_s: float = Field(30.0, gt=0, le=3600)
    economy_fallback: Literal["interactive", "fail"] = "interactive"
    # What a provider batch's tokens cost, as a share of LLM_PRICES (OpenAI's: half).
    llm_batch_discount: float = Field(0.5, ge=0, le=1)
    # The offline provider's batches end this long after they are made.
    offline_batch_delay_ms: float = Field(2000.0, ge=0, le=3_600_000)
    llm_max_attempts: int = Field(3, ge=1, le=20)
    # Seconds before the first retry of a transient LLM failure; doubles each time.
    retry_backoff_s: float = Field(2.0, ge=0)
    # The most LLM calls open at once across every worker process and host (unset: no limit).
    llm_max_in_flight: int | None = Field(None, ge=1)
    # Requests and tokens per minute for the LLM endpoint, across every worker (unset: none).
    llm_rpm: int | None = Field(None, ge=1)
    llm_tpm: int | None = Field(None, ge=1)
    # Other OpenAI-compatible endpoints+models, tried in order within an attempt when the one
    # before fails transiently (JSON list; see parse_fallbacks). Unset: no fallback, no breaker.
    llm_fallbacks: str | None = Field(None, repr=False)
    # With fallbacks: an endpoint+model that fails this many calls in a row is skipped by
    # every worker for LLM_BREAKER_OPEN_S, then one call tries it again (half-open).
    llm_breaker_failures: int = Field(5, ge=1, le=1000)
    llm_breaker_open_s: float = Field(30.0, gt=0, le=24 * 3600)
    job_timeout_s: int = Field(180, gt=0)
    result_ttl_s: int = Field(7 * 24 * 3600, gt=0)
    # How long RQ keeps its own job entries; the job record (RESULT_TTL_S) is what clients read.
    rq_result_ttl_s: int = Field(3600, ge=0)
    max_text_chars: int = Field(20_000, gt=0, le=1_000_000)
    idempotency_ttl_s: int = Field(24 * 3600, gt=0)
    # A job whose worker died is noticed this long after its last heartbeat, then retried.
    worker_lost_after_s: int = Field(60, ge=3)
    # A worker started while Redis can't be reached waits this long for it (a log line per
    # attempt), then exits 2: Redis and workers often start together under a supervisor.
    worker_start_timeout_s: float = Field(120.0, ge=0)
    # async: many jobs at once per process on one event loop; fork: a work horse process per
    # job (RQ's Worker); simple: one job at a time in the worker itself (RQ's SimpleWorker).
    worker_class: Literal["async", "fork", "simple"] = "async"
    # The most jobs of one tenant queued for or running on the workers at once, cluster-wide
    # (unset: no cap); the rest wait as QUEUED and go in oldest first as slots free.
    tenant_max_in_flight: int | None = Field(None, ge=1)
    # Jobs one async worker process runs at once (`gql-service worker --concurrency`).
    worker_concurrency: int = Field(64, ge=1, le=10_000)
    # Of every this many jobs a worker takes, the last looks at LOW's queue first and the
    # middle one at NORMAL's, so neither starves behind HIGH (gql_service.worker.priorities).
    priority_share_every: int = Field(10, ge=3, le=1000)
    # API keys as JSON, key -> tenant. Unset: the service is open (one tenant, "public").
    api_keys: dict[str, str] | None = Field(None, repr=False)
    # Budgets as JSON, tenant -> {"tokensPerDay": N, "tokensPerMonth": N, "costPerMonthUsd": X}
    # ("*": every tenant not named). A tenant whose budget is spent can't submit until it
    # resets (gql_service.budgets). Unset: no budgets.
    tenant_budgets: dict[str, Budget] | None = None
    # Prices as JSON, model -> {"inputPerMTok": X, "outputPerMTok": Y, "cachedInputPerMTok": Z}
    # (USD per million tokens): a job's costUsd, and costPerMonthUsd budgets (gql_service.pricing).
    llm_prices: dict[str, Price] | None = None
    max_body_bytes: int = Field(1_048_576, ge=1024)
    # Automatic persisted queries (Apollo's protocol): on, kept in Redis this long, at most
    # this many documents of at most this many bytes each (gql_service/api/documents.py).
    apq: bool = True
    apq_ttl_s: int = Field(24 * 3600, gt=0)
    apq_max_documents: int = Field(1000, ge=1, le=1_000_000)
    apq_max_document_bytes: int = Field(16_384, ge=256, le=1_048_576)
    # Trusted documents: manifest files ({"<sha256 hex>": "<document>"}), comma-separated.
    trusted_documents: str | None = None
    # Run nothing but those (a full document must be one of them) ...
    trusted_documents_only: bool = False
    # ... and only when named by their id (a full document is refused even if trusted).
    trusted_documents_require_id: bool = False
    # Except for this service's own pages (the playground and the console: same Origin).
    trusted_documents_allow_playground: bool = False
    max_subscriptions_per_connection: int = Field(100, ge=1)
    # graphql-sse's single connection mode: event streams one tenant may have reserved at
    # once per API process (open or not), and how long a reserved stream may wait to be opened.
    max_sse_reservations_per_tenant: int = Field(100, ge=1)
    sse_reservation_ttl_s: float = Field(30.0, gt=0)
    ws_init_timeout_s: float = Field(10.0, gt=0)
    # A connection must send a whole request head (request line and headers) within this long
    # of opening, or of its previous response's end; else it is closed (gql_service/api/edge.py).
    header_timeout_s: float = Field(10.0, gt=0, le=3600)
    # Connections one API process holds at once, websockets and streams included. Unset: what
    # the file limit (ulimit -n) allows, less a reserve for everything else the process opens.
    max_connections: int | None = Field(None, ge=1)
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
    # Webhooks (`webhookUrl`): the Standard Webhooks signing secret, `whsec_` + base64 of
    # 24 to 64 random bytes (`gql-service webhook-secret` makes one). Unset: webhooks are off.
    webhook_secret: SecretStr | None = Field(None, repr=False)
    # A delivery counts when the receiver answers 2xx within this long.
    webhook_timeout_s: float = Field(10.0, gt=0, le=300)
    # The first retry waits about this long, each next one five times longer (with jitter).
    webhook_retry_base_s: float = Field(5.0, ge=1, le=3600)
    # Attempts in all before a delivery is FAILED (the default 8 span about 17 hours).
    webhook_max_attempts: int = Field(8, ge=1, le=20)
    # Allow webhook URLs that resolve to loopback, private or link-local addresses.
    webhook_allow_private: bool = False
    # Deliveries one async worker process runs at once, besides its LLM jobs.
    webhook_concurrency: int = Field(16, ge=1, le=1000)
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

    @field_validator("openai_api_key")
    @classmethod
    def _check_api_key(cls, value: SecretStr | None) -> SecretStr | None:
        # It goes in an HTTP header, which holds printable ASCII only: a key pasted with a
        # typographic character (the README's "sk-…") made every call fail unsent.
        if value is not None and not _header_safe(value.get_secret_value()):
            raise ValueError(HEADER_UNSAFE)
        return value

    @field_validator("llm_fallbacks")
    @classmethod
    def _check_fallbacks(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None  # LLM_FALLBACKS= (empty): unset
        if value is not None:
            parse_fallbacks(value)
        return value

    @model_validator(mode="after")
    def _fallbacks_have_keys(self) -> Settings:
        if any(f.api_key is None for f in self.fallbacks) and not self.openai_api_key:
            raise ValueError("LLM_FALLBACKS: an entry without apiKeyEnv needs OPENAI_API_KEY")
        return self

    @cached_property
    def fallbacks(self) -> tuple[Fallback, ...]:
        """LLM_FALLBACKS, parsed (checked at start-up)."""
        return parse_fallbacks(self.llm_fallbacks) if self.llm_fallbacks else ()

    @field_validator("redis_sentinels")
    @classmethod
    def _check_sentinels(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None  # REDIS_SENTINELS= (empty): unset
        if value is not None:
            _sentinel_addresses(value)
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            raw = value.get_secret_value()
            try:
                key = base64.b64decode(raw.removeprefix("whsec_"), validate=True)
            except ValueError:
                key = b""
            if not raw.startswith("whsec_") or not 24 <= len(key) <= 64:
                raise ValueError("must be whsec_ followed by base64 of 24 to 64 bytes (gql-service webhook-secret)")
        return value

    @model_validator(mode="after")
    def _ack_within_redis_timeout(self) -> Settings:
        # The API bounds each Redis operation by REDIS_TIMEOUT_S, and a submission's WAIT
        # comes after its reads and its MULTI: it may take half of that at most.
        if self.redis_min_replicas_acked and self.redis_replica_ack_timeout_ms > self.redis_timeout_s * 500:
            raise ValueError("REDIS_REPLICA_ACK_TIMEOUT_MS must be at most half of REDIS_TIMEOUT_S")
        if self.redis_sentinels and (self.redis_url or "").startswith("rediss://"):
            # redis-py's Sentinel pools would take the TLS settings of neither side from it.
            raise ValueError("REDIS_URL rediss:// (TLS) is not supported with REDIS_SENTINELS")
        return self

    @property
    def trusted_document_paths(self) -> list[str]:
        return [path.strip() for path in (self.trusted_documents or "").split(",") if path.strip()]

    @model_validator(mode="after")
    def _trusted_documents_named(self) -> Settings:
        if (self.trusted_documents_only or self.trusted_documents_require_id) and not self.trusted_document_paths:
            raise ValueError(
                "TRUSTED_DOCUMENTS_ONLY and TRUSTED_DOCUMENTS_REQUIRE_ID need TRUSTED_DOCUMENTS (manifest files)"
            )
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
    def redis_target(self) -> RedisTarget:
        """Where Redis is, as every client of it is built (gql_service.redis_conn)."""
        url = self.redis_url or DEFAULT_REDIS_URL
        if not self.redis_sentinels:
            return RedisTarget(url=url)
        password = self.redis_sentinel_password.get_secret_value() if self.redis_sentinel_password else None
        return RedisTarget(
            url=url,
            sentinels=_sentinel_addresses(self.redis_sentinels),
            master=self.redis_sentinel_master,
            sentinel_password=password,
        )

    @property
    def replica_ack(self) -> ReplicaAck | None:
        """What submissions and jobs' ends wait for (None: the primary's answer alone)."""
        if not self.redis_min_replicas_acked:
            return None
        return ReplicaAck(self.redis_min_replicas_acked, self.redis_replica_ack_timeout_ms)

    @property
    def provider(self) -> Literal["openai", "offline"]:
        assert self.llm_provider is not None
        return self.llm_provider


def _sentinel_addresses(value: str) -> tuple[tuple[str, int], ...]:
    addresses = []
    for item in value.split(","):
        host, _, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"must be host:port pairs separated by commas, got {item.strip()!r}")
        addresses.append((host, int(port)))
    return tuple(addresses)


HEADER_UNSAFE = "holds a character an HTTP header can't carry (a typographic dash or ellipsis, pasted?)"


def _header_safe(key: str) -> bool:
    return key.isascii() and key.isprintable() and key == key.strip()


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
