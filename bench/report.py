"""BENCHMARKS.md and its plots, from the scenarios' figures."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from .breaker import report as breaker_report
from .economy import report as economy_report
from .fanout_memory import report as garbage_report
from .harness import Machine

TARGETS = {
    "submit_ratio": 1.2,
    "redis_connections": 3,
    "kib_per_sub": 60,
    "one_p99_ms": 20,
    "overhead_p50_ms": 10,
    "efficiency_8": 0.9,
    "async_jobs_per_s": 150,
    "async_rss_mib": 300,
    "async_vs_sdk": 0.9,  # the async worker's jobs/s over the SDK alone's calls/s (issue 31)
    "rpm_low": 570,
}


SECTION_NUMBERS = {
    "submit": 1, "fanout": 2, "pipeline": 3, "e2e": 4, "scale_out": 5, "async_worker": 6, "partials": 7,
    "history": 8, "webhooks": 9, "sentinel": 10, "http_streams": 11, "bulk": 12, "hostile": 13,
    "documents": 14, "tracing": 15, "budgets": 16, "priorities": 17, "breaker": 18,
    "economy": 19, "garbage": 20,
}  # fmt: skip


def _runs(results: dict[str, Any]) -> str:
    """When (and at which commit) each section ran: `--only` keeps the others from before."""
    by_run: dict[tuple[str, str, str], list[int]] = {}
    for section, run in (results.get("runs") or {}).items():
        if section in results and section in SECTION_NUMBERS:
            where = f"commit {run['commit']}" + (f", {run['cpu']}" if run.get("cpu") else "")  # older runs: no CPU
            by_run.setdefault((run["at"], run["commit"], where), []).append(SECTION_NUMBERS[section])
    if not by_run:
        return f"run at {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"
    parts = [
        f"section{'s' if len(nums) > 1 else ''} {', '.join(map(str, sorted(nums)))} at {at} ({where})"
        for (at, _, where), nums in sorted(by_run.items())
    ]
    return "; ".join(parts)


def _by_id_row(sub: dict[str, Any]) -> list[str]:
    b = sub.get("by_id")  # runs before the trusted-document row have none
    if not b:
        return []
    return [
        f"| gql-service `submitText` by `documentId` (a trusted document) | {b['rps']:.0f} | {b['p50_ms']:.1f} "
        f"| {b['p99_ms']:.1f} | {b['errors']:.0f} |"
    ]


def _by_id_ratio(sub: dict[str, Any]) -> list[str]:
    if "by_id_ratio" not in sub:
        return []
    return [
        "",
        f"By `documentId`: {sub['by_id_ratio']:.2f}x the baseline (per round: "
        + ", ".join(f"{x:.2f}" for x in sub["by_id_ratios"])
        + "). The document is the manifest's, looked up by its hash; parsing and validation are then the"
        " caches' (the same as for the document in full).",
    ]


def _mark(ok: bool) -> str:
    return "met" if ok else "**missed**"


def plots(results: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fan = results.get("fanout") or []
    if fan:
        n = [r["subscribers"] for r in fan]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        left.plot(n, [r["one_p50_ms"] for r in fan], "o-", label="one job changes, p50")
        left.plot(n, [r["one_p99_ms"] for r in fan], "o-", label="one job changes, p99")
        left.plot(n, [r["all_p99_ms"] for r in fan], "s--", label="all jobs change at once, p99")
        left.set_xlabel("concurrent subscriptions")
        left.set_ylabel("publish to client (ms)")
        left.set_yscale("log")
        left.legend()
        left.grid(alpha=0.3)
        right.plot(n, [r["rss_mib"] for r in fan], "o-", color="tab:green", label="API RSS (MiB)")
        right.set_xlabel("concurrent subscriptions")
        right.set_ylabel("API process RSS (MiB)")
        twin = right.twinx()
        twin.plot(n, [r["kib_per_sub"] for r in fan], "s--", color="tab:red", label="KiB per subscription")
        twin.set_ylabel("KiB per idle subscription")
        right.grid(alpha=0.3)
        fig.suptitle("Subscription fan-out on one API process")
        fig.tight_layout()
        fig.savefig(out_dir / "bench-fanout.png", dpi=110)
        plt.close(fig)
        names.append("bench-fanout.png")
    pipe = results.get("pipeline")
    if pipe:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for worker_class in ("fork", "simple"):
            rows = [r for r in pipe["scaling"] if r["worker_class"] == worker_class]
            if rows:
                ax.plot(
                    [r["workers"] for r in rows],
                    [r["jobs_per_s"] for r in rows],
                    "o-",
                    label=f"measured, {worker_class}",
                )
        ideal = sorted({(r["workers"], r["ideal"]) for r in pipe["scaling"]})
        ax.plot([w for w, _ in ideal], [i for _, i in ideal], "k--", label="ideal (workers / LLM latency)")
        ax.set_xlabel("worker processes")
        ax.set_ylabel("jobs/s")
        ax.set_title(f"Throughput with a {pipe['slow_llm_ms']:.0f} ms LLM")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "bench-workers.png", dpi=110)
        plt.close(fig)
        names.append("bench-workers.png")
    return names


def write(results: dict[str, Any], out: Path, *, command: str, smoke: bool) -> None:
    machine = Machine()
    images = plots(results, out.parent)
    lines = [
        "# Benchmarks",
        "",
        "Written by `" + command + "`" + (" (smoke sizes: not for comparison)" if smoke else "") + ".",
        f"Run on {machine.describe(cpu=False)}; {_runs(results)}.",
        "Every process (Redis, the APIs, the workers, the load generator, the OpenAI-compatible stub) shares",
        "this machine, so absolute figures move from run to run; compare the ratios measured side by side.",
        "",
    ]
    sub = results.get("submit")
    if sub:
        g, r, j = sub["graphql"], sub["rest"], sub["job"]
        lines += [
            "## 1. submitText throughput (one API process, no workers)",
            "",
            "Closed loop, " + f"{results['sizes']['concurrency']} keep-alive connections, the same load generator"
            " (`bench/loadgen.py`, its own process) against both, alternating rounds.",
            "",
            "| service | requests/s | p50 ms | p99 ms | errors |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| gql-service `submitText` | {g['rps']:.0f} | {g['p50_ms']:.1f} | {g['p99_ms']:.1f} | {g['errors']:.0f} |",
            f"| REST baseline (`bench/rest_baseline.py`) | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']:.0f} |",
            f"| gql-service `job` query | {j['rps']:.0f} | {j['p50_ms']:.1f} | {j['p99_ms']:.1f} | {j['errors']:.0f} |",
            *_by_id_row(sub),
            "",
            f"**Ratio submitText / baseline: {sub['ratio']:.2f}x** (median of the rounds' ratios; per round: "
            + ", ".join(f"{x:.2f}" for x in sub["ratios"])
            + f"). Target >= {TARGETS['submit_ratio']}x: {_mark(sub['ratio'] >= TARGETS['submit_ratio'])}.",
            *_by_id_ratio(sub),
            "",
        ]
    fan = results.get("fanout")
    if fan:
        lines += [
            "## 2. Subscription fan-out (one API process, graphql-transport-ws, one subscription per socket)",
            "",
            "| subscriptions | open (s) | KiB per idle subscription | API RSS (MiB) | API Redis connections "
            "| one job changes p50 / p99 (ms) | all change at once p50 / p99 (ms) |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in fan:
            lines.append(
                f"| {row['subscribers']:,} | {row['open_s']:.1f} | {row['kib_per_sub']:.1f} | {row['rss_mib']:.0f} "
                f"| {row['redis_connections']} | {row['one_p50_ms']:.2f} / {row['one_p99_ms']:.2f} "
                f"| {row['all_p50_ms']:.0f} / {row['all_p99_ms']:.0f} |"
            )
        top = fan[-1]
        lines += [
            "",
            "Latency is from just before the worker-side write (Lua CAS + PUBLISH) to the client's receipt, on one clock.",
            f"Targets at {top['subscribers']:,}: <= {TARGETS['redis_connections']} Redis connections: "
            f"{_mark(max(r['redis_connections'] for r in fan) <= TARGETS['redis_connections'])}; "
            f"<= {TARGETS['kib_per_sub']} KiB per idle subscription: {_mark(top['kib_per_sub'] <= TARGETS['kib_per_sub'])}; "
            f"one-job p99 <= {TARGETS['one_p99_ms']} ms: {_mark(top['one_p99_ms'] <= TARGETS['one_p99_ms'])}.",
            "",
        ]
        if "bench-fanout.png" in images:
            lines += ["![fan-out](bench-fanout.png)", ""]
    pipe = results.get("pipeline")
    if pipe:
        lines += [
            "## 3. Worker pipeline (openai provider against the stub)",
            "",
            "The one-job-at-a-time classes (the default, `async`, is section 6): `fork` is RQ's forking `Worker`",
            "(a work horse process per job); `simple` is RQ's `SimpleWorker` (jobs run in the worker process). One",
            "worker process, LLM at 0 ms; overhead is the time between consecutive completions minus the SDK's round",
            "trip to the stub.",
            "",
            "| worker class | jobs | jobs/s | LLM round trip ms | overhead p50 ms | overhead p99 ms | target p50 <= 10 ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for row in pipe["one_worker"]:
            lines.append(
                f"| {row['worker_class']} | {row['jobs']} | {row['jobs_per_s']:.1f} | {row['llm_rtt_ms']:.1f} "
                f"| {row['overhead_p50_ms']:.1f} | {row['overhead_p99_ms']:.1f} "
                f"| {_mark(row['overhead_p50_ms'] <= TARGETS['overhead_p50_ms'])} |"
            )
        lines += [
            "",
            f"LLM at {pipe['slow_llm_ms']:.0f} ms:",
            "",
            "| worker class | workers | jobs | jobs/s | ideal (workers / LLM latency) | of ideal |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in pipe["scaling"]:
            lines.append(
                f"| {row['worker_class']} | {row['workers']} | {row['jobs']} | {row['jobs_per_s']:.2f} "
                f"| {row['ideal']:.2f} | {row['efficiency']:.0%} |"
            )
        for row in pipe["scaling"]:
            if row["workers"] == 8:
                lines += ["", f"Target, 8 `{row['worker_class']}` workers >= 90 % of ideal: "
                          f"{_mark(row['efficiency'] >= TARGETS['efficiency_8'])}."]  # fmt: skip
        if "bench-workers.png" in images:
            lines += ["", "![workers](bench-workers.png)"]
        lines.append("")
    e2e = results.get("e2e")
    if e2e:
        lines += [
            "## 4. End to end",
            "",
            f"Submit by HTTP, then `jobUpdates` on an open socket until DONE; {e2e['jobs']} jobs, 4 clients, "
            f"4 workers, stub LLM at {e2e['llm_ms']:.0f} ms.",
            "",
            "| | p50 ms | p99 ms |",
            "| --- | ---: | ---: |",
            f"| submit -> DONE received | {e2e['p50_ms']:.0f} | {e2e['p99_ms']:.0f} |",
            f"| minus the LLM's own latency | {e2e['p50_minus_llm_ms']:.0f} | {e2e['p99_minus_llm_ms']:.0f} |",
            "",
        ]
    so = results.get("scale_out")
    if so:
        lines += [
            "## 5. Scale-out (two API processes, a worker pool, one Redis)",
            "",
            f"A job submitted through API A and followed on API B: {' -> '.join(so['cross_stages'])}.",
            "",
            "| APIs | submitText requests/s |",
            "| ---: | ---: |",
            f"| 1 | {so['one_api_rps']:.0f} |",
            f"| 2 | {so['two_api_rps']:.0f} ({so['ratio']:.2f}x) |",
            "",
        ]
    aw = results.get("async_worker")
    if aw:
        lines += _async_worker(aw)
    pr = results.get("partials")
    if pr:
        lines += _partials(pr)
    hi = results.get("history")
    if hi:
        lines += _history(hi)
    wh = results.get("webhooks")
    if wh:
        lines += _webhooks(wh)
    sent = results.get("sentinel")
    if sent:
        lines += _sentinel(sent)
    streams = results.get("http_streams")
    if streams:
        lines += _http_streams(streams)
    bulk = results.get("bulk")
    if bulk:
        lines += _bulk(bulk)
    hostile = results.get("hostile")
    if hostile:
        lines += _hostile(hostile)
    documents = results.get("documents")
    if documents:
        lines += _documents(documents)
    tracing = results.get("tracing")
    if tracing:
        lines += _tracing(tracing)
    if results.get("budgets"):
        from . import budgets  # its section's report lives with its scenario

        lines += budgets.report(results["budgets"])
    prio = results.get("priorities")
    if prio:
        lines += _priorities(prio)
    fallbacks = results.get("breaker")
    if fallbacks:
        lines += breaker_report(fallbacks)  # its section's text lives beside its scenario
    batched = results.get("economy")
    if batched:
        lines += economy_report(batched)
    if results.get("garbage"):
        lines += garbage_report(results["garbage"])
    notes = results.get("notes")
    if notes:
        lines += ["## What bounds the figures", "", notes.strip(), ""]
    out.write_text("\n".join(lines))


def _async_worker(aw: dict[str, Any]) -> list[str]:
    def row(r: dict[str, Any]) -> str:
        shape = f"{r['workers']} x `{r['worker_class']}`" + (
            f" (concurrency {r['concurrency']})" if r["worker_class"] == "async" else ""
        )
        return (
            f"| {shape} | {r['jobs']} | {r['llm_ms']:.0f} | {r['jobs_per_s']:.1f} | {r['p50_ms']:.0f} "
            f"| {r['p99_ms']:.0f} | {r['peak_rss_mib']:.0f} | {r['cpu_ms_per_job']:.2f} |"
        )

    header = [
        "| workers | jobs | LLM ms | jobs/s | first start -> DONE p50 ms | p99 ms | peak RSS MiB (worker group) "
        "| CPU ms per job |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    first = aw["side_by_side"][0]
    lines = [
        "## 6. Many LLM calls in flight per worker process (`WORKER_CLASS=async`)",
        "",
        "The jobs are queued first (`submitTexts`, 100 per call), then the workers start: jobs/s is how fast",
        "they drain the batch, from their first job to the last, and the latency of each job is from that first",
        "start to its end. The stub answers every call after the LLM latency shown. RSS is sampled every 50 ms",
        "over the worker process and its children; CPU is theirs over the run.",
        "",
        *header,
        *[row(r) for r in aw["side_by_side"]],
        "",
        f"Targets for one async process: >= {TARGETS['async_jobs_per_s']} jobs/s: "
        f"{_mark(first['jobs_per_s'] >= TARGETS['async_jobs_per_s'])}; <= {TARGETS['async_rss_mib']} MiB: "
        f"{_mark(first['peak_rss_mib'] <= TARGETS['async_rss_mib'])}. Ratio to "
        f"{aw['side_by_side'][1]['workers']} `fork` workers: "
        f"{first['jobs_per_s'] / aw['side_by_side'][1]['jobs_per_s']:.1f}x the jobs/s.",
        "",
        *_ceiling(aw.get("ceiling")),
        "Concurrency sweep, one async process:",
        "",
        *header,
        *[row(r) for r in aw["sweep"]],
        "",
        "Per-job CPU cost with the LLM at 0 ms (one async process, concurrency 256):",
        "",
        *header,
        row(aw["cpu"]),
        "",
    ]
    profile = aw.get("profile")
    if profile:
        shares = ", ".join(f"{name} {share:.0%}" for name, share in list(profile["shares"].items())[:10])
        lines += [
            f"Where the worker's CPU goes at concurrency {profile['concurrency']} ({profile['jobs']} jobs, py-spy "
            f"over every thread; the share of samples with each library on the stack, so they overlap): {shares}.",
            "",
        ]
    rpm = aw["rpm"]
    ok = TARGETS["rpm_low"] * rpm["rpm"] / 600 <= rpm["per_minute"] <= rpm["rpm"] and rpm["answered_429"] == 0
    lines += [
        f"`LLM_RPM={rpm['rpm']}` over {rpm['seconds']:.0f} s, two async worker processes, a deep queue, against a",
        f"stub that answers 429 past {rpm['rpm']} requests in any 60 s: {rpm['calls']} calls "
        f"({rpm['per_minute']:.0f} a minute), {rpm['answered_429']} answered 429. Target <= {rpm['rpm']} and "
        f">= {TARGETS['rpm_low'] * rpm['rpm'] // 600} a minute with no 429: {_mark(ok)}.",
        "",
    ]
    return lines


def _ceiling(c: dict[str, Any] | None) -> list[str]:
    """The async worker as a share of its client's ceiling: the SDK alone, same run."""
    if not c:
        return []
    rows = [
        f"| {n} | {r['sdk']['calls_per_s']:.1f} | {r['sdk']['cpu_ms_per_call']:.2f} | {r['worker']['jobs_per_s']:.1f} "
        f"| {r['worker']['cpu_ms_per_job']:.2f} | {r['ratio']:.2f}x |"
        for n, r in enumerate(c["rounds"], 1)
    ]
    return [
        "Against its client's ceiling: the SDK alone (`bench/sdk_alone.py`: the client the worker builds, on",
        "uvloop, the request a job makes, its answer parsed; no RQ, no Redis; a process of its own) makes",
        f"{c['jobs']} calls at concurrency {c['concurrency']} to the same stub ({c['llm_ms']:.0f} ms), alternating with",
        f"one async worker draining {c['jobs']} jobs at the same concurrency; neither streamed (`LLM_STREAM=false`).",
        "",
        "| round | the SDK alone: calls/s | CPU ms per call | the worker: jobs/s | CPU ms per job | worker / SDK |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"The worker at {c['ratio']:.2f}x the SDK alone (median of the rounds); target >= "
        f"{TARGETS['async_vs_sdk']}: {_mark(c['ratio'] >= TARGETS['async_vs_sdk'])}.",
        "",
    ]


def _partials(pr: dict[str, Any]) -> list[str]:
    f, cost = pr["fan_out"], pr["commands"]
    within = f["frames_max"] <= f["bound"]
    extra = cost["on"]["total"] - cost["off"]["total"]
    commands = sorted({c for row in cost.values() for c in row["by_command"]})
    return [
        "## 7. Streamed partial results (`partial: true`)",
        "",
        f"One job, queued, followed by {f['subscribers']} websockets with `partial: true` on one API process; then one",
        f"async worker starts and the stub streams the answer in {f['chunks']} chunks over {f['stream_s']:.1f} s",
        "(`PARTIAL_INTERVAL_MS=100`). Publish time is when a Redis subscriber of the frame channel got the frame;",
        "client time, when each websocket did (both in the load generator's process).",
        "",
        "| subscribers | frames published | interim frames per subscriber (min / median / max) | bound | "
        "publish -> client p50 ms | p99 ms | API CPU s | API CPU ms per 1,000 frames delivered |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {f['subscribers']} | {f['published']} | {f['frames_min']} / {f['frames_median']:.0f} / {f['frames_max']} "
        f"| {f['bound']:.0f} | {f['p50_ms']:.1f} | {f['p99_ms']:.1f} | {f['api_cpu_s']:.2f} "
        f"| {f['api_cpu_ms_per_1000_frames']:.1f} |",
        "",
        f"Frames per subscriber within {f['stream_s']:.1f} s / 100 ms + 2: {_mark(within)}.",
        "",
        "Redis commands one attempt runs (the worker's pipeline in process, INFO commandstats, which counts the",
        "commands inside the transition script too; streaming off waits as long for a whole answer):",
        "",
        "| streaming | total | " + " | ".join(commands) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in commands) + " |",
        *[
            f"| {name} | {row['total']} | " + " | ".join(str(row["by_command"].get(c, 0)) for c in commands) + " |"
            for name, row in cost.items()
        ],
        "",
        f"Streaming on, nobody watching: {extra:+d} commands per job against streaming off. Target within 2: "
        f"{_mark(abs(extra) <= 2)}.",
        "",
        "What streaming costs the worker's CPU (one async process at concurrency 256, LLM at 0 ms, the answer in",
        "8 chunks, nobody watching):",
        "",
        "| `LLM_STREAM` | jobs | jobs/s | CPU ms per job |",
        "| --- | ---: | ---: | ---: |",
        *[
            f"| {name} | {r['jobs']} | {r['jobs_per_s']:.1f} | {r['cpu_ms_per_job']:.2f} |"
            for name, r in pr["cpu"].items()
        ],
        "",
    ]


def _history(hi: dict[str, Any]) -> list[str]:
    a, li = hi["archive"], hi["listing"]
    return [
        "## 8. The PostgreSQL job history (`DATABASE_URL`)",
        "",
        f"{a['jobs']} jobs queued, then one async worker (concurrency 256, LLM at 0 ms) drains them; with the history",
        "on, rows/s is from the first job's end to the last row committed (the table polled every 50 ms).",
        "",
        "| history | jobs/s | CPU ms per job | rows/s into PostgreSQL |",
        "| --- | ---: | ---: | ---: |",
        f"| off | {a['off']['jobs_per_s']:.1f} | {a['off']['cpu_ms_per_job']:.2f} | |",
        f"| on | {a['on']['jobs_per_s']:.1f} | {a['on']['cpu_ms_per_job']:.2f} | {a['rows_per_s']:.0f} |",
        "",
        f"`jobs(first: 50)` with {li['rows']:,} archived rows of one tenant, {li['requests']} requests each, one at a",
        "time against one API process (Redis holds none of them: every page comes from PostgreSQL):",
        "",
        "| page | p50 ms | p99 ms |",
        "| --- | ---: | ---: |",
        f"| the first | {li['first_p50_ms']:.1f} | {li['first_p99_ms']:.1f} |",
        f"| deep (after a cursor anywhere in the history) | {li['deep_p50_ms']:.1f} | {li['deep_p99_ms']:.1f} |",
        "",
    ]


def _webhooks(wh: dict[str, Any]) -> list[str]:
    lines = [
        "## 9. Webhooks (`webhookUrl`)",
        "",
        f"{wh['jobs']} jobs queued, then one async worker drains them, without webhooks and with one on every job, in",
        "the same run. With the LLM at 0 ms the worker is bound by its CPU, so the deliveries' cost shows in full;",
        "at 1 s it is bound by the LLM, as in production. Deliveries/s is from the first event received to the last,",
        "at a loopback receiver that verifies every signature (tests/webhook_receiver.py, in a process of its own).",
        "",
        "| LLM | concurrency | LLM jobs/s, off | on | ratio | CPU ms per job, off | on | deliveries/s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in wh["rows"]:
        lines.append(
            f"| {r['llm_ms']:.0f} ms | {r['concurrency']} | {r['off']['jobs_per_s']:.1f} | {r['on']['jobs_per_s']:.1f} | "
            f"{r['ratio']:.2f}x | {r['off']['cpu_ms_per_job']:.2f} | {r['on']['cpu_ms_per_job']:.2f} | "
            f"{r['deliveries_per_s']:.0f} |"
        )
    bound, cpu = wh["rows"][-1], wh["rows"][0]
    lines += [
        "",
        f"Target: LLM jobs/s with webhooks within 10 % of without, with the LLM at {bound['llm_ms']:.0f} ms: "
        f"{bound['ratio']:.2f}x, {_mark(bound['ratio'] >= 0.9)}. With the LLM at 0 ms ({cpu['ratio']:.2f}x) "
        "each delivery's own CPU shows in full: it is an RQ job, with an LLM job's bookkeeping (dequeue, "
        "execution, registries, result) around one HTTP call.",
    ]
    return [*lines, ""]


def _sentinel(sent: dict[str, Any]) -> list[str]:
    sub, fail = sent["submit"], sent["failover"]
    names = {"direct": "straight to the primary (REDIS_URL)", "acked_0": "through Sentinel, REDIS_MIN_REPLICAS_ACKED=0",
             "acked_1": "through Sentinel, REDIS_MIN_REPLICAS_ACKED=1"}  # fmt: skip
    lines = [
        "## 10. Redis behind Sentinel (a primary, one replica, three sentinels)",
        "",
        "submitText, one API process, the same load generator as section 1, alternating rounds:",
        "",
        "| API's Redis | requests/s | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {names[k]} | {v['rps']:.0f} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} |" for k, v in sub.items()),
        "",
        f"**REDIS_MIN_REPLICAS_ACKED=1 / 0: {sent['ratio']:.2f}x** (per round: "
        + ", ".join(f"{x:.2f}" for x in sent["ratios"])
        + "): the price of one WAIT round trip per submission.",
        "",
        "The failover window: a client submits every 20 ms; the primary is SIGKILLed; as soon as the sentinels",
        "have promoted the replica, the old primary is restarted (empty) as its replica.",
        "",
        "| REDIS_MIN_REPLICAS_ACKED | replica promoted after | old primary back as a replica after "
        "| first failed to first successful submit | submissions refused |",
        "| ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {k[-1]} | {v['promoted_s']:.2f} s | {v['replica_back_s']:.2f} s | {v['window_s']:.2f} s | {v['refused']} |"
            for k, v in fail.items()
        ),  # fmt: skip
        "",
        "With 1, the new primary has no replica to confirm a write until the old one is back: submissions are",
        "refused (SERVICE_UNAVAILABLE) until then, rather than acknowledged and exposed to the next failover.",
        "",
    ]
    return lines


def _http_streams(streams: dict[str, Any]) -> list[str]:
    rows, n = streams["rows"], streams["subscribers"]
    ws, sse = rows["graphql-transport-ws"], rows["sse"]
    return [
        f"## 11. Subscriptions over HTTP: Server-Sent Events beside graphql-transport-ws ({n} subscriptions)",
        "",
        "As section 2, on a fresh API process for each transport: one subscription per connection (a websocket, or",
        "an HTTP connection holding its event stream), all idle, then one job changing while the others idle, then",
        "every job at once.",
        "",
        "| transport | KiB per idle subscription | API RSS (MiB) | one job changes p50 / p99 (ms) "
        "| all change at once p50 / p99 (ms) |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(
            f"| {name} | {r['kib_per_sub']:.1f} | {r['rss_mib']:.0f} | {r['one_p50_ms']:.2f} / {r['one_p99_ms']:.2f} "
            f"| {r['all_p50_ms']:.0f} / {r['all_p99_ms']:.0f} |"
            for name, r in rows.items()
        ),
        "",
        f"SSE / websocket: {sse['kib_per_sub'] / ws['kib_per_sub']:.2f}x the memory per subscription, "
        f"{sse['one_p99_ms'] / ws['one_p99_ms']:.2f}x the one-change p99.",
        "",
    ]


def _bulk(b: dict[str, Any]) -> list[str]:
    cli, hand = b["cli"], b["by_hand"]
    return [
        f"## 12. A file of {b['jobs']} texts to a file of results (LLM {b['llm_ms']:.0f} ms, one async worker, "
        "concurrency 256)",
        "",
        "`gql-service submit --file texts.txt --output results.jsonl` (a batch, chunks of 100, the results read from",
        "`endedJobs` as they end) beside a script doing the same by hand (`submitTexts` in chunks of 100, then",
        "`nodes(ids:)` every half second for the jobs not ended yet), in the same run; each from its first request to",
        "its last result.",
        "",
        "| way | wall time (s) | jobs/s |",
        "| --- | ---: | ---: |",
        f"| `submit --file --output` | {cli['wall_s']:.1f} | {cli['jobs_per_s']:.1f} |",
        f"| `submitTexts` by hand, `nodes(ids:)` | {hand['wall_s']:.1f} | {hand['jobs_per_s']:.1f} |",
        "",
        f"CLI / by hand: {b['ratio']:.2f}x the jobs/s.",
        "",
    ]


def _hostile(h: dict[str, Any]) -> list[str]:
    rows = h["rows"]
    strict = "strict_plain_p50_ms" in h  # runs before trusted documents had no such column
    return [
        "## 13. Hostile queries (one API process, each shape of tests/test_hostile_queries.py)",
        "",
        f"{h['rounds']} rounds of one request of each shape in turn, each document made unique by a comment (no",
        f"cache answers it), beside a plain `job` query in the same rounds: {h['plain_p50_ms']:.2f} ms p50.",
        *(
            [
                "In the same rounds, the same shapes against a second process with `TRUSTED_DOCUMENTS_ONLY=true`",
                "(a manifest holding the plain query alone), which refuses each one `PERSISTED_QUERY_NOT_IN_LIST` before",
                f'parsing it (its plain query: {h["strict_plain_p50_ms"]:.2f} ms p50); "decision" is that refusal',
                "measured in process: a SHA-256 of the text and a lookup.",
            ]
            if strict
            else []
        ),
        "",
        "| shape | characters | answer | p50 ms | max ms | p50 / plain |"
        + (" trusted-only p50 ms | decision µs |" if strict else ""),
        "| --- | ---: | --- | ---: | ---: | ---: |" + (" ---: | ---: |" if strict else ""),
        *(
            f"| {name} | {r['chars']} | {'refused' if r['refused'] else 'answered'} | {r['p50_ms']:.2f} "
            f"| {r['max_ms']:.2f} | {r['ratio']:.1f}x |"
            + (f" {r['strict_p50_ms']:.2f} | {r['decision_us']:.1f} |" if strict else "")
            for name, r in rows.items()
        ),
        "",
    ]


def _documents(d: dict[str, Any]) -> list[str]:
    rows = d["rows"]
    return [
        "## 14. Trusted documents: a `job` query by `documentId` beside the same query in full",
        "",
        f"One API process with `TRUSTED_DOCUMENTS`, {d['concurrency']} connections, {d['rounds']} alternating rounds",
        f"of {d['seconds']:.0f} s each (medians). In full, the document is found in the parse cache by its text and",
        "validated on each request; by id, it is looked up in the manifest loaded at start-up.",
        "",
        "| request | requests/s | p50 ms | errors |",
        "| --- | ---: | ---: | ---: |",
        *(
            f"| {'`documentId`' if name == 'by_id' else 'document in full'} | {r['rps']:.0f} | {r['p50_ms']:.2f} "
            f"| {r['errors']} |"
            for name, r in rows.items()
        ),
        "",
        f"By id: {d['ratio']:.2f}x the requests/s of the same query in full.",
        "",
    ]


TRACING_MODES = {"off": "off", "always_on": "on, `always_on`", "ratio_0.1": "on, `traceidratio` 0.1"}


def _tracing(t: dict[str, Any]) -> list[str]:
    sub, work = t["submit"], t["worker"]

    def per_round(values: list[float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values)

    target = t["target"]
    s_on, w_on = sub["always_on"], work["always_on"]
    met = s_on["ratio"] >= target and w_on["ratio"] >= target
    return [
        "## 15. What tracing costs (off, `always_on`, one trace in ten)",
        "",
        "Tracing turned on by the standard variables of the API and worker processes (`OTEL_EXPORTER_OTLP_ENDPOINT`,",
        "`OTEL_TRACES_SAMPLER=always_on`, or `traceidratio` with `OTEL_TRACES_SAMPLER_ARG=0.1`), the spans sent to a",
        "real OTLP/HTTP receiver (tests/otlp_receiver.py in a process of its own, on the same cores) that counts them.",
        f"{t['rounds']} interleaved round{'s' if t['rounds'] > 1 else ''} (off, always_on, 10 %, repeated); figures are the medians over the rounds,",
        'and "/ off" is the median of each round\'s ratio to the off run of the same round.',
        "",
        "submitText: one API process per mode, all three up at once, the load generator of section 1",
        f"({t['concurrency']} connections, {t['seconds']:g} s a round) against each in turn. Requests and",
        "dropped spans are each API's own `/metrics` (`gqls_trace_spans_dropped_total`), warm-up included.",
        "",
        "| tracing | requests/s | / off (per round) | p50 ms | p99 ms | errors | API CPU µs per request | / off "
        "| requests | spans received | spans per request | spans dropped |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {TRACING_MODES[m]} | {r['rps']:.0f} | {r['ratio']:.2f} ({per_round(r['ratios'])}) | {r['p50_ms']:.1f} "
            f"| {r['p99_ms']:.1f} | {r['errors']:.0f} | {r['api_cpu_us']:.0f} | {r['cpu_ratio']:.2f} "
            f"| {r['requests']:.0f} | {r['spans']} "
            f"| {r['spans_per_request']:.2f} | {r['dropped']:.0f} |"
            for m, r in sub.items()
        ),
        "",
        f"The async worker: as section 6, {t['jobs']} jobs queued, then one async worker (concurrency "
        f"{t['worker_concurrency']}) drains them, the stub's LLM at {t['llm_ms']:.0f} ms, not streamed",
        "(`LLM_STREAM=false`). Spans per job are the worker's (`job extract` and its `chat` span); the API's spans",
        "(a `submitTexts` request per 100 jobs) are counted apart. A worker serves no `/metrics`: its drops show",
        "as a WARNING line in its log, counted here.",
        "",
        "| tracing | jobs/s | / off (per round) | CPU ms per job | / off | spans per job | API spans | "
        "drop warnings in the logs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {TRACING_MODES[m]} | {r['jobs_per_s']:.1f} | {r['ratio']:.2f} ({per_round(r['ratios'])}) "
            f"| {r['cpu_ms_per_job']:.2f} | {r['cpu_ratio']:.2f} | {r['spans_per_job']:.2f} | {r['api_spans']} "
            f"| {r['drop_warnings']} |"
            for m, r in work.items()
        ),
        "",
        f"Target: `always_on` costs at most {(1 - target) * 100:.0f} % of either figure (/ off >= {target:.2f}): submitText "
        f"{s_on['ratio']:.2f}x, {_mark(s_on['ratio'] >= target)}; async worker jobs/s {w_on['ratio']:.2f}x, "
        f"{_mark(w_on['ratio'] >= target)}. Overall: {_mark(met)}. In CPU, which a shared machine moves less than "
        f"throughput: `always_on` costs the API {s_on['cpu_ratio']:.2f}x the CPU per request and the worker "
        f"{w_on['cpu_ratio']:.2f}x the CPU per job.",
        "",
        *_tracing_profile(t.get("profile")),
        f"Noise: with tracing off, submitText requests/s moved {sub['off']['spread']:.0%} and the worker's jobs/s "
        f"{work['off']['spread']:.0%} between their own rounds (max / min - 1). The receiver used "
        f"{s_on['receiver_cpu_share']:.0%} of a core during the `always_on` submitText rounds "
        f"({sub['ratio_0.1']['receiver_cpu_share']:.0%} at one in ten).",
        "",
    ]


def _tracing_profile(profile: dict[str, Any] | None) -> list[str]:
    if not profile:
        return []

    def where(p: dict[str, Any]) -> str:
        return (
            f"{p['share']:.1%} ({p['spans']:.1%} making and ending spans on the request's or job's path, "
            f"{p['export']:.1%} the batch processor's thread encoding and sending them, {p['glue']:.1%} the "
            f"service's own tracing code)"
        )

    return [
        "Where `always_on` spends the CPU: py-spy over every thread of each process, tracing on; the share of its busy",
        "samples with OpenTelemetry on the stack or the service's tracing code innermost (a machine's other load does",
        f"not move a share as it moves requests/s). The API under the submitText load: {where(profile['api'])}. The",
        f"async worker draining its jobs: {where(profile['worker'])}.",
        "",
    ]


def _priorities(p: dict[str, Any]) -> list[str]:
    wait, e2e = p["wait"], p["end_to_end"]
    return [
        f"## 17. Priorities: {p['high_jobs']} HIGH jobs behind {p['low_jobs']:,} queued LOW ones (LLM {p['llm_ms']:.0f} ms, "
        f"one async worker, concurrency {p['concurrency']})",
        "",
        "The LOW jobs are queued first; once the worker has every slot busy with them, the HIGH jobs are submitted one",
        "at a time (half an LLM call apart). A HIGH job's wait is from its submission to its start, by the job's own",
        "record; the worker keeps one take in ten for LOW (and one for NORMAL), so a HIGH job waits for a free slot.",
        "",
        "| HIGH jobs | p50 ms | p99 ms | max ms |",
        "| --- | ---: | ---: | ---: |",
        f"| wait (submitted to started) | {wait['p50_ms']:.0f} | {wait['p99_ms']:.0f} | {wait['max_ms']:.0f} |",
        f"| end to end (submitted to ended) | {e2e['p50_ms']:.0f} | {e2e['p99_ms']:.0f} | {e2e['max_ms']:.0f} |",
        "",
        f"From the first HIGH submission to the last HIGH end, {p['low_done']} LOW jobs ended ({p['low_per_s']:.1f}/s):",
        f"first in, first out, a job submitted behind the {p['low_jobs']:,} would have waited about",
        f"{p['fifo_wait_s']:.0f} s.",
        "",
    ]
