"""`python -m bench [--smoke] [--out BENCHMARKS.md] [--only SECTIONS]`

SECTIONS, comma-separated: submit, fanout, pipeline, e2e, scale_out, async_worker, partials, history.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from gql_service.embedded_redis import EmbeddedRedis
from tests.openai_stub import OpenAIStub

from . import async_worker, history, partials, report, scenarios
from .harness import progress, raise_fd_limit

ALL = ("submit", "fanout", "pipeline", "e2e", "scale_out", "async_worker", "partials", "history")
NOTES = Path(__file__).with_name("NOTES.md")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: proves the suite runs")
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--only", default=",".join(ALL))
    args = parser.parse_args()
    only = set(args.only.split(","))
    sizes = scenarios.Sizes.smoke() if args.smoke else scenarios.Sizes.full()
    raise_fd_limit()
    results: dict[str, object] = {"sizes": asdict(sizes)}
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
    finally:
        stub.stop()
    if NOTES.exists() and not args.smoke:
        results["notes"] = NOTES.read_text()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "./scripts/bench" + (" --smoke" if args.smoke else "")
    report.write(results, out, command=command, smoke=args.smoke)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    progress(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
