"""Every write effective once, whatever the network does: the API and a worker talk to Redis
through a proxy that lets every 7th EXEC, EVAL and EVALSHA run and then loses its reply
(tests/lossy_proxy.py). redis-py sends such a command again; each write must land once.

Before the fix, 150 submits through such a proxy were all answered and FINISHED, yet the LLM
was called 153 times (a submit's MULTI ran twice: its RQ job queued twice) and 6 jobs had
`attempts` 2 after one attempt (a transition applied twice).

Then the async worker's own RQ bookkeeping (3 runs of 6 failed on one day): a take sent again
took more jobs and left the first take's in RQ's intermediate list for RQ's cleanup to fail a
minute later (the test timed out); the jobs revived from there carried RQ's old "first seen"
mark, and a cleanup failed them again while they ran (a text sent to the LLM twice, or a job
with `attempts` 2). Now a take lands once and clears the mark (tests/test_rq_batches.py).
"""

from __future__ import annotations

import json
from collections import Counter
from urllib.parse import urlparse

from redis import Redis

from gql_service import keys

from .clients import post
from .lossy_proxy import LossyProxy
from .openai_stub import OpenAIStub
from .service import Service, wait_until

SUBMIT = (
    "mutation($text: String!, $key: String) { submitText(input: {text: $text, idempotencyKey: $key}) { job { id } } }"
)
JOBS = "query($ids: [ID!]!) { nodes(ids: $ids) { ... on Job { id status attempts } } }"
N = 150


def test_submits_and_transitions_land_once_through_a_network_that_loses_replies(
    e2e_redis: str, stub: OpenAIStub
) -> None:
    texts = [f"Lossy review {i}: the soup was cold but the staff were kind." for i in range(N)]
    port = urlparse(e2e_redis).port
    assert port is not None
    with LossyProxy(port, every=7) as proxy:
        # A lost reply can also lose RQ's hold on a job (its start written, the reply lost
        # after redis-py's retries): the job is then noticed as lost and run again after
        # WORKER_LOST_AFTER_S (60 s by default, which once ran this test past its 120 s), once.
        env = {**stub.env, "RQ_QUEUE": "llm-lossy", "WORKER_CONCURRENCY": "16", "WORKER_LOST_AFTER_S": "5"}
        with Service(proxy.url, workers=1, env=env) as svc:
            # Half with an idempotency key, tried again with it when the service could not
            # say whether the write landed (what a client should do); half without, whose
            # unanswered submits may or may not have made a job (nobody can know).
            acknowledged: dict[str, str] = {}
            for i, text in enumerate(texts):
                key = f"lossy-{i}" if i % 2 else None
                for _ in range(5 if key else 1):
                    answer = post(svc, SUBMIT, text=text, key=key).json()
                    if "errors" not in answer:
                        acknowledged[text] = answer["data"]["submitText"]["job"]["id"]
                        break
                    assert answer["errors"][0]["extensions"]["code"] == "SERVICE_UNAVAILABLE", answer
            assert len(acknowledged) >= N * 0.9 and all(t in acknowledged for t in texts[1::2])
            job_ids = list(acknowledged.values())

            def jobs() -> list[dict[str, object]]:
                found: list[dict[str, object]] = []
                for start in range(0, len(job_ids), 100):
                    body = post(svc, JOBS, ids=job_ids[start : start + 100]).json()
                    assert "errors" not in body, body
                    found += body["data"]["nodes"]
                return found

            wait_until(lambda: all(j["status"] == "FINISHED" for j in jobs()), timeout_s=90, what="every job to end")
            ended = jobs()
    # The faults happened, on both kinds of write, from both processes' commands.
    assert proxy.dropped["EXEC"] >= 5 and proxy.dropped["EVAL"] + proxy.dropped["EVALSHA"] >= 5, proxy.dropped
    # Each job ran once: one LLM call per text, one attempt each, and nothing left queued.
    calls = Counter(text for body in stub.requests for text in texts if text in json.dumps(body))
    assert {t: calls[t] for t in acknowledged} == dict.fromkeys(acknowledged, 1)
    assert all(calls[t] <= 1 for t in texts), {t: n for t, n in calls.items() if n > 1}
    assert Counter(j["attempts"] for j in ended) == {1: len(job_ids)}
    with Redis.from_url(e2e_redis) as redis:
        assert redis.llen("rq:queue:llm-lossy") == 0
        assert redis.zcard(keys.LIVE_JOBS) == 0
