"""14. Trusted documents: a `job` query named by `documentId` beside the same query sent in
full, on one API process in the same run (alternating rounds, the same load generator).

A document sent in full is parsed (or found in the parse cache by its text) and validated
on every request; by id, it is looked up in the manifest loaded at start-up.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from redis import Redis

from tests.service import Service

from .harness import loadgen, median, parked_jobs, progress
from .scenarios import Sizes, offline_env

JOB = "query Job($id: ID!) { job(id: $id) { id status stage version createdAt } }"


def trusted_documents(redis_url: str, sizes: Sizes) -> dict[str, Any]:
    progress("14. a job query by documentId beside the same query in full")
    with parked_jobs(Redis.from_url(redis_url), 1, "bench-documents") as [job_id]:
        digest = hashlib.sha256(JOB.encode()).hexdigest()
        bodies = {
            "full": {"query": JOB, "variables": {"id": job_id}},
            "by_id": {"documentId": f"sha256:{digest}", "variables": {"id": job_id}},
        }
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in bodies}
        with tempfile.TemporaryDirectory() as folder:
            manifest = Path(folder) / "persisted-documents.json"
            manifest.write_text(json.dumps({digest: JOB}))
            env = {**offline_env("bench-documents"), "TRUSTED_DOCUMENTS": str(manifest)}
            with Service(redis_url, workers=0, env=env) as svc:
                for _ in range(sizes.submit_rounds):
                    for name, body in bodies.items():
                        runs[name].append(
                            loadgen(svc.http_url, body, concurrency=sizes.concurrency, duration=sizes.submit_seconds)
                        )
    rows = {
        name: {
            "rps": median(r["rps"] for r in got),
            "p50_ms": median(r["p50_ms"] for r in got),
            "errors": sum(r["errors"] for r in got),
        }
        for name, got in runs.items()
    }
    ratio = rows["by_id"]["rps"] / rows["full"]["rps"]
    progress(f"    by id {rows['by_id']['rps']:.0f} req/s, in full {rows['full']['rps']:.0f} req/s: {ratio:.2f}x")
    return {"rounds": sizes.submit_rounds, "seconds": sizes.submit_seconds, "concurrency": sizes.concurrency,
            "rows": rows, "ratio": ratio}  # fmt: skip
