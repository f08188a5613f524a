"""Retention: results live RESULT_TTL_S, then are gone cleanly; RQ's own entries don't pile up."""

from __future__ import annotations

from redis import Redis
from rq.registry import FailedJobRegistry, FinishedJobRegistry

from gql_service import keys

from .clients import follow, post, submit
from .service import Service, wait_until

JOB = "query($id: ID!) { job(id: $id) { id status } }"


async def test_results_expire_after_result_ttl_and_job_returns_null(e2e_redis: str) -> None:
    env = {"RQ_QUEUE": "llm-retention", "RESULT_TTL_S": "2", "RQ_RESULT_TTL_S": "0"}
    with Service(e2e_redis, workers=1, env=env) as svc:
        job_id = submit(svc)
        assert (await follow(svc, job_id))[-1]["status"] == "FINISHED"
        assert post(svc, JOB, id=job_id).json()["data"]["job"]["status"] == "FINISHED"
        redis = Redis.from_url(e2e_redis)
        assert 0 < redis.ttl(keys.job(job_id)) <= 2
        wait_until(lambda: post(svc, JOB, id=job_id).json() == {"data": {"job": None}}, what="the job to expire")
        # Nothing of it is left: no record, and RQ kept no entry (RQ_RESULT_TTL_S=0).
        assert redis.exists(keys.job(job_id)) == 0
        assert redis.exists(f"rq:job:{job_id}") == 0
        assert FinishedJobRegistry("llm-retention", connection=redis).count == 0
        assert FailedJobRegistry("llm-retention", connection=redis).count == 0


async def test_every_key_the_service_writes_has_a_ttl(service: Service, e2e_redis: str) -> None:
    payload = post(
        service,
        'mutation { submitText(input: {text: "Short-lived.", idempotencyKey: "ttl-check"}) { job { id } } }',
    ).json()
    job_id = payload["data"]["submitText"]["job"]["id"]
    await follow(service, job_id)
    redis = Redis.from_url(e2e_redis)
    for key in redis.scan_iter("gqls:*"):
        if key.startswith(b"gqls:metrics:"):
            # Cumulative counters by design: a fixed set of fields, so they can't grow.
            assert redis.hlen(key) <= 20, key
            continue
        if key in (keys.WEBHOOK_OUTBOX.encode(), keys.ARCHIVE_OUTBOX.encode()):
            # Outboxes: an entry is deleted once drained, so they hold only what is in flight.
            wait_until(lambda k=key: redis.xlen(k) == 0, what=f"{key!r} to be drained")
            continue
        assert redis.ttl(key) > 0, key
    # RQ sets its TTL (RQ_RESULT_TTL_S, 1 hour by default) just after our DONE, once the horse returns.
    wait_until(lambda: redis.ttl(f"rq:job:{job_id}") > 0, what="RQ to expire its job entry")
