"""Every Redis key and channel name the service uses, built in one place."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

PREFIX = "gqls"

# The RQ task and its failure callback, by dotted name: the API enqueues by name and so
# never imports the worker side (tasks, pipeline, providers).
TASK = "gql_service.worker.tasks.run_extraction"
ON_FAILURE = "gql_service.worker.tasks.on_failure"
DELIVER_WEBHOOK = "gql_service.worker.deliveries.deliver"
WEBHOOK_LOST = "gql_service.worker.deliveries.on_failure"


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def job_events(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:events"


def job_partials(job_id: str) -> str:
    """A job's interim frames (streamed partial results), for `partial: true` subscribers
    only: its subscriber count is how a worker knows whether anyone wants them."""
    return f"{PREFIX}:job:{job_id}:partial"


# The API says here which jobs a `partial: true` subscriber has just started to watch, so
# the worker running one starts publishing its interim frames (gql_service.partials).
PARTIALS_WANTED = f"{PREFIX}:partials:wanted"


# Every job that has not ended, by record key, scored by the time of its last change (ms):
# written with the record (store.py), read by the reconciler (gql_service.worker.reconciler).
LIVE_JOBS = f"{PREFIX}:jobs:live"
# Held by the worker process that reconciles now, so that one does, cluster-wide.
RECONCILE_LOCK = f"{PREFIX}:jobs:reconciling"


# Automatic persisted queries (gql_service.api.documents): sha256 -> document, and when each
# was registered (the oldest are forgotten first).
APQ_DOCUMENTS = f"{PREFIX}:apq:documents"
APQ_REGISTERED = f"{PREFIX}:apq:registered"


def write_once(token: str) -> str:
    """Marks a logical write as done (redis_conn.run_once's guard) where the write creates
    no key of its own to tell it by; expires once no retry of it can come."""
    return f"{PREFIX}:once:{token}"


def take(token: str) -> str:
    """What an async worker's take moved (gql_service.worker.rq_batches): a take sent again
    after its reply was lost answers with it instead of taking more."""
    return f"{PREFIX}:take:{token}"


def job_id_of(record_key: str) -> str:
    return record_key.removeprefix(f"{PREFIX}:job:")


# -- batches (gql_service.batch_store) ---------------------------------------------------
# Batch ids carry this prefix: no job id (uuid hex) has it, so `node(id:)` knows which is which.
BATCH_ID_PREFIX = "batch_"


def batch(batch_id: str) -> str:
    """A batch's hash: its fields, and the counts its jobs' transitions keep."""
    return f"{PREFIX}:batch:{batch_id}"


def batch_open(batch_id: str) -> str:
    """Exists while the batch takes jobs: submissions WATCH it, closing deletes it (the
    batch's hash changes with every job transition, this only once)."""
    return f"{PREFIX}:batch:{batch_id}:open"


def batch_jobs(batch_id: str) -> str:
    """Sorted set of the batch's job ids by creation time (ms)."""
    return f"{PREFIX}:batch:{batch_id}:jobs"


def batch_ended(batch_id: str) -> str:
    """List of the batch's job ids in the order they ended: where a client reads the
    results as they come (an offset is its cursor)."""
    return f"{PREFIX}:batch:{batch_id}:ended"


def batch_events(batch_id: str) -> str:
    """Published on every change of the batch: its new version (subscribers read it again)."""
    return f"{PREFIX}:batch:{batch_id}:events"


def tenant_batches(tenant: str) -> str:
    return f"{PREFIX}:tenant:{tenant}:batches"


def batch_idempotency(tenant: str, key: str) -> str:
    return idempotency(tenant, f"batch\0{key}")


# -- ECONOMY batches (gql_service.economy_store) -----------------------------------------
# Batches with jobs waiting to be sent to the provider's Batch API, by when the first came (ms).
ECONOMY_BATCHES = f"{PREFIX}:economy:batches"
# The chunks (one provider batch each) not yet done with: what every worker's loop looks at.
ECONOMY_CHUNKS = f"{PREFIX}:economy:chunks"


def economy_waiting(batch_id: str) -> str:
    """Sorted set of an ECONOMY batch's jobs that wait to be sent, by creation time (ms)."""
    return f"{PREFIX}:batch:{batch_id}:economy:waiting"


def batch_chunks(batch_id: str) -> str:
    """List of the batch's chunks, in the order they were made (`Batch.providerBatches`)."""
    return f"{PREFIX}:batch:{batch_id}:economy:chunks"


def economy_chunk(chunk_id: str) -> str:
    """A chunk's hash: its batch, state, files, provider batch and the provider's counts."""
    return f"{PREFIX}:economy:chunk:{chunk_id}"


def economy_chunk_jobs(chunk_id: str) -> str:
    """Set of the job ids a chunk sent."""
    return f"{PREFIX}:economy:chunk:{chunk_id}:jobs"


def economy_lock(name: str) -> str:
    """Held by the one worker that works on the chunk `name`."""
    return f"{PREFIX}:economy:lock:{name}"


# The field of a job's hash (keys.job) that holds its provider batch's answer until an attempt
# validates it (gql_service.worker.pipeline).
ANSWER_FIELD = "a"


def economy_handed(job_id: str) -> str:
    """Exists once a job's answer (or its fallback) left its chunk: written with it, so a
    worker that reads the same output again hands nothing over twice."""
    return f"{PREFIX}:economy:handed:{job_id}"


# The offline provider's Batch API (gql_service.worker.offline_batches): files, batches, and
# the batch made for each chunk.
OFFLINE_BATCH_TAGS = f"{PREFIX}:offline:batch-tags"


def offline_batch_file(file_id: str) -> str:
    return f"{PREFIX}:offline:file:{file_id}"


def offline_batch(batch_id: str) -> str:
    return f"{PREFIX}:offline:batch:{batch_id}"


# Ended jobs waiting to be written to the PostgreSQL history: a stream, drained by the
# workers' archivers as one consumer group (gql_service.worker.archiver).
ARCHIVE_OUTBOX = f"{PREFIX}:archive:outbox"
# Held by the archiver that runs the hourly retention, so that one does, cluster-wide.
ARCHIVE_RETENTION_LOCK = f"{PREFIX}:archive:retention"


# Ended jobs whose webhook is still to be queued for delivery: a stream, moved onto the
# webhook queue by the workers' relays as one consumer group (gql_service.worker.deliveries).
WEBHOOK_OUTBOX = f"{PREFIX}:webhooks:outbox"


@dataclass(frozen=True)
class Outbox:
    """An outbox stream, the consumer group that drains it (gql_service.worker.outbox), and
    where its poison entries go: its dead letters, kept until replayed (`gql-service outbox`)."""

    name: str
    stream: str
    group: str

    @property
    def dead(self) -> str:
        return f"{self.stream}:dead"


ARCHIVE = Outbox("archive", ARCHIVE_OUTBOX, "archivers")
WEBHOOKS = Outbox("webhooks", WEBHOOK_OUTBOX, "webhook-relay")
OUTBOXES = {outbox.name: outbox for outbox in (ARCHIVE, WEBHOOKS)}


# The LLM queues, one per job priority, in the order workers look at them. NORMAL keeps the
# name RQ_QUEUE had before there were priorities, so jobs queued then still run.
PRIORITIES = ("HIGH", "NORMAL", "LOW")


def llm_queue(rq_queue: str, priority: str) -> str:
    """The RQ queue of jobs of this priority (a `JobPriority` value): `llm-high`, `llm`, `llm-low`."""
    return rq_queue if priority == "NORMAL" else f"{rq_queue}-{priority.lower()}"


def llm_queues(rq_queue: str) -> list[str]:
    """Every LLM queue, HIGH first."""
    return [llm_queue(rq_queue, priority) for priority in PRIORITIES]


def webhook_queue(rq_queue: str) -> str:
    """The RQ queue of webhook deliveries, beside the LLM queue it belongs to."""
    return f"{rq_queue}-webhooks"


def webhook_delivery_job(job_id: str) -> str:
    """The RQ job delivering a job's webhook: one per job, so a repeat is seen."""
    return f"webhook-{job_id}"


def idempotency(tenant: str, key: str) -> str:
    # Hashed so that a client's key (any length, any bytes) never shapes our key space.
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"{PREFIX}:idem:{tenant}:{digest}"


def tenant_jobs(tenant: str) -> str:
    """Sorted set of a tenant's job ids by creation time (ms), for listing newest first."""
    return f"{PREFIX}:tenant:{tenant}:jobs"


def tenant_slots(tenant: str) -> str:
    """RQ's concurrency limit key for a tenant's running jobs (TENANT_MAX_IN_FLIGHT); RQ
    keeps its sets under `rq:rl:<this>:…`."""
    return f"{PREFIX}-tenant:{tenant}"


def metrics(name: str) -> str:
    """Cluster-wide job metrics, written by workers (gql_service.metrics)."""
    return f"{PREFIX}:metrics:{name}"


def _endpoint(endpoint: str) -> str:
    # An LLM endpoint (URL and model) as a short digest: any length, any bytes, one key shape.
    return hashlib.sha256(endpoint.encode()).hexdigest()[:32]


def json_mode_only(endpoint: str) -> str:
    """Set while an LLM endpoint+model is known to refuse JSON-schema outputs."""
    return f"{PREFIX}:llm:json-mode-only:{_endpoint(endpoint)}"


def llm_in_flight(endpoint: str) -> str:
    """Leases of the LLM calls open now, cluster-wide (gql_service.worker.provider_limits)."""
    return f"{PREFIX}:llm:in-flight:{_endpoint(endpoint)}"


def llm_budget(endpoint: str, kind: str) -> str:
    """The LLM_RPM (`requests`) / LLM_TPM (`tokens`) windows; the `limits` library adds the
    limit to it."""
    return f"{PREFIX}:llm:budget:{kind}:{_endpoint(endpoint)}"


def llm_paused(endpoint: str) -> str:
    """Set while the LLM endpoint has asked us to wait (429 Retry-After)."""
    return f"{PREFIX}:llm:paused:{_endpoint(endpoint)}"


# -- tenant budgets (gql_service.budgets) ------------------------------------------------
def tenant_usage(tenant: str, kind: str, period: str) -> str:
    """A tenant's tokens or cost in one UTC day (`2026-03-01`) or month (`2026-03`), added by
    each job's terminal transition (store.py) and read by submissions and /metrics."""
    return f"{PREFIX}:usage:{tenant}:{kind}:{period}"


def llm_breaker(endpoint: str) -> str:
    """The circuit breaker of an LLM endpoint+model (LLM_FALLBACKS): a hash of its failures
    in a row, until when it is open, and the lease of the one half-open call trying it."""
    return f"{PREFIX}:llm:breaker:{_endpoint(endpoint)}"
