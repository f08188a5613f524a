"""ECONOMY batches end to end: a real API and real RQ worker processes, the real `openai` SDK
talking to the stub's Batch and Files APIs (tests/openai_stub_batches.py), or the offline
provider's twin of them."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from gql_service import keys

from .clients import TEXT, post
from .openai_stub import Fault, OpenAIStub
from .records import records, until_ended
from .service import Service, wait_until

CREATE = 'mutation($mode: BatchMode!) { createBatch(input: {name: "economy", mode: $mode}) { id mode } }'
ADD = "mutation($b: ID!, $inputs: [SubmitTextInput!]!) { submitTexts(batchId: $b, inputs: $inputs) { job { id } } }"
CLOSE = "mutation($id: ID!) { closeBatch(id: $id) { status } }"
CANCEL = "mutation($id: ID!) { cancelBatch(id: $id) { status } }"
BATCH = """query($id: ID!) { batch(id: $id) { status mode
  counts { total queued running finished failed canceled }
  providerBatches { id status requestCounts { total completed failed } } } }"""
JOB = """query($id: ID!) { job(id: $id) { status stage attempts costUsd error { code message }
  result { summary sentiment tags entities { type value confidence } language toxicityScore } } }"""
SUBMIT = "mutation($text: String!) { submitText(input: {text: $text}) { job { id } } }"

PRICES = '{"gpt-4o-mini": {"inputPerMTok": 0.15, "outputPerMTok": 0.60}}'


def economy_env(stub: OpenAIStub, queue: str, **more: str) -> dict[str, str]:
    return {
        **stub.env, "RQ_QUEUE": queue, "LLM_STREAM": "false", "ECONOMY_POLL_S": "0.2", "ECONOMY_FLUSH_S": "3600",
        "LLM_PRICES": PRICES, **more,
    }  # fmt: skip


def gql(svc: Service, query: str, **variables: Any) -> dict[str, Any]:
    body = post(svc, query, **variables).json()
    assert "errors" not in body, body
    return body["data"]  # type: ignore[no-any-return]


def economy_batch(svc: Service, n: int, *, close: bool = True) -> tuple[str, list[str]]:
    """An ECONOMY batch of `n` texts (closed, so it is sent at once); its id and its jobs'."""
    batch_id = gql(svc, CREATE, mode="ECONOMY")["createBatch"]["id"]
    ids: list[str] = []
    for start in range(0, n, 100):
        inputs = [{"text": f"{TEXT} ({i})"} for i in range(start, min(n, start + 100))]
        ids += [a["job"]["id"] for a in gql(svc, ADD, b=batch_id, inputs=inputs)["submitTexts"]]
    if close:
        gql(svc, CLOSE, id=batch_id)
    return batch_id, ids


def watch(svc: Service, batch_id: str, timeout_s: float = 90) -> list[dict[str, Any]]:
    """Every look at the batch until it is COMPLETED (or CANCELED)."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen.append(gql(svc, BATCH, id=batch_id)["batch"])
        if seen[-1]["status"] in ("COMPLETED", "CANCELED"):
            return seen
        time.sleep(0.05)  # a look every 50 ms: how often is what this test watches, not a wait for an event
    raise AssertionError(f"batch not done in {timeout_s} s: {seen[-1]}")


def test_an_economy_batch_is_one_provider_batch_validated_as_interactive_answers_are(
    e2e_redis: str, stub: OpenAIStub
) -> None:
    with Service(e2e_redis, workers=2, env=economy_env(stub, "llm-economy")) as svc:
        # The interactive path's answer to the same text, for comparison.
        interactive = gql(svc, SUBMIT, text=f"{TEXT} (0)")["submitText"]["job"]["id"]
        until_ended(Redis.from_url(e2e_redis), [interactive])
        stub.reset()
        batch_id, ids = economy_batch(svc, 200, close=False)
        broken = ids[:2]  # answers that fail validation: each gets the interactive repair re-ask
        for job_id in broken:
            stub.batches.faults[job_id] = Fault.raw('{"summary": "no other field"}')
        assert {r.stage.value for r in records(Redis.from_url(e2e_redis), ids)} == {"QUEUED"}
        assert (
            stub.batches.created == [] and stub.batches.calls_interactive == 0
        )  # nothing leaves before the batch is due
        gql(svc, CLOSE, id=batch_id)
        seen = watch(svc, batch_id)
        for look in seen:  # exact at every moment
            counts = look["counts"]
            assert counts["total"] == 200
            assert sum(counts[k] for k in ("queued", "running", "finished", "failed", "canceled")) == 200
        completed = [
            look["providerBatches"][0]["requestCounts"]["completed"] for look in seen if look["providerBatches"]
        ]
        assert completed == sorted(completed) and len(set(completed)) > 2  # the provider's count, seen rising
        final = seen[-1]
        assert final["counts"]["finished"] == 200
        [provider_batch] = final["providerBatches"]
        assert provider_batch["status"] == "completed" and provider_batch["requestCounts"]["total"] == 200
        assert len(stub.batches.created) == 1 and stub.batches.calls_interactive == len(broken)  # repairs only
        assert {c for c in stub.batches.created[0].custom_ids} == set(ids)
        jobs = [gql(svc, JOB, id=job_id)["job"] for job_id in ids]
        reference = gql(svc, JOB, id=interactive)["job"]
        assert all(j["status"] == "FINISHED" and j["attempts"] == 1 for j in jobs)
        assert all(j["result"] == reference["result"] for j in jobs)  # as the interactive path gives
        # At the batch price: half what the same answer cost interactively (the repaired ones
        # paid the re-ask at the full price).
        plain = [j for job_id, j in zip(ids, jobs, strict=True) if job_id not in broken]
        assert all(j["costUsd"] == pytest.approx(reference["costUsd"] / 2) for j in plain)
        # Every file it uploaded or read back is deleted.
        made = stub.batches.created[0]
        wait_until(lambda: {made.input_file_id, made.output_file_id} <= set(stub.batches.deleted), what="deletes")


def test_lines_the_provider_let_expire_run_interactively_once(e2e_redis: str, stub: OpenAIStub) -> None:
    stub.batches.expire_share = 0.3
    with Service(e2e_redis, workers=2, env=economy_env(stub, "llm-economy-expire")) as svc:
        batch_id, ids = economy_batch(svc, 200)
        final = watch(svc, batch_id)[-1]
        [made] = stub.batches.created
        expired = set(made.expire_ids)
        assert len(expired) == 60 and final["providerBatches"][0]["status"] == "expired"
        assert final["counts"]["finished"] == 200
        # Each expired line was asked once interactively, every other one only in the batch.
        assert stub.batches.calls_interactive == 60 and stub.batches.calls_batched == 140
        ended = records(Redis.from_url(e2e_redis), ids)
        assert all(r.status.value == "FINISHED" and r.attempts == 1 for r in ended)
        again = {r.id for r in ended if r.batch_usage is None}  # answered interactively
        assert again == expired


def test_with_the_fail_fallback_what_expired_ends_failed(e2e_redis: str, stub: OpenAIStub) -> None:
    stub.batches.expire_share = 0.1
    env = economy_env(stub, "llm-economy-fail", ECONOMY_FALLBACK="fail")
    with Service(e2e_redis, workers=1, env=env) as svc:
        batch_id, ids = economy_batch(svc, 50)
        final = watch(svc, batch_id)[-1]
        expired = set(stub.batches.created[0].expire_ids)
        assert final["counts"] == {**final["counts"], "finished": 45, "failed": 5}
        assert stub.batches.calls_interactive == 0
        for job_id in expired:
            job = gql(svc, JOB, id=job_id)["job"]
            assert job["status"] == "FAILED" and job["error"]["code"] == "PROVIDER_ERROR"
            assert "expired" in job["error"]["message"]


def test_cancel_batch_cancels_the_provider_batch(e2e_redis: str, stub: OpenAIStub) -> None:
    stub.batches.hold = threading.Event()  # in progress until the test lets it end
    with Service(e2e_redis, workers=1, env=economy_env(stub, "llm-economy-cancel")) as svc:
        batch_id, ids = economy_batch(svc, 20)
        wait_until(lambda: gql(svc, JOB, id=ids[0])["job"]["stage"] == "PROVIDER_BATCH", what="the provider batch")
        assert gql(svc, CANCEL, id=batch_id)["cancelBatch"]["status"] == "CANCELED"
        wait_until(lambda: stub.batches.created[0].status == "cancelled", what="the provider's cancel")
        assert stub.batches.created[0].cancelled_by == "client"
        final = watch(svc, batch_id)[-1]
        assert final["counts"]["canceled"] == 20
        wait_until(lambda: final_status(svc, batch_id) == "cancelled", what="the chunk to see it")
        assert stub.batches.calls_interactive == 0
        assert all(r.status.value == "CANCELED" for r in records(Redis.from_url(e2e_redis), ids))


def final_status(svc: Service, batch_id: str) -> str:
    return str(gql(svc, BATCH, id=batch_id)["batch"]["providerBatches"][0]["status"])


def test_a_worker_killed_while_its_create_is_in_flight_leaves_one_provider_batch(
    e2e_redis: str, stub: OpenAIStub
) -> None:
    stub.batches.create_gate = gate = threading.Event()
    with Service(e2e_redis, workers=1, env=economy_env(stub, "llm-economy-kill")) as svc:
        batch_id, ids = economy_batch(svc, 100)
        assert stub.batches.create_asked.wait(60)  # uploaded, and asking for the batch
        assert len(stub.batches.uploads) == 1
        svc.procs[0].kill_group()  # SIGKILL, its create still in flight...
        svc.procs[0].popen.wait(10)
        gate.set()  # ...which the provider goes on to make: nobody wrote its id down
        wait_until(lambda: len(stub.batches.created) == 1, what="the orphaned provider batch")
        svc.start_worker(1)
        final = watch(svc, batch_id, timeout_s=120)[-1]
        assert final["counts"]["finished"] == 100
        assert len(stub.batches.created) == 1  # adopted by the next worker, not made again
        assert len(stub.batches.uploads) == 1
        assert stub.batches.calls_batched == 100 and stub.batches.calls_interactive == 0
        assert all(r.attempts == 1 for r in records(Redis.from_url(e2e_redis), ids))  # every job ended once


def test_the_offline_provider_serves_the_same_flow(e2e_redis: str) -> None:
    env = {"RQ_QUEUE": "llm-economy-offline", "ECONOMY_POLL_S": "0.2", "OFFLINE_BATCH_DELAY_MS": "1000"}
    with Service(e2e_redis, workers=1, env=env) as svc:
        batch_id, ids = economy_batch(svc, 30)
        seen = watch(svc, batch_id)
        final = seen[-1]
        assert final["counts"]["finished"] == 30
        [provider_batch] = final["providerBatches"]
        assert provider_batch["id"].startswith("offline-batch-") and provider_batch["status"] == "completed"
        statuses = {look["providerBatches"][0]["status"] for look in seen if look["providerBatches"]}
        assert "in_progress" in statuses
        job = gql(svc, JOB, id=ids[0])["job"]
        assert job["result"]["sentiment"] == "POSITIVE" and job["attempts"] == 1
        redis = Redis.from_url(e2e_redis)
        assert redis.keys(keys.offline_batch_file("*")) == []  # its input file is deleted once read


def test_an_economy_batch_reads_back_its_mode(e2e_redis: str, stub: OpenAIStub) -> None:
    with Service(e2e_redis, workers=0, env=economy_env(stub, "llm-economy-mode")) as svc:
        made = gql(svc, CREATE, mode="ECONOMY")["createBatch"]
        assert made["mode"] == "ECONOMY"
        assert gql(svc, BATCH, id=made["id"])["batch"]["providerBatches"] == []


def test_the_cli_sends_a_file_as_an_economy_batch_and_shows_the_provider_s_count(
    e2e_redis: str, tmp_path: Path
) -> None:
    env = {"RQ_QUEUE": "llm-economy-cli", "ECONOMY_POLL_S": "0.2", "OFFLINE_BATCH_DELAY_MS": "3000"}
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"{TEXT} ({n})", "id": f"t{n}"}) + "\n" for n in range(40)))
    results = tmp_path / "results.jsonl"
    with Service(e2e_redis, workers=1, env=env) as svc:
        done = subprocess.run(
            [sys.executable, "-m", "gql_service", "submit", "--url", svc.http_url, "--file", str(texts), "--economy",
             "--output", str(results)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in results.read_text().splitlines()]
        assert sorted(line["id"] for line in lines) == sorted(f"t{n}" for n in range(40))
        assert {line["status"] for line in lines} == {"FINISHED"}
        assert "provider answered 40/40" in done.stderr  # its progress follows the provider's counts
        batch_id = done.stderr.split()[1]
        assert gql(svc, BATCH, id=batch_id)["batch"]["mode"] == "ECONOMY"
        refused = subprocess.run(
            [sys.executable, "-m", "gql_service", "submit", "--url", svc.http_url, "--economy", "a text"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert refused.returncode == 2 and "--economy makes a batch of a file" in refused.stderr
