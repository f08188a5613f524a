"""A closed-loop HTTP load generator, run in its own process so it has a core to itself.

`concurrency` keep-alive connections each send the next request as soon as the last one
answered, for `duration` seconds after a short warm-up. Prints one JSON object: requests,
errors, requests/s and latency percentiles in ms. The same generator drives every
service compared, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiohttp


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


async def run(
    url: str, body: bytes, concurrency: int, duration: float, warmup: float, headers: dict[str, str]
) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(
        connector=connector, headers={"content-type": "application/json", **headers}
    ) as session:
        start = time.perf_counter()
        measure_from = start + warmup
        stop_at = measure_from + duration

        async def worker() -> None:
            nonlocal errors
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                try:
                    async with session.post(url, data=body) as response:
                        payload = await response.read()
                        ok = response.status == 200 and b'"errors"' not in payload
                except aiohttp.ClientError:
                    ok = False
                t1 = time.perf_counter()
                if t0 >= measure_from:
                    if ok:
                        latencies.append((t1 - t0) * 1000)
                    else:
                        errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / duration,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "mean_ms": sum(latencies) / len(latencies) if latencies else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="request body (JSON text)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--header", action="append", default=[], help="Name: value")
    args = parser.parse_args()
    headers = dict(h.split(": ", 1) for h in args.header)
    stats = asyncio.run(run(args.url, args.body.encode(), args.concurrency, args.duration, args.warmup, headers))
    json.dump(stats, sys.stdout)


if __name__ == "__main__":
    main()
