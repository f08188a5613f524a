"""Workers that die or are told to stop: no job is lost or left STARTED.

WORKER_LOST_AFTER_S is 3 here, so a job whose worker was SIGKILLed is noticed within a
few seconds (the default of 60 s bounds it at about 80 s).
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import psutil
import pytest

from .clients import follow, submit
from .openai_stub import Fault, OpenAIStub
from .service import Proc, Service, wait_until

LOST_AFTER_S = 3


def crash_env(stub: OpenAIStub, queue: str, **extra: str) -> dict[str, str]:
    return {
        "RQ_QUEUE": queue,
        **stub.env,
        "WORKER_LOST_AFTER_S": str(LOST_AFTER_S),
        **extra,
    }


async def follow_until_calling(
    svc: Service, job_id: str, stub: OpenAIStub, requests: int = 1
) -> tuple[asyncio.Task[list[dict[str, Any]]], float]:
    """Subscribe and return once the job is inside its LLM call: the stage says CALLING_LLM
    and the stub has the request (the stage is published just before the request is sent)."""
    calling = asyncio.Event()
    task = asyncio.create_task(follow(svc, job_id, first_seen=calling, until_stage="CALLING_LLM"))
    await asyncio.wait_for(calling.wait(), 15)
    await asyncio.to_thread(wait_until, lambda: len(stub.requests) >= requests, what="the LLM request")
    return task, time.monotonic()


def horse_of(worker: Proc, stub: OpenAIStub) -> psutil.Process:
    # The work horse is the worker's child that is in the middle of a call to the LLM stub
    # (the worker also forks an RQ scheduler, and may do so at any time).
    children = psutil.Process(worker.popen.pid).children()
    horses = [p for p in children if any(c.raddr and c.raddr.port == stub.port for c in p.net_connections("tcp"))]
    assert len(horses) == 1, f"expected one work horse talking to the stub, found {horses}"
    return horses[0]


def kill_tree(worker: Proc) -> None:
    root = psutil.Process(worker.popen.pid)
    for proc in [*root.children(recursive=True), root]:
        proc.send_signal(signal.SIGKILL)
    worker.popen.wait(5)


async def test_sigkilled_worker_and_horse_job_runs_again_on_a_new_worker(e2e_redis: str, stub: OpenAIStub) -> None:
    stub.script(Fault.hang(60))  # the first attempt is mid-call when its worker dies
    with Service(e2e_redis, workers=1, env=crash_env(stub, "llm-crash")) as svc:
        job_id = submit(svc)
        task, killed_at = await follow_until_calling(svc, job_id, stub)
        kill_tree(svc.procs[0])
        svc.start_worker(1)
        events = await asyncio.wait_for(task, 30)
        recovered_after = time.monotonic() - killed_at
    final = events[-1]
    assert (final["status"], final["stage"], final["attempts"]) == ("FINISHED", "DONE", 2)
    lost = [e for e in events if e["status"] == "RETRYING"]
    assert lost and lost[0]["error"]["code"] == "WORKER_LOST" and lost[0]["error"]["retryable"]
    assert recovered_after < LOST_AFTER_S * 2 + 5
    print(f"\nSIGKILLed job DONE on a new worker {recovered_after:.1f} s after the kill")


async def test_sigkilled_worker_without_attempts_left_fails_worker_lost(e2e_redis: str, stub: OpenAIStub) -> None:
    stub.script(Fault.hang(60))
    env = crash_env(stub, "llm-crash-last", LLM_MAX_ATTEMPTS="1")
    with Service(e2e_redis, workers=1, env=env) as svc:
        job_id = submit(svc)
        task, _ = await follow_until_calling(svc, job_id, stub)
        kill_tree(svc.procs[0])
        svc.start_worker(1)  # its registry maintenance finds the abandoned job
        events = await asyncio.wait_for(task, 30)
    final = events[-1]
    assert (final["status"], final["error"]["code"], final["error"]["retryable"]) == ("FAILED", "WORKER_LOST", False)


async def test_killed_work_horse_under_a_live_worker_is_retried(e2e_redis: str, stub: OpenAIStub) -> None:
    stub.script(Fault.hang(60))
    with Service(e2e_redis, workers=1, env=crash_env(stub, "llm-horse", WORKER_CLASS="fork")) as svc:
        job_id = submit(svc)
        task, _ = await follow_until_calling(svc, job_id, stub)
        horse_of(svc.procs[0], stub).send_signal(signal.SIGKILL)
        events = await asyncio.wait_for(task, 30)
    final = events[-1]
    assert (final["status"], final["attempts"]) == ("FINISHED", 2)
    assert any(e["status"] == "RETRYING" and e["error"]["code"] == "WORKER_LOST" for e in events)


async def test_sigterm_lets_the_running_job_finish(e2e_redis: str, stub: OpenAIStub) -> None:
    stub.script(Fault.hang(1.5))  # answers (validly) after 1.5 s
    with Service(e2e_redis, workers=1, env=crash_env(stub, "llm-sigterm")) as svc:
        job_id = submit(svc)
        task, _ = await follow_until_calling(svc, job_id, stub)
        worker = svc.procs[0]
        worker.popen.send_signal(signal.SIGTERM)
        events = await asyncio.wait_for(task, 30)
        assert await asyncio.to_thread(worker.popen.wait, 15) == 0
    assert (events[-1]["status"], events[-1]["attempts"]) == ("FINISHED", 1)


@pytest.mark.parametrize("workers", [2])
async def test_sigterm_to_a_worker_pool_finishes_its_jobs(e2e_redis: str, stub: OpenAIStub, workers: int) -> None:
    stub.script(Fault.hang(1.5), Fault.hang(1.5))
    with Service(e2e_redis, workers=workers, env=crash_env(stub, "llm-sigterm-pool")) as svc:
        ids = [submit(svc), submit(svc)]
        followers = [await follow_until_calling(svc, i, stub, n + 1) for n, i in enumerate(ids)]
        svc.procs[0].popen.send_signal(signal.SIGTERM)
        results = [await asyncio.wait_for(task, 30) for task, _ in followers]
        assert await asyncio.to_thread(svc.procs[0].popen.wait, 20) == 0
    assert [r[-1]["status"] for r in results] == ["FINISHED", "FINISHED"]
