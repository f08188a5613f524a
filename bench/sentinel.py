"""10. Redis behind Sentinel: what waiting for a replica costs, and how long a failover takes.

A primary, one replica and three sentinels (tests/sentinel_cluster.py). submitText req/s
through Sentinel with REDIS_MIN_REPLICAS_ACKED 0 and 1, and straight to the primary's URL,
alternating rounds with the same load generator as section 1. Then the failover window, for
each setting: a client submitting every 20 ms while the primary is SIGKILLed; the old
primary is restarted as soon as the sentinels have promoted the replica (as a process
manager would), and comes back as the new primary's replica.
"""

from __future__ import annotations

import time
from typing import Any

from tests.clients import SteadySubmitter
from tests.sentinel_cluster import SentinelCluster
from tests.service import Service, wait_until

from .harness import loadgen, median, progress
from .scenarios import SUBMIT_BODY, Sizes, offline_env


def sentinel(sizes: Sizes) -> dict[str, Any]:
    progress("10. Redis behind Sentinel: replica acknowledgements and the failover window")
    with SentinelCluster() as cluster:
        through = {**cluster.env, **offline_env("bench-sentinel")}
        setups = {
            "direct": {"RQ_QUEUE": "bench-direct", "LLM_PROVIDER": "offline"},
            "acked_0": through,
            "acked_1": {**through, "REDIS_MIN_REPLICAS_ACKED": "1"},
        }
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
        services = {name: Service(cluster.url, workers=0, env=env).start() for name, env in setups.items()}
        try:
            for svc in services.values():  # one unmeasured round each
                loadgen(svc.http_url, SUBMIT_BODY, concurrency=sizes.concurrency, duration=sizes.sentinel_seconds / 2)
            for n in range(sizes.sentinel_rounds):
                for name, svc in services.items():
                    stats = loadgen(svc.http_url, SUBMIT_BODY, concurrency=sizes.concurrency,
                                    duration=sizes.sentinel_seconds)  # fmt: skip
                    rounds[name].append(stats)
                    progress(f"    round {n + 1} {name:8s} {stats['rps']:7.0f} req/s  p50 {stats['p50_ms']:.1f} ms")
            windows = {name: _failover(cluster, services[name]) for name in ("acked_0", "acked_1")}
        finally:
            for svc in services.values():
                svc.stop()
    submit = {
        name: {k: median(r[k] for r in runs) for k in ("rps", "p50_ms", "p99_ms")} for name, runs in rounds.items()
    }
    ratios = [one["rps"] / zero["rps"] for one, zero in zip(rounds["acked_1"], rounds["acked_0"], strict=True)]
    return {"submit": submit, "ratio": median(ratios), "ratios": ratios, "failover": windows}


def _failover(cluster: SentinelCluster, svc: Service) -> dict[str, float]:
    submitter = SteadySubmitter(svc).start()
    try:
        wait_until(lambda: len(submitter.ok) >= 20, timeout_s=30, what="steady submissions")
        killed_at = time.monotonic()
        old = cluster.kill_primary()
        cluster.wait_for_failover(old)
        promoted_at = time.monotonic()
        cluster.restart(old)
        rejoined_at = time.monotonic()
        wait_until(lambda: any(at > rejoined_at for at, _ in submitter.ok), timeout_s=30, what="a submission after")
    finally:
        submitter.finish()
    failed = [at for at, _, _ in submitter.failed if at >= killed_at]
    window = min(at for at, _ in submitter.ok if at > failed[0]) - failed[0] if failed else 0.0
    row = {"promoted_s": promoted_at - killed_at, "replica_back_s": rejoined_at - killed_at,
           "window_s": window, "refused": len(failed)}  # fmt: skip
    progress(f"    {svc.env.get('REDIS_MIN_REPLICAS_ACKED', '0')} replica(s) acked: first failed to first successful "
             f"submit {window:.2f} s ({len(failed)} refused); promoted after {row['promoted_s']:.2f} s")  # fmt: skip
    return row
