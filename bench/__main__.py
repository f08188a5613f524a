"""`python -m bench [--smoke] [--out BENCHMARKS.md] [--only SECTIONS]`

SECTIONS, comma-separated: submit, fanout, pipeline, e2e, scale_out, async_worker, partials, history, webhooks,
sentinel, http_streams, bulk, hostile, documents, tracing, budgets, priorities, breaker, economy, garbage.
With --only, the other sections are kept from the last run (BENCHMARKS.json beside --out),
and the report says which run each section comes from.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gql_service.cli.embedded_redis import EmbeddedRedis
from tests.openai_stub import OpenAIStub

from . import (
    async_worker,
    breaker,
    budgets,
    bulk,
    documents,
    economy,
    fanout_memory,
    history,
    hostile,
    http_streams,
    partials,
    priorities,
    readme_quote,
    report,
    scenarios,
    sentinel,
    tracing_cost,
    webhooks,
)
from .harness import Machine, progress, raise_fd_limit

ALL = (
    "submit",
    "fanout",
    "pipeline",
    "e2e",
    "scale_out",
    "async_worker",
    "partials",
    "history",
    "webhooks",
    "sentinel",
    "http_streams",
    "bulk",
    "hostile",
    "documents",
    "tracing",
    "budgets",
    "priorities",
    "breaker",
    "economy",
    "garbage",
)
NOTES = Path(__file__).with_name("NOTES.md")
README = Path(__file__).resolve().parent.parent / "README.md"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: proves the suite runs")
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--only", default=",".join(ALL))
    args = parser.parse_args()
    only = set(args.only.split(","))
    sizes = scenarios.Sizes.smoke() if args.smoke else scenarios.Sizes.full()
    raise_fd_limit()
    out = Path(args.out)
    results: dict[str, Any] = {"sizes": asdict(sizes)}
    kept = out.with_suffix(".json")
    if only != set(ALL) and not args.smoke and kept.exists():
        results = {k: v for k, v in json.loads(kept.read_text()).items() if k in (*ALL, "runs")}
        results["sizes"] = asdict(sizes)
    runs = results.setdefault("runs", {})
    # The CPU too: `--only` reruns may land on another machine than the sections they keep.
    this_run = {"at": f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC", "commit": _commit(), "cpu": Machine().cpu}
    for section in only & set(ALL):
        runs[section] = this_run
    stub = OpenAIStub().start()
    try:
        with EmbeddedRedis(extra_args=("--maxclients", "20000")) as redis:
            progress(f"Redis on {redis.url}, OpenAI-compatible stub on {stub.base_url}")
            if "submit" in only:
                results["submit"] = scenarios.submit_throughput(redis.url, sizes)
            if "fanout" in only:
                results["fanout"] = scenarios.fanout(redis.url, sizes)
            if "pipeline" in only:
                results["pipeline"] = scenarios.worker_pipeline(redis.url, stub, sizes)
            if "e2e" in only:
                results["e2e"] = scenarios.end_to_end(redis.url, stub, sizes)
            if "scale_out" in only:
                results["scale_out"] = scenarios.scale_out(redis.url, sizes)
            if "async_worker" in only:
                results["async_worker"] = async_worker.async_worker(redis.url, stub, sizes)
            if "partials" in only:
                results["partials"] = partials.partial_results(redis.url, stub, sizes)
            if "history" in only:
                results["history"] = history.job_history(redis.url, stub, sizes)
            if "webhooks" in only:
                results["webhooks"] = webhooks.webhooks(redis.url, stub, sizes)
            if "http_streams" in only:
                results["http_streams"] = http_streams.http_streams(redis.url, sizes)
            if "bulk" in only:
                results["bulk"] = bulk.bulk(redis.url, stub, sizes)
            if "hostile" in only:
                results["hostile"] = hostile.hostile_queries(redis.url, sizes)
            if "documents" in only:
                results["documents"] = documents.trusted_documents(redis.url, sizes)
            if "tracing" in only:
                results["tracing"] = tracing_cost.tracing_cost(redis.url, stub, sizes)
            if "budgets" in only:
                results["budgets"] = budgets.budgets(redis.url, sizes)
            if "priorities" in only:
                results["priorities"] = priorities.priorities(redis.url, stub, sizes)
            if "breaker" in only:
                results["breaker"] = breaker.breaker(redis.url, stub, sizes)
            if "economy" in only:
                results["economy"] = economy.economy(redis.url, stub, sizes)
            if "garbage" in only:
                results["garbage"] = fanout_memory.fanout_memory(redis.url, stub, sizes)
        if "sentinel" in only:
            results["sentinel"] = sentinel.sentinel(sizes)
    finally:
        stub.stop()
    if NOTES.exists() and not args.smoke:
        results["notes"] = NOTES.read_text()
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "./scripts/bench" + (" --smoke" if args.smoke else "")
    report.write(results, out, command=command, smoke=args.smoke)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    if not args.smoke and out.resolve() == README.with_name("BENCHMARKS.md"):
        readme_quote.rewrite(README, results)  # the README's figures, from this same run
    progress(f"wrote {out}")


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
