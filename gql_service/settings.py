"""Settings, read once from the environment and `.env`, validated at start-up.

Each field's docstring is its description in the settings reference, which docsgen/settings_ref.py
generates from this model (reading the docstrings from this file's source at build time: the
service itself never parses them), and its marker says which processes read it.
"""

from __future__ import annotations

import base64
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gql_service.budgets import Budget
from gql_service.fallback_settings import HEADER_UNSAFE, Fallback, header_safe, parse_fallbacks
from gql_service.pricing import Price
from gql_service.redis_target import DEFAULT_REDIS_URL, sentinel_addresses
from gql_service.redis_target import RedisTarget as RedisTarget
from gql_service.redis_target import ReplicaAck as ReplicaAck

ReadBy = Literal["api", "worker", "both", "all", "dev"]  # both: the API and the workers; all: every command too


def read_by(process: ReadBy, *, default: str | None = None) -> Any:
    """A setting's marker (`Annotated[int, WORKER]`): the processes that read it, and what its
    default means where the value alone does not say (`default`, shown beside it)."""
    extra: dict[str, Any] = {"read_by": process}
    if default is not None:
        extra["default_note"] = default
    return Field(json_schema_extra=extra)


API, WORKER, BOTH, ALL = read_by("api"), read_by("worker"), read_by("both"), read_by("all")


class SettingsError(Exception):
    """Raised with one human-readable line per bad setting."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    database_url: Annotated[str | None, BOTH] = None
    """The PostgreSQL job history (see Job history); unset: jobs live in Redis only."""
    archive_text: Annotated[bool, WORKER] = True
    """Whether the history keeps each job's submitted text."""
    archive_retention_days: Annotated[int, WORKER] = Field(30, ge=1, le=36_500)
    """Rows of jobs that ended longer ago are deleted, hourly."""
    archive_claim_after_s: Annotated[float, BOTH] = Field(30.0, gt=0)
    """A batch a dead worker took from an outbox (archive, webhooks) is taken over after this long; `/readyz` says the
    archive lags past twice this.
    """
    outbox_max_deliveries: Annotated[int, WORKER] = Field(5, ge=1, le=1000)
    """An outbox entry taken this many times and never done goes to the outbox's dead letters (see Outboxes)."""
    outbox_max_len: Annotated[int, BOTH] = Field(1_000_000, ge=1000)
    """The bound on each outbox stream and its dead letters (`XADD MAXLEN ~`): past it, the oldest entries are dropped.
    """
    webhook_secret: Annotated[SecretStr | None, read_by("both", default="webhooks off")] = Field(None, repr=False)
    """The Standard Webhooks signing secret, `whsec_` + base64 of 24-64 random bytes (`gql-service webhook-secret`);
    needed for `webhookUrl` (see Webhooks).
    """
    webhook_timeout_s: Annotated[float, WORKER] = Field(10.0, gt=0, le=300)
    """A delivery counts when the receiver answers 2xx within this."""
    webhook_retry_base_s: Annotated[float, WORKER] = Field(5.0, ge=1, le=3600)
    """The first retry's wait; each next one is five times longer (±20 %, at most 12 h)."""
    webhook_max_attempts: Annotated[int, WORKER] = Field(8, ge=1, le=20)
    """Attempts in all before a delivery is `FAILED` (8 span about 17 h: seven waits of 5 s, 25 s, 2 min, 10 min, 52
    min, 4.3 h and 12 h, the cap on one wait, each ±20 %).
    """
    webhook_allow_private: Annotated[bool, BOTH] = False
    """Allow webhook URLs that resolve to loopback, private or link-local addresses."""
    webhook_concurrency: Annotated[int, WORKER] = Field(16, ge=1, le=1000)
    """Deliveries one `async` worker process runs at once, besides its LLM jobs."""
    redis_url: Annotated[str | None, ALL] = None
    """Redis to use. Unset (and no `REDIS_SENTINELS`): `dev` starts an embedded one; `serve` and `worker` use
    `redis://127.0.0.1:6379/0`.
    """
    embedded_redis_port: Annotated[int | None, read_by("dev", default="a free port")] = Field(None, ge=1, le=65535)
    """Port of the Redis `dev` starts when `REDIS_URL` is unset."""
    redis_sentinels: Annotated[str | None, ALL] = None
    """`host:port,host:port`: find the primary through these sentinels (see Redis with Sentinel); `REDIS_URL` then
    gives only the primary's password and database.
    """
    redis_sentinel_master: Annotated[str, ALL] = Field("mymaster", min_length=1)
    """The name the sentinels monitor the primary under."""
    redis_sentinel_password: Annotated[SecretStr | None, ALL] = Field(None, repr=False)
    """The sentinels' own password (`requirepass` in sentinel.conf)."""
    redis_min_replicas_acked: Annotated[int, BOTH] = Field(0, ge=0, le=16)
    """Submissions (and jobs' ends) wait until this many replicas have their writes; not confirmed in time:
    `SERVICE_UNAVAILABLE`.
    """
    redis_replica_ack_timeout_ms: Annotated[int, BOTH] = Field(1000, ge=1, le=60_000)
    """How long that wait may take; at most half of `REDIS_TIMEOUT_S` (to raise it, raise that too)."""
    reconcile_interval_s: Annotated[float, WORKER] = Field(30.0, gt=0, le=3600)
    """How often the reconciler looks for jobs whose RQ entry is gone (a failover), and how long such a job must have
    stood still.
    """
    rq_queue: Annotated[str, BOTH] = Field("llm", min_length=1)
    """The RQ queue `NORMAL` jobs go on; `HIGH` ones go on `<RQ_QUEUE>-high`, `LOW` ones on `<RQ_QUEUE>-low`,
    deliveries on `<RQ_QUEUE>-webhooks` (not a namespace: two deployments need a Redis, or a database number, each,
    as they share every other key, outboxes included).
    """
    priority_share_every: Annotated[int, WORKER] = Field(10, ge=3, le=1000)
    """Of every this many jobs a worker process takes, the last looks at the `LOW` queue first and the middle one at
    `NORMAL`'s, so neither starves behind `HIGH` (3: the three in turn; see Priorities).
    """
    llm_provider: Annotated[
        Literal["openai", "offline"] | None,
        read_by("worker", default="then `openai` if `OPENAI_API_KEY` is set, else `offline`"),
    ] = None
    """Which provider the workers use."""
    openai_api_key: Annotated[SecretStr | None, WORKER] = None
    """Key for the `openai` provider."""
    openai_base_url: Annotated[str | None, read_by("worker", default="OpenAI's API")] = None
    """Any OpenAI-compatible endpoint."""
    openai_model: Annotated[str, WORKER] = Field("gpt-4o-mini", min_length=1)
    """Model name sent to the endpoint."""
    llm_timeout_s: Annotated[float, WORKER] = Field(60.0, gt=0)
    """One LLM call is cut after this."""
    llm_stream: Annotated[bool, WORKER] = True
    """Ask the endpoint for a streamed answer (`stream=True` with usage), so `partial: true` subscribers watch it form;
    `false` for an endpoint that can't stream.
    """
    partial_interval_ms: Annotated[int, WORKER] = Field(100, ge=0, le=60_000)
    """Interim frames of one job go out at most this often; the latest text wins."""
    offline_stream_delay_ms: Annotated[float, read_by("worker", default="`dev`: `20`")] = Field(0.0, ge=0, le=10_000)
    """The offline provider reveals its answer a word every this many ms; `0`: all at once."""
    offline_batch_delay_ms: Annotated[float, WORKER] = Field(2000.0, ge=0, le=3_600_000)
    """The offline provider's batches (ECONOMY) end this long after they are made, their count rising meanwhile."""
    economy_flush_s: Annotated[float, WORKER] = Field(300.0, gt=0, le=24 * 3600)
    """An ECONOMY batch's waiting jobs are sent this long after the first came, if the batch is not closed before."""
    economy_max_requests: Annotated[int, WORKER] = Field(50_000, ge=1, le=50_000)
    """The most requests in one provider batch (OpenAI's limit); this many waiting are sent at once."""
    economy_poll_s: Annotated[float, read_by("worker", default="`dev`: `1`")] = Field(30.0, gt=0, le=3600)
    """How often each provider batch is read (and due batches looked for)."""
    economy_fallback: Annotated[Literal["interactive", "fail"], WORKER] = "interactive"
    """What becomes of a request a provider batch did not answer (an error line, expired, missing, the batch failed):
    `interactive` runs it again as an ordinary job; `fail` ends it `FAILED`.
    """
    llm_batch_discount: Annotated[float, WORKER] = Field(0.5, ge=0, le=1)
    """What a provider batch's tokens cost, as a share of `LLM_PRICES`."""
    llm_max_attempts: Annotated[int, WORKER] = Field(3, ge=1, le=20)
    """Attempts for transient LLM failures."""
    retry_backoff_s: Annotated[float, WORKER] = Field(2.0, ge=0)
    """Wait before the first retry; doubles each time."""
    llm_max_in_flight: Annotated[int | None, read_by("worker", default="no limit")] = Field(None, ge=1)
    """The most LLM calls open at once across every worker process and host (leases in Redis; a killed worker's lease
    expires after `LLM_TIMEOUT_S` + 30 s).
    """
    llm_rpm: Annotated[int | None, read_by("worker", default="no limit")] = Field(None, ge=1)
    """Requests per minute to the LLM endpoint across every worker process and host."""
    llm_tpm: Annotated[int | None, read_by("worker", default="no limit")] = Field(None, ge=1)
    """Tokens per minute to the LLM endpoint across every worker process and host (estimated before a call, corrected
    after).
    """
    llm_fallbacks: Annotated[str | None, read_by("worker", default="no fallback, no breaker")] = Field(None, repr=False)
    """JSON list of OpenAI-compatible endpoints+models tried in order, within the same attempt, when the one before
    fails transiently: `[{"model": "gpt-4.1-mini", "baseUrl": "https://…/v1", "apiKeyEnv": "BACKUP_KEY",
    "maxInFlight": 20, "rpm": 500, "tpm": 200000}]`, all but `model` optional (see Fallbacks and the circuit
    breaker).
    """
    llm_breaker_failures: Annotated[int, WORKER] = Field(5, ge=1, le=1000)
    """With `LLM_FALLBACKS`: an endpoint+model failing this many calls in a row is skipped by every worker …"""
    llm_breaker_open_s: Annotated[float, WORKER] = Field(30.0, gt=0, le=24 * 3600)
    """… for this long; then one call, cluster-wide, tries it again (half-open)."""
    job_timeout_s: Annotated[int, WORKER] = Field(180, gt=0)
    """An attempt running longer than this ends `FAILED` `TIMEOUT` (per job, in every worker class)."""
    tenant_max_in_flight: Annotated[int | None, read_by("api", default="no cap")] = Field(None, ge=1)
    """The most jobs of one tenant queued for or running on the workers at once, cluster-wide (RQ's concurrency
    `RateLimit`); the rest wait as `QUEUED`, oldest first, a `HIGH` job counted a minute older and a `LOW` one a
    minute younger.
    """
    result_ttl_s: Annotated[int, read_by("both", default="7 days")] = Field(7 * 24 * 3600, gt=0)
    """How long a job and its result are kept."""
    rq_result_ttl_s: Annotated[int, API] = Field(3600, ge=0)
    """How long RQ keeps its own entries (clients never read them)."""
    max_text_chars: Annotated[int, API] = Field(20_000, gt=0, le=1_000_000)
    """Longest text accepted."""
    idempotency_ttl_s: Annotated[int, API] = Field(24 * 3600, gt=0)
    """How long an `idempotencyKey` maps to its job."""
    worker_lost_after_s: Annotated[int, WORKER] = Field(60, ge=3)
    """A job whose worker died is noticed this long after its last heartbeat."""
    worker_start_timeout_s: Annotated[float, WORKER] = Field(120.0, ge=0)
    """A worker started while Redis can't be reached waits this long for it, a log line per attempt, then exits 2 with
    one line (`worker --burst` doesn't wait).
    """
    api_keys: Annotated[dict[str, str] | None, API] = Field(None, repr=False)
    """JSON object, API key → tenant; unset means open."""
    tenant_budgets: Annotated[dict[str, Budget] | None, read_by("api", default="no budgets")] = None
    """JSON object, tenant (or `"*"`) → `{"tokensPerDay": N, "tokensPerMonth": N, "costPerMonthUsd": X}`, each optional
    and at least 0; a spent budget refuses the tenant's submissions with `QUOTA_EXCEEDED` until it resets (see
    Budgets, cost and usage).
    """
    llm_prices: Annotated[dict[str, Price] | None, read_by("worker", default="no costs")] = None
    """JSON object, model → `{"inputPerMTok": X, "outputPerMTok": Y, "cachedInputPerMTok": Z}` in USD per million
    tokens (`cachedInputPerMTok` optional): `Job.costUsd` and the `costPerMonthUsd` budgets.
    """
    max_body_bytes: Annotated[int, API] = Field(1_048_576, ge=1024)
    """Largest HTTP body or websocket frame."""
    apq: Annotated[bool, API] = True
    """Automatic persisted queries (see Persisted queries and trusted documents)."""
    apq_ttl_s: Annotated[int, API] = Field(24 * 3600, gt=0)
    """How long a registered persisted query is kept."""
    apq_max_documents: Annotated[int, API] = Field(1000, ge=1, le=1_000_000)
    """The most persisted queries kept in Redis (the oldest go first)."""
    apq_max_document_bytes: Annotated[int, API] = Field(16_384, ge=256, le=1_048_576)
    """The largest persisted query kept (a larger one runs, unkept)."""
    trusted_documents: Annotated[str | None, API] = None
    """Trusted-document manifests, comma-separated paths."""
    trusted_documents_only: Annotated[bool, API] = False
    """Run only the trusted documents."""
    trusted_documents_require_id: Annotated[bool, API] = False
    """Run them only when named by id."""
    trusted_documents_allow_playground: Annotated[bool, read_by("api", default="`true` under `dev`")] = False
    """Let the playground and console (same `Origin`) run any document."""
    max_subscriptions_per_connection: Annotated[int, API] = Field(100, ge=1)
    """Operations one websocket, or one single-connection event stream, may run at once."""
    max_sse_reservations_per_tenant: Annotated[int, API] = Field(100, ge=1)
    """Event streams one tenant may have reserved at once per API process (graphql-sse's single connection mode), open
    or not; more is 429 `RATE_LIMITED`.
    """
    sse_reservation_ttl_s: Annotated[float, API] = Field(30.0, gt=0)
    """A reserved event stream not opened within this long is dropped, with any operation already sent to it."""
    ws_init_timeout_s: Annotated[float, API] = Field(10.0, gt=0)
    """Time a websocket gets to send `connection_init` (both protocols)."""
    header_timeout_s: Annotated[float, API] = Field(10.0, gt=0, le=3600)
    """A connection must send a whole request head (request line and headers, a websocket upgrade's too) within this
    long of opening, or of its previous response's end; else it is closed.
    """
    max_connections: Annotated[
        int | None,
        read_by("api", default="the file limit less a reserve: 768 under `ulimit -n` 1024, 57,216 under 65,536"),
    ] = Field(None, ge=1)
    """Connections one API process holds, websockets and streams included; at the bound a new connection closes the one
    waiting longest without a whole request head, or, with every connection busy, is answered 503. A value past what
    the file limit allows is lowered to it.
    """
    redis_timeout_s: Annotated[float, BOTH] = Field(2.0, gt=0)
    """The most one API operation (or `/readyz`, `/metrics`) waits on Redis, a free pool connection included; then
    `SERVICE_UNAVAILABLE` (the workers read it for their start-up check only).
    """
    pubsub_health_check_s: Annotated[float, API] = Field(5.0, gt=0)
    """The API pings its pub/sub link after this long without traffic; no answer within as long again counts as a drop
    (resync follows).
    """
    max_watched_jobs_per_tenant: Annotated[int, API] = Field(1000, ge=1)
    """Jobs one tenant may follow at once per API process (`jobUpdates` counts 1, `jobsUpdates` one per id); more is
    `RATE_LIMITED`.
    """
    log_format: Annotated[Literal["text", "json"], ALL] = "text"
    """`json`: one JSON object a line (time, level, name, message, request_id; `trace_id` and `span_id` while tracing
    is on).
    """
    log_level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], ALL] = "INFO"
    """`DEBUG`, `INFO`, `WARNING`, `ERROR`."""
    redis_max_connections: Annotated[int, API] = Field(2, ge=1, le=1000)
    """Command connections per API process (pub/sub has one more, and with `REDIS_MIN_REPLICAS_ACKED` the writes that
    wait have a pool of this size of their own); requests share them.
    """
    worker_class: Annotated[Literal["async", "fork", "simple"], WORKER] = "async"
    """`async`: many jobs at once per process on one event loop; `fork`: RQ's `Worker`, a work horse process per job;
    `simple`: RQ's `SimpleWorker`, one job at a time in the process (see Worker classes).
    """
    worker_concurrency: Annotated[int, WORKER] = Field(64, ge=1, le=10_000)
    """Jobs one `async` worker process runs at once (`worker --concurrency N`)."""

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
        # It goes in an HTTP header: one pasted with "…" made every call fail unsent.
        if value is not None and not header_safe(value.get_secret_value()):
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
            sentinel_addresses(value)
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
            sentinels=sentinel_addresses(self.redis_sentinels),
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
