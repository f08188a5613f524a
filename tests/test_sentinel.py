"""Redis behind Sentinel, with real processes: a primary, a replica, three sentinels, the API
and a worker pool. The primary is SIGKILLed while jobs are submitted and run.

With REDIS_MIN_REPLICAS_ACKED=1 every submission that got a job id ends (none lost, none
left hanging), submissions fail only while the sentinels switch, and a subscription open
across the switch gets its job's end.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

import httpx
import pytest

from .clients import SUBMIT_WITH_KEY as SUBMIT
from .clients import TEXT, SteadySubmitter, follow, post
from .sentinel_cluster import SentinelCluster
from .service import Service, wait_until

JOB = "query($id: ID!) { job(id: $id) { id status stage attempts error { code message } } }"
ENV = {
    "REDIS_MIN_REPLICAS_ACKED": "1",
    "REDIS_REPLICA_ACK_TIMEOUT_MS": "1000",
    "RECONCILE_INTERVAL_S": "1",
    "WORKER_LOST_AFTER_S": "3",
    "WORKER_CONCURRENCY": "8",
    "OFFLINE_STREAM_DELAY_MS": "10",  # each job takes about half a second: many in flight
}


def _ended(svc: Service, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    ended = {}
    with httpx.Client(timeout=10) as client:
        for job_id in job_ids:
            job = client.post(svc.http_url, json={"query": JOB, "variables": {"id": job_id}}).json()["data"]["job"]
            if job is not None and job["status"] in ("FINISHED", "FAILED", "CANCELED"):
                ended[job_id] = job
    return ended


@pytest.mark.timeout(240)
@pytest.mark.parametrize("worker_class", ["async", "fork"])
def test_a_primary_killed_under_load_loses_no_acknowledged_job(worker_class: str) -> None:
    env = {**ENV, "WORKER_CLASS": worker_class}
    with SentinelCluster() as cluster, Service(cluster.url, workers=2, env={**cluster.env, **env}) as svc:
        submitter = SteadySubmitter(svc).start()
        wait_until(lambda: len(submitter.ok) >= 30, timeout_s=60, what="30 submissions")
        watched = submitter.ok[-1][1]  # queued behind the others: it ends after the switch
        events: list[dict[str, Any]] = []
        watcher = threading.Thread(target=lambda: events.extend(asyncio.run(follow(svc, watched))), daemon=True)
        watcher.start()
        wait_until(lambda: len(submitter.ok) >= 35, timeout_s=30, what="a few more submissions")

        killed_at = time.monotonic()
        old = cluster.kill_primary()
        cluster.wait_for_failover(old)
        # The old primary comes back (empty) and becomes the new one's replica: until then
        # the new primary has no replica to confirm writes, and submissions are refused.
        cluster.restart(old)
        switched_at = time.monotonic()
        wait_until(lambda: any(at > switched_at for at, _ in submitter.ok), timeout_s=30, what="a submission after")
        resumed = len(submitter.ok)
        wait_until(lambda: len(submitter.ok) >= resumed + 30, timeout_s=60, what="30 submissions after the switch")
        submitter.finish()

        acknowledged = [job_id for _, job_id in submitter.ok]
        ended: dict[str, dict[str, Any]] = {}

        def all_ended() -> bool:
            ended.update(_ended(svc, [j for j in acknowledged if j not in ended]))
            return len(ended) == len(acknowledged)

        try:
            wait_until(all_ended, timeout_s=120, what="every acknowledged job to end")
        except TimeoutError:
            missing = [j for j in acknowledged if j not in ended]
            states = [post(svc, JOB, id=j).json()["data"]["job"] for j in missing[:5]]
            raise AssertionError(f"{len(missing)} of {len(acknowledged)} jobs did not end: {states}") from None
        watcher.join(30)

    failures = [f for f in ended.values() if f["status"] != "FINISHED"]
    assert all(f["error"]["code"] in ("WORKER_LOST", "INTERNAL") for f in failures), failures
    assert len(failures) <= 2, failures  # a job ends FAILED only when the switch hits every attempt
    # Submissions failed only during the switch, and said so as SERVICE_UNAVAILABLE.
    codes = {code for _, code, _ in submitter.failed}
    assert codes <= {"SERVICE_UNAVAILABLE"}, submitter.failed
    assert all(killed_at <= at <= switched_at + 10 for at, _, _ in submitter.failed), (
        killed_at, switched_at, submitter.failed)  # fmt: skip
    # The subscription opened before the kill saw its job's end.
    assert events and events[-1]["id"] == watched and events[-1]["status"] in ("FINISHED", "FAILED"), events


def _stopped(cluster: SentinelCluster) -> int:
    """SIGSTOP the replica and cut its link: no write of the primary reaches it from now
    (what the kernel had buffered for a stopped process would still arrive)."""
    replica = next(server for server in cluster.servers if server.port != cluster.primary_port())
    assert replica.process is not None
    os.kill(replica.process.pid, signal.SIGSTOP)
    with cluster.client() as primary:
        primary.client_kill_filter(_type="replica")
        wait_until(lambda: primary.info("replication")["connected_slaves"] == 0, what="the link to drop")  # noqa: B023
    return replica.process.pid


def test_a_submission_no_replica_confirms_is_refused_and_found_again_by_its_key() -> None:
    with SentinelCluster() as cluster, Service(cluster.url, workers=0, env={**cluster.env, **ENV}) as svc:
        replica = _stopped(cluster)
        started = time.monotonic()
        refused = post(svc, SUBMIT, text=TEXT, key="nightly-1").json()
        took = time.monotonic() - started
        os.kill(replica, signal.SIGCONT)
        cluster.wait_replicas_in_sync()
        retried = post(svc, SUBMIT, text=TEXT, key="nightly-1").json()
    [error] = refused["errors"]
    assert error["extensions"]["code"] == "SERVICE_UNAVAILABLE", refused
    assert "0 of 1 replica(s) confirmed it within 1000 ms" in error["message"]
    assert 1.0 <= took < 3.0  # REDIS_REPLICA_ACK_TIMEOUT_MS, not a hang
    # The write was on the primary all along: the same key finds that job.
    assert retried["data"]["submitText"]["deduplicated"] is True, retried


def test_with_the_default_an_acknowledged_job_can_be_lost_in_a_failover() -> None:
    """What REDIS_MIN_REPLICAS_ACKED=0 risks, shown: the primary answers, dies before its
    replica has the write, and the replica it fails over to never heard of the job."""
    env = {k: v for k, v in ENV.items() if k != "REDIS_MIN_REPLICAS_ACKED"}
    with SentinelCluster() as cluster, Service(cluster.url, workers=0, env={**cluster.env, **env}) as svc:
        replica = _stopped(cluster)
        job_id = post(svc, SUBMIT, text=TEXT).json()["data"]["submitText"]["job"]["id"]
        old = cluster.kill_primary()
        os.kill(replica, signal.SIGCONT)
        cluster.wait_for_failover(old)
        wait_until(lambda: "errors" not in post(svc, JOB, id=job_id).json(), timeout_s=30, what="the API to answer")
        after = post(svc, JOB, id=job_id).json()
    assert after == {"data": {"job": None}}, after
