"""16. What tenant budgets cost a submission: submitText with TENANT_BUDGETS unset and set, side by side.

Two API processes on the same Redis, no workers, the same load generator as section 1, in
alternating rounds. With budgets set, every submission's one script also reads the tenant's
three counters (tokens today, tokens and cost this month) before it writes; the CPU the API
process spent is read from /proc around each round, per request.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tests.service import Service

from .harness import api_pid, loadgen, median, progress
from .scenarios import SUBMIT_BODY, Sizes, offline_env

# Limits never reached in a run: every request is checked, none refused.
BUDGETS = {"*": {"tokensPerDay": 10**12, "tokensPerMonth": 10**13, "costPerMonthUsd": 10**9}}
WARMUP_S = 1.0  # bench.harness.loadgen's default
PRICES = {"offline": {"inputPerMTok": 0.15, "outputPerMTok": 0.6}}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def budgets(redis_url: str, sizes: Sizes) -> dict[str, Any]:
    progress("16. submitText with TENANT_BUDGETS unset and set: starting both APIs (no workers)")
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    on_env = offline_env("bench-budgets-on") | {"TENANT_BUDGETS": json.dumps(BUDGETS), "LLM_PRICES": json.dumps(PRICES)}
    with (
        Service(redis_url, workers=0, env=offline_env("bench-budgets-off")) as off,
        Service(redis_url, workers=0, env=on_env) as on,
    ):
        apis = {"off": off, "on": on}
        for svc in apis.values():  # one unmeasured round each: a server's first seconds are slower
            loadgen(svc.http_url, SUBMIT_BODY, concurrency=sizes.concurrency, duration=sizes.submit_seconds / 2)
        for round_ in range(sizes.submit_rounds):
            for name, svc in apis.items():
                before = _cpu_s(api_pid(svc))
                stats = loadgen(svc.http_url, SUBMIT_BODY, concurrency=sizes.concurrency, duration=sizes.submit_seconds)
                # The load generator's 1 s warm-up is in the CPU too: about as many requests a second.
                sent = max(1.0, stats["rps"] * (sizes.submit_seconds + WARMUP_S))
                stats["cpu_ms_per_request"] = (_cpu_s(api_pid(svc)) - before) * 1000 / sent
                runs[name].append(stats)
                progress(f"    round {round_ + 1} budgets {name:3s} {stats['rps']:7.0f} req/s  "
                         f"{stats['cpu_ms_per_request']:.3f} CPU ms/request")  # fmt: skip
    summary = {
        name: {k: median(r[k] for r in rows) for k in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_request")}
        | {"errors": sum(r["errors"] for r in rows)}
        for name, rows in runs.items()
    }
    ratios = [a["rps"] / b["rps"] for a, b in zip(runs["on"], runs["off"], strict=True)]
    return {"rows": summary, "ratio": median(ratios), "ratios": ratios, "rounds": sizes.submit_rounds,
            "seconds": sizes.submit_seconds, "concurrency": sizes.concurrency}  # fmt: skip


def report(b: dict[str, Any]) -> list[str]:
    rows = b["rows"]
    return [
        "## 16. Tenant budgets: submitText with `TENANT_BUDGETS` unset and set",
        "",
        f"Two API processes on one Redis, no workers, {b['concurrency']} connections, {b['rounds']} alternating rounds",
        f"of {b['seconds']:.0f} s (medians). Set, every submission's one script also reads its tenant's three",
        "counters (tokens today, tokens and cost this month) before it writes; none is refused here. CPU ms is the",
        "API process's user + system time per request. (A job's end adds to the counters in the Lua step that",
        "ends it, set or not: three INCRBY and three EXPIREAT inside a script the worker runs anyway.)",
        "",
        "| TENANT_BUDGETS | requests/s | p50 ms | p99 ms | API CPU ms / request | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {name} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['cpu_ms_per_request']:.3f} "
            f"| {r['errors']:.0f} |"
            for name, r in (("unset", rows["off"]), ("set", rows["on"]))
        ),
        "",
        f"Set: {b['ratio']:.2f}x the requests/s of unset (per round: {', '.join(f'{x:.2f}' for x in b['ratios'])}).",
        "",
    ]
