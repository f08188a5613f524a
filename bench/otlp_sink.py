"""tests/otlp_receiver.py (a real OTLP/HTTP receiver, decoding each export as a collector
would) in a process of its own, for the tracing section: in the harness's process it would
take the GIL from the LLM stub beside it (bench/webhooks.py found that for its receiver).

`python -m bench.otlp_sink` prints its endpoint (OTEL_EXPORTER_OTLP_ENDPOINT), then answers
each line read on stdin with one JSON line: the spans received since the last answer,
counted by "service|span name", and the export requests so far. It stops at EOF.
"""

from __future__ import annotations

import collections
import json
import sys

from tests.otlp_receiver import OtlpReceiver


def main() -> None:
    with OtlpReceiver() as receiver:
        print(receiver.endpoint, flush=True)
        seen = 0
        for _ in sys.stdin:
            spans = receiver.wait_for(lambda _: True, timeout_s=0)
            counts = collections.Counter(f"{s.service}|{s.name}" for s in spans[seen:])
            seen = len(spans)
            print(json.dumps({"spans": counts, "requests": receiver.requests}), flush=True)


if __name__ == "__main__":
    main()
