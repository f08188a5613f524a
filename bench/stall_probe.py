"""How long an HTTP endpoint takes to answer while something else loads its server: a GET
every `interval` ms until stdin closes, then one JSON line (requests, slowest, p99, median).

Run in a process of its own, so the load generator's event loop can't delay the probe and
be mistaken for the server's (`/healthz` answers at once unless the API's loop is stalled).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import httpx


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    args = parser.parse_args()
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    times: list[float] = []
    with httpx.Client(timeout=30) as client:
        while not done.is_set():
            start = time.perf_counter()
            client.get(args.url).raise_for_status()
            times.append((time.perf_counter() - start) * 1000)
            done.wait(args.interval_ms / 1000)
    times.sort()
    print(json.dumps({
        "requests": len(times),
        "max_ms": times[-1] if times else float("nan"),
        "p99_ms": times[int(0.99 * (len(times) - 1))] if times else float("nan"),
        "p50_ms": times[len(times) // 2] if times else float("nan"),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
