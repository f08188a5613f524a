"""`python -m bench.trace_picture [--out docs/trace.svg]`: the example trace of
docs/operations/tracing.md, drawn from a real one.

It starts Redis, the API and one worker with tracing on, sends their spans to the tests' OTLP
receiver (which decodes the protobuf as a collector would), submits one text to the tests'
OpenAI-compatible stub streaming a 1.2 s answer (after one to warm up), follows the job over a websocket, and draws
the job's trace (and the subscription's span that links to it) as a waterfall in SVG: no
drawing library, a picture of a few rows is a few rectangles.
"""

from __future__ import annotations

import argparse
import asyncio
from html import escape
from pathlib import Path

from gql_service.cli.embedded_redis import EmbeddedRedis
from tests.clients import follow, post
from tests.openai_stub import OpenAIStub
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.service import Service

from .scenarios import stub_env

SUBMIT = "mutation($text: String!) { submitText(input: {text: $text}) { job { id traceId } } }"
TEXT = "I loved the clinic. Dr. Rao was kind. Waiting time was 10 minutes in Boston."
WIDTH, LABELS, ROW, TOP = 960, 300, 42, 60
COLOURS = {"gql-service-api": "#4f7cc9", "gql-service-worker": "#3f9d6a"}
# The events worth a mark: stages, the first token, and the subscriber's terminal frame.
MARKED = {"CALLING_LLM", "VALIDATING", "REPAIRING", "DONE", "FAILED", "gen_ai.first_token", "terminal frame"}


def render(spans: list[ReceivedSpan], trace_id: str) -> str:
    """The trace `trace_id` as a waterfall, each span under its parent, then the spans of
    other traces that link to it (a subscription's)."""
    own = [s for s in spans if s.trace_id == trace_id]
    linked = [s for s in spans if s.trace_id != trace_id and any(t == trace_id for t, _ in s.links)]
    rows: list[tuple[ReceivedSpan, int]] = []

    def place(parent: str, depth: int) -> None:
        for span in sorted((s for s in own if s.parent_span_id == parent), key=lambda s: s.start_ns):
            rows.append((span, depth))
            place(span.span_id, depth + 1)

    ids = {s.span_id for s in own}
    place("", 0)
    for orphan in (s for s in own if s.parent_span_id and s.parent_span_id not in ids):
        rows.append((orphan, 0))
    rows += [(s, 0) for s in sorted(linked, key=lambda s: s.start_ns)]
    start = min(s.start_ns for s, _ in rows)
    total = max(max(s.end_ns for s, _ in rows) - start, 1)
    scale = (WIDTH - LABELS - 70) / total  # room for the last duration

    def x(ns: int) -> float:
        return LABELS + (ns - start) * scale

    height = TOP + ROW * len(rows) + 40
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
        f'<text x="10" y="18" font-weight="bold">trace {trace_id[:16]}… one submitText, from the request to the '
        f"model and back ({total / 1e6:,.0f} ms)</text>",
    ]
    step = _step_ms(total / 1e6)
    tick = 0.0
    while tick * 1e6 <= total:
        tx = x(start + int(tick * 1e6))
        out.append(f'<line x1="{tx:.1f}" y1="{TOP - 12}" x2="{tx:.1f}" y2="{height - 30}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{tx:.1f}" y="{TOP - 16}" text-anchor="middle" fill="#777">{tick:g} ms</text>')
        tick += step
    for n, (span, depth) in enumerate(rows):
        y = TOP + n * ROW
        colour = COLOURS.get(span.service, "#999")
        label = f"{span.name}" + ("  (linked trace)" if span.trace_id != trace_id else "")
        out.append(f'<text x="{10 + 14 * depth}" y="{y + 14}">{escape(label)}</text>')
        out.append(f'<text x="{10 + 14 * depth}" y="{y + 26}" fill="#777" font-size="10">{escape(span.service)}</text>')
        bar_x, bar_w = x(span.start_ns), max((span.end_ns - span.start_ns) * scale, 1.5)
        out.append(f'<rect x="{bar_x:.1f}" y="{y + 3}" width="{bar_w:.1f}" height="14" rx="2" fill="{colour}"/>')
        duration = f"{(span.end_ns - span.start_ns) / 1e6:,.1f} ms"
        out.append(f'<text x="{bar_x + bar_w + 4:.1f}" y="{y + 14}" fill="#444" font-size="10">{duration}</text>')
        marks = [(name, t) for (name, _), t in zip(span.events, span.event_ns, strict=True) if name in MARKED]
        for i, (name, t) in enumerate(marks):  # labels on two lines, so that close ones stay apart
            mx = x(t)
            anchor = "end" if mx > WIDTH - 160 else "start"
            out.append(f'<path d="M{mx:.1f} {y + 17} l4 6 h-8 z" fill="#d0533b"/>')
            out.append(
                f'<text x="{mx + (-6 if anchor == "end" else 6):.1f}" y="{y + 29 + 9 * (i % 2)}" font-size="9" '
                f'fill="#d0533b" text-anchor="{anchor}">{escape(name)}</text>'
            )
    legend_y = height - 12
    out.append(f'<rect x="10" y="{legend_y - 9}" width="10" height="10" fill="{COLOURS["gql-service-api"]}"/>')
    out.append(f'<text x="24" y="{legend_y}">API</text>')
    out.append(f'<rect x="64" y="{legend_y - 9}" width="10" height="10" fill="{COLOURS["gql-service-worker"]}"/>')
    out.append(f'<text x="78" y="{legend_y}">worker</text>')
    out.append(f'<path d="M134 {legend_y - 8} l4 6 h-8 z" fill="#d0533b"/>')
    out.append(f'<text x="144" y="{legend_y}">span events: stages, first token, terminal frame</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _step_ms(total_ms: float) -> float:
    for step in (1, 2, 5, 10, 20, 50, 100, 200, 250, 500, 1000, 2000, 5000):
        if total_ms / step <= 8:
            return float(step)
    return 10_000.0


async def capture() -> tuple[list[ReceivedSpan], str]:
    """One submitText's trace and the subscription that followed it, from real processes."""
    stub = OpenAIStub().start()
    stub.stream_chunks, stub.stream_seconds = 24, 1.2
    try:
        return await _capture(stub)
    finally:
        stub.stop()


async def _capture(stub: OpenAIStub) -> tuple[list[ReceivedSpan], str]:
    with EmbeddedRedis() as redis, OtlpReceiver() as receiver:
        env = {**stub_env("trace-picture", stub), "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
               "OTEL_BSP_SCHEDULE_DELAY": "50"}  # fmt: skip
        with Service(redis.url, workers=1, env=env) as svc:
            warm = post(svc, SUBMIT, text=TEXT).json()["data"]["submitText"]["job"]
            await follow(svc, warm["id"])  # the picture is of a warm service, not of its first job
            job = post(svc, SUBMIT, text=TEXT).json()["data"]["submitText"]["job"]
            await follow(svc, job["id"])
            trace_id = job["traceId"]

            def complete(spans: list[ReceivedSpan]) -> bool:
                names = {s.name for s in spans if s.trace_id == trace_id or any(t == trace_id for t, _ in s.links)}
                return {"mutation submitText", "job extract", "subscription jobUpdates"} <= names and any(
                    n.startswith("chat ") for n in names
                )

            return receiver.wait_for(complete, what=f"trace {trace_id}"), trace_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/trace.svg"))
    args = parser.parse_args()
    spans, trace_id = asyncio.run(capture())
    args.out.write_text(render(spans, trace_id))
    print(f"wrote {args.out} (trace {trace_id})")


if __name__ == "__main__":
    main()
