"""13. Hostile queries: what refusing (or answering) each shape of tests/test_hostile_queries
costs one API process, beside a plain query on the same process in the same run.

Each request carries a comment of its own, so no cache of parsed or validated documents
answers it: an attacker varies the document too.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.service import Service
from tests.test_hostile_queries import SHAPES

from .harness import median, progress
from .scenarios import Sizes, offline_env

PLAIN = 'query { job(id: "x") { id status } }'


def _time(client: httpx.Client, url: str, query: str, operation: str | None) -> tuple[float, bool]:
    """Seconds for one request, and whether the answer was a refusal (errors, no data)."""
    body = {"query": f"# {time.monotonic_ns()}\n{query}", "operationName": operation}
    started = time.perf_counter()
    answer = client.post(url, json=body).json()
    return time.perf_counter() - started, answer.get("data") is None and bool(answer.get("errors"))


def hostile_queries(redis_url: str, sizes: Sizes) -> dict[str, Any]:
    n = sizes.hostile_rounds
    progress(f"13/13 hostile queries: {len(SHAPES)} shapes x {n} requests, beside a plain query")
    shapes = {"plain": (PLAIN, None), **{name: (query, "q0" if name == "many_operations" else None)
                                         for name, (query, _) in SHAPES.items()}}  # fmt: skip
    took: dict[str, list[float]] = {name: [] for name in shapes}
    refused: dict[str, bool] = dict.fromkeys(shapes, True)
    with Service(redis_url, workers=0, env=offline_env("bench-hostile")) as svc, httpx.Client(timeout=60) as client:
        for _ in range(3):  # the process's first requests: imports
            _time(client, svc.http_url, PLAIN, None)
        # Round after round of every shape, so the machine's noise falls on all of them alike.
        for _ in range(n):
            for name, (query, operation) in shapes.items():
                seconds, was_refused = _time(client, svc.http_url, query, operation)
                took[name].append(seconds)
                refused[name] = refused[name] and was_refused
    base = median(took.pop("plain"))
    rows = {name: {"chars": len(shapes[name][0]), "p50_ms": median(t) * 1e3, "max_ms": max(t) * 1e3,
                   "ratio": median(t) / base, "refused": refused[name]} for name, t in took.items()}  # fmt: skip
    worst = max(rows, key=lambda k: rows[k]["ratio"])
    progress(f"    plain p50 {base * 1e3:.2f} ms; costliest {worst}: {rows[worst]['ratio']:.1f}x")
    return {"rounds": n, "plain_p50_ms": base * 1e3, "rows": rows}
