"""15. What tracing costs: submitText requests/s and async worker jobs/s with tracing off, on
with every trace sampled (always_on), and on with one trace in ten (traceidratio 0.1).

Tracing is turned on as a user would, by the standard variables (OTEL_EXPORTER_OTLP_ENDPOINT,
OTEL_TRACES_SAMPLER and _ARG) of the real API and worker processes, and the spans go to a
real OTLP/HTTP receiver (tests/otlp_receiver.py, in a process of its own: bench/otlp_sink.py),
which counts what it got, so the figures show tracing was on.

submitText: one API process per mode, all three up at once; the load generator of section 1
against each in turn, round after round (off, always_on, 10 %, repeated), so every mode sees
the machine as the others do. Each API's `/metrics` gives its requests (every submitText,
warm-up included) and `gqls_trace_spans_dropped_total`; the receiver's spans are counted once
the APIs have stopped (and so sent what they had queued).

The async worker: as section 6, `jobs` queued, then one async worker (concurrency 256) drains
them against the stub's 1 s LLM, not streamed (LLM_STREAM=false); one mode after the other,
round after round. A worker serves no /metrics: its drops show as a WARNING line in its log
("spans dropped"), counted here, and as fewer than two spans per job (`job extract` and its
`chat` span) with always_on.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import httpx
import psutil
from redis import Redis

from tests.openai_stub import OpenAIStub
from tests.service import Service

from . import tracing_profile
from .async_worker import run_workers
from .harness import api_pid, loadgen, median, progress
from .scenarios import SUBMIT_BODY, Sizes, offline_env

MODES = ("off", "always_on", "ratio_0.1")
TARGET = 0.9  # always_on keeps at least 90 % of the figure with tracing off
WORKER_SPANS = ("job extract", "chat ")


def mode_env(mode: str, endpoint: str) -> dict[str, str]:
    if mode == "off":
        return {"OTEL_SDK_DISABLED": "true"}  # as unset, whatever the harness's environment says
    env = {"OTEL_SDK_DISABLED": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    if mode == "always_on":
        return env | {"OTEL_TRACES_SAMPLER": "always_on"}
    return env | {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}


class Sink:
    """bench/otlp_sink.py: the receiver, in its own process."""

    def __init__(self) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "bench.otlp_sink"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.popen.stdout is not None
        self.endpoint = self.popen.stdout.readline().strip()
        self.process = psutil.Process(self.popen.pid)

    def take(self) -> Counter[str]:
        """The spans received since the last take, by "service|name"."""
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.write("take\n")
        self.popen.stdin.flush()
        return Counter(json.loads(self.popen.stdout.readline())["spans"])

    def settled(self, quiet_s: float = 0.5, timeout_s: float = 20.0) -> Counter[str]:
        """Every span received until none has come for `quiet_s` (processes that have just
        stopped: a worker pool's children may still be sending what they had queued)."""
        total = self.take()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            time.sleep(quiet_s)
            more = self.take()
            if not more:
                break
            total += more
        return total

    def cpu_s(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.close()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()


def _metric(text: str, pattern: str) -> float:
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _scrape(svc: Service) -> dict[str, float]:
    """submitText requests the API served and the spans it dropped, from its /metrics."""
    text = httpx.get(svc.http_url.replace("/graphql", "/metrics"), timeout=10).text
    return {
        "requests": _metric(text, r'^gqls_graphql_operations_total\{[^}]*field="submitText"[^}]*\} (\S+)$'),
        "dropped": _metric(text, r"^gqls_trace_spans_dropped_total (\S+)$"),
    }


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _spread(values: list[float]) -> float:
    """max / min - 1 over the rounds: how much one mode moved from round to round."""
    return max(values) / min(values) - 1 if values and min(values) > 0 else float("nan")


def _submit(redis_url: str, sizes: Sizes, sink: Sink) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with contextlib.ExitStack() as stack:
        services = {}
        for mode in MODES:
            env = offline_env(f"bench-tracing-{mode}") | mode_env(mode, sink.endpoint)
            services[mode] = stack.enter_context(Service(redis_url, workers=0, env=env | {"OTEL_SERVICE_NAME": mode}))
        for mode in MODES:  # one unmeasured round each: the first seconds of a server are slower
            loadgen(
                services[mode].http_url, SUBMIT_BODY, concurrency=sizes.concurrency, duration=sizes.submit_seconds / 2
            )
        apis = {mode: psutil.Process(api_pid(svc)) for mode, svc in services.items()}
        for round_ in range(sizes.tracing_rounds):
            for mode in MODES:
                cpu, api_cpu, served = sink.cpu_s(), _cpu_s(apis[mode]), _scrape(services[mode])["requests"]
                stats = loadgen(
                    services[mode].http_url, SUBMIT_BODY, concurrency=sizes.concurrency, duration=sizes.submit_seconds
                )
                stats["receiver_cpu_s"] = sink.cpu_s() - cpu
                # The API's CPU per request served (warm-up included): steadier than requests/s
                # on a shared machine, where the API also waits for a core.
                served = _scrape(services[mode])["requests"] - served
                stats["api_cpu_us"] = (_cpu_s(apis[mode]) - api_cpu) * 1e6 / served if served else float("nan")
                rounds[mode].append(stats)
                progress(
                    f"    round {round_ + 1} {mode:9s} {stats['rps']:7.0f} req/s  p50 {stats['p50_ms']:.1f} ms"
                    f"  API CPU {stats['api_cpu_us']:.0f} us/req  (receiver CPU {stats['receiver_cpu_s']:.2f} s)"
                )
        seen = {mode: _scrape(svc) for mode, svc in services.items()}
    spans = sink.settled()  # the APIs have stopped: what they had queued was sent
    result: dict[str, Any] = {}
    for mode in MODES:
        runs, off = rounds[mode], rounds["off"]
        ratios = [r["rps"] / o["rps"] for r, o in zip(runs, off, strict=True)]
        received = sum(n for key, n in spans.items() if key.split("|", 1)[0] == mode)
        requests = seen[mode]["requests"]
        result[mode] = {
            "rps": median(r["rps"] for r in runs), "rps_rounds": [r["rps"] for r in runs],
            "p50_ms": median(r["p50_ms"] for r in runs), "p99_ms": median(r["p99_ms"] for r in runs),
            "errors": sum(r["errors"] for r in runs), "ratio": median(ratios), "ratios": ratios,
            "spread": _spread([r["rps"] for r in runs]), "requests": requests, "spans": received,
            "spans_per_request": received / requests if requests else 0.0, "dropped": seen[mode]["dropped"],
            "api_cpu_us": median(r["api_cpu_us"] for r in runs),
            "cpu_ratio": median(r["api_cpu_us"] / o["api_cpu_us"] for r, o in zip(runs, off, strict=True)),
            "receiver_cpu_share": sum(r["receiver_cpu_s"] for r in runs) / (sizes.submit_seconds * len(runs)),
        }  # fmt: skip
    return result


def _worker(redis_url: str, stub: OpenAIStub, sizes: Sizes, sink: Sink) -> dict[str, Any]:
    redis = Redis.from_url(redis_url)
    stub.latency_s = sizes.async_llm_s
    rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    try:
        for round_ in range(sizes.tracing_rounds):
            for mode in MODES:
                sink.settled()  # nothing of the round before counts for this one
                logs: list[str] = []
                settings = mode_env(mode, sink.endpoint) | {"LLM_STREAM": "false"}
                row = run_workers(
                    redis, redis_url, stub, worker_class="async", workers=1, concurrency=256, jobs=sizes.async_jobs,
                    settings=settings, queue=f"bench-tracing-{mode}-{round_}", logs=logs,
                )  # fmt: skip
                spans = sink.settled()
                row["worker_spans"] = sum(
                    n for key, n in spans.items() if key.split("|", 1)[1].startswith(WORKER_SPANS)
                )
                row["api_spans"] = sum(spans.values()) - row["worker_spans"]
                row["drop_warnings"] = sum(text.count("spans dropped") for text in logs)
                row["spans_by_name"] = dict(spans)
                rounds[mode].append(row)
                progress(
                    f"    round {round_ + 1} {mode:9s} {row['worker_spans'] / row['jobs']:.2f} worker spans per job"
                )
    finally:
        stub.latency_s = 0.0
    result: dict[str, Any] = {}
    for mode in MODES:
        runs, off = rounds[mode], rounds["off"]
        ratios = [r["jobs_per_s"] / o["jobs_per_s"] for r, o in zip(runs, off, strict=True)]
        cpu_ratios = [r["cpu_ms_per_job"] / o["cpu_ms_per_job"] for r, o in zip(runs, off, strict=True)]
        jobs = sum(r["jobs"] for r in runs)
        result[mode] = {
            "jobs_per_s": median(r["jobs_per_s"] for r in runs), "jobs_per_s_rounds": [r["jobs_per_s"] for r in runs],
            "ratio": median(ratios), "ratios": ratios, "spread": _spread([r["jobs_per_s"] for r in runs]),
            "p50_ms": median(r["p50_ms"] for r in runs), "cpu_ms_per_job": median(r["cpu_ms_per_job"] for r in runs),
            "cpu_ratio": median(cpu_ratios), "peak_rss_mib": median(r["peak_rss_mib"] for r in runs),
            "spans_per_job": sum(r["worker_spans"] for r in runs) / jobs,
            "api_spans": sum(r["api_spans"] for r in runs), "drop_warnings": sum(r["drop_warnings"] for r in runs),
        }  # fmt: skip
    return result


def tracing_cost(redis_url: str, stub: OpenAIStub, sizes: Sizes) -> dict[str, Any]:
    progress(f"15. what tracing costs: off, always_on, traceidratio 0.1; {sizes.tracing_rounds} interleaved rounds")
    sink = Sink()
    try:
        progress(f"    OTLP/HTTP receiver on {sink.endpoint}; submitText, one API process per mode")
        submit = _submit(redis_url, sizes, sink)
        progress(f"    async worker, {sizes.async_jobs} jobs, LLM {sizes.async_llm_s * 1000:.0f} ms, not streamed")
        worker = _worker(redis_url, stub, sizes, sink)
        profile = None
        if sizes.profile:
            progress("    py-spy on the API and on the worker, always_on")
            profile = tracing_profile.profile(redis_url, stub, sizes, mode_env("always_on", sink.endpoint))
            progress(f"    tracing's share of the samples: API {profile['api']['share']:.1%}, "
                     f"worker {profile['worker']['share']:.1%}")  # fmt: skip
    finally:
        sink.stop()
    for mode in MODES[1:]:
        s, w = submit[mode], worker[mode]
        progress(
            f"    {mode}: submitText {s['ratio']:.2f}x off ({s['spans_per_request']:.2f} spans per request), "
            f"worker {w['ratio']:.2f}x off ({w['spans_per_job']:.2f} spans per job)"
        )
    return {
        "rounds": sizes.tracing_rounds, "concurrency": sizes.concurrency, "seconds": sizes.submit_seconds,
        "jobs": sizes.async_jobs, "llm_ms": sizes.async_llm_s * 1000, "worker_concurrency": 256, "target": TARGET,
        "submit": submit, "worker": worker, "profile": profile,
    }  # fmt: skip
