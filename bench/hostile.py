"""13. Hostile queries: what refusing (or answering) each shape of tests/test_hostile_queries
costs one API process, beside a plain query on the same process in the same run; and the
same shapes against a process with TRUSTED_DOCUMENTS_ONLY, which refuses them unparsed.

Each request carries a comment of its own, so no cache of parsed or validated documents
answers it: an attacker varies the document too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from gql_service.api.documents import DocumentRefused, Documents, Named
from tests.service import Service
from tests.test_hostile_queries import SHAPES

from .harness import median, progress
from .scenarios import Sizes, offline_env

PLAIN = 'query { job(id: "x") { id status } }'


def _time(
    client: httpx.Client, url: str, query: str, operation: str | None, *, unique: bool = True
) -> tuple[float, bool]:
    """Seconds for one request, and whether the answer was a refusal (errors, no data)."""
    body = {"query": f"# {time.monotonic_ns()}\n{query}" if unique else query, "operationName": operation}
    started = time.perf_counter()
    answer = client.post(url, json=body).json()
    return time.perf_counter() - started, answer.get("data") is None and bool(answer.get("errors"))


def _decision_us(query: str) -> float:
    """Microseconds TRUSTED_DOCUMENTS_ONLY takes to refuse a document (in process, no HTTP):
    a SHA-256 of its text and a lookup, never a parse."""
    documents = Documents({hashlib.sha256(PLAIN.encode()).hexdigest(): PLAIN}, None, only=True)

    async def refuse(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            with contextlib.suppress(DocumentRefused):
                await documents.resolve(None, query, Named(None, apq=False))  # type: ignore[arg-type]
        return (time.perf_counter() - started) / n

    return asyncio.run(refuse(200)) * 1e6


def hostile_queries(redis_url: str, sizes: Sizes) -> dict[str, Any]:
    n = sizes.hostile_rounds
    progress(f"13. hostile queries: {len(SHAPES)} shapes x {n} requests, beside a plain query, open and trusted-only")
    shapes = {"plain": (PLAIN, None), **{name: (query, "q0" if name == "many_operations" else None)
                                         for name, (query, _) in SHAPES.items()}}  # fmt: skip
    took: dict[str, list[float]] = {name: [] for name in shapes}
    strict_took: dict[str, list[float]] = {name: [] for name in shapes}
    refused: dict[str, bool] = dict.fromkeys(shapes, True)
    with tempfile.TemporaryDirectory() as folder:
        manifest = Path(folder) / "persisted-documents.json"
        manifest.write_text(json.dumps({hashlib.sha256(PLAIN.encode()).hexdigest(): PLAIN}))
        strict_env = {**offline_env("bench-hostile-strict"), "TRUSTED_DOCUMENTS": str(manifest),
                      "TRUSTED_DOCUMENTS_ONLY": "true"}  # fmt: skip
        with (
            Service(redis_url, workers=0, env=offline_env("bench-hostile")) as svc,
            Service(redis_url, workers=0, env=strict_env) as strict,
            httpx.Client(timeout=60) as client,
        ):
            for _ in range(3):  # the process's first requests: imports
                _time(client, svc.http_url, PLAIN, None)
                _time(client, strict.http_url, PLAIN, None, unique=False)
            # Round after round of every shape, so the machine's noise falls on all of them alike.
            for _ in range(n):
                for name, (query, operation) in shapes.items():
                    seconds, was_refused = _time(client, svc.http_url, query, operation)
                    took[name].append(seconds)
                    refused[name] = refused[name] and was_refused
                    # The plain query is a trusted document sent in full: its comment makes it
                    # another text, so it is sent as is here.
                    strict_query = PLAIN if name == "plain" else query
                    strict_took[name].append(
                        _time(client, strict.http_url, strict_query, operation, unique=name != "plain")[0]
                    )
    base = median(took.pop("plain"))
    strict_base = median(strict_took.pop("plain"))
    rows = {name: {"chars": len(shapes[name][0]), "p50_ms": median(t) * 1e3, "max_ms": max(t) * 1e3,
                   "ratio": median(t) / base, "refused": refused[name],
                   "strict_p50_ms": median(strict_took[name]) * 1e3,
                   "decision_us": _decision_us(shapes[name][0])} for name, t in took.items()}  # fmt: skip
    worst = max(rows, key=lambda k: rows[k]["ratio"])
    progress(f"    plain p50 {base * 1e3:.2f} ms; costliest {worst}: {rows[worst]['ratio']:.1f}x")
    return {"rounds": n, "plain_p50_ms": base * 1e3, "strict_plain_p50_ms": strict_base * 1e3, "rows": rows}
