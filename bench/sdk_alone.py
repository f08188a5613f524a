"""The async worker's ceiling: its LLM client alone, making the calls its jobs make.

`python -m bench.sdk_alone BASE_URL CALLS CONCURRENCY [--stream]` makes CALLS chat
completions, at most CONCURRENCY at once, with the client the worker builds
(gql_service.worker.llm.openai_provider.make_client: the SDK's aiohttp transport, no SDK
retries) on the loop the worker runs (uvloop), asking what a job asks (the same prompt and
response format) and parsing the answer as the provider does; no RQ, no Redis. It prints one
line of JSON: calls/s from the first call's start to the last one's end, and this process's
CPU ms per call over the calls (start-up and one warm-up call excluded, as the worker's CPU
is counted from the moment it listens, after its own warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from typing import Any

import uvloop

from gql_service.settings import Settings
from gql_service.worker.llm import prompt
from gql_service.worker.llm.openai_provider import make_client, request_options

TEXT = "I loved the clinic. Dr. Rao was kind. Waiting time was 10 minutes at Springfield General Hospital."


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _run(base_url: str, calls: int, concurrency: int, stream: bool) -> dict[str, Any]:
    defaults = Settings.model_fields
    client = make_client(api_key="sk-bench", base_url=base_url, timeout_s=defaults["llm_timeout_s"].default)()
    options = request_options(defaults["openai_model"].default, json_schema=True)
    slots = asyncio.Semaphore(concurrency)

    async def call(n: int) -> None:
        messages: Any = prompt.messages(f"{TEXT} ({n})")
        async with slots:
            if stream:
                chunks = await client.chat.completions.create(
                    messages=messages, stream=True, stream_options={"include_usage": True}, **options
                )
                async with chunks:
                    async for _ in chunks:
                        pass
            else:
                raw = await client.chat.completions.with_raw_response.create(messages=messages, **options)
                raw.parse()

    try:
        await call(-1)  # the SDK builds its models on the first call: the worker warms up too
        cpu, started = _cpu_s(), time.monotonic()
        await asyncio.gather(*(asyncio.create_task(call(n)) for n in range(calls)))
        wall, cpu = time.monotonic() - started, _cpu_s() - cpu
    finally:
        await client.close()
    per_s, cpu_ms = calls / wall, cpu * 1000 / calls
    return {"calls": calls, "concurrency": concurrency, "calls_per_s": per_s, "cpu_ms_per_call": cpu_ms}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sdk_alone", description=__doc__)
    parser.add_argument("base_url")
    parser.add_argument("calls", type=int)
    parser.add_argument("concurrency", type=int)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        row = runner.run(_run(args.base_url, args.calls, args.concurrency, args.stream))
    print(json.dumps(row))


if __name__ == "__main__":
    main()
