"""`gql-service dev`: the whole service in one process tree, stopped whole by one Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

from gql_service.settings import RedisTarget

if TYPE_CHECKING:
    from gql_service.cli.embedded_redis import EmbeddedRedis
from gql_service.cli.common import fail, log, migrate_history, quiet_client_logs, require_free_port, settings_or_exit

# Short: a job still running then is lost with the embedded Redis anyway (or, against a
# REDIS_URL, retried as WORKER_LOST), and Ctrl-C should feel immediate.
DEV_STOP_GRACE_S = 2.0
DEV_OFFLINE_STREAM_DELAY_MS = 20
# An ECONOMY batch in `dev` is looked at every second, not every 30: a person is watching.
DEV_ECONOMY_POLL_S = 1


def _local(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _http_base(host: str, port: int) -> str:
    host = _local(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _workers_listening(target: RedisTarget, queue: str, pool_pid: int) -> int:
    """How many RQ workers of our own tree are registered on the queue."""
    from rq import Queue, Worker

    from gql_service.cli.procs import descendants
    from gql_service.redis_conn import sync_client

    ours = descendants(pool_pid) | {pool_pid}
    with sync_client(target, timeout_s=0.5, max_connections=1) as redis:
        workers = Worker.all(connection=redis, queue=Queue(queue, connection=redis))
    here = socket.gethostname()
    return sum(1 for w in workers if w.hostname == here and w.pid in ours)


def _ready(api: str, target: RedisTarget, queue: str, pool_pid: int, workers: int) -> bool:
    import httpx
    from redis import RedisError

    try:
        if httpx.get(f"{api}/readyz", timeout=0.5).status_code != 200:
            return False
        return _workers_listening(target, queue, pool_pid) >= workers
    except (httpx.HTTPError, RedisError, OSError):
        return False


def _announce_ready(
    api: str, target: RedisTarget, queue: str, pool_pid: int, workers: int, stopping: threading.Event
) -> None:
    while not stopping.is_set():
        if _ready(api, target, queue, pool_pid, workers):
            log.info(
                "dev: ready: %s/graphql (console at %s/), %d worker(s) on queue %r; Ctrl-C stops everything",
                api, api, workers, queue,
            )  # fmt: skip
            # A line to paste as it is (no log prefix) into the shell that runs `gql-service
            # submit` or `status`: they find the service by GQLS_URL, else port 8000.
            print(f"export GQLS_URL={api}/graphql", flush=True)
            return
        stopping.wait(0.1)


def _stop_dev(
    children: list[subprocess.Popen[bytes]], redis: EmbeddedRedis | None, *, hurry: Callable[[], bool]
) -> None:
    """Children first (they write to Redis), then Redis; whatever outlives the grace is killed.

    RQ's pool can miss a stop request (one that lands while it forks its workers) and a
    worker finishes its running job before it stops, so waiting for a clean exit alone
    could take minutes or forever; nothing of the tree may outlive dev.
    """
    from gql_service.cli.procs import descendants, kill_tree, reap_adopted

    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
    deadline = time.monotonic() + DEV_STOP_GRACE_S
    redis_pid = redis.process.pid if redis is not None and redis.process is not None else None
    ours = {c.pid for c in children} | {redis_pid or 0}
    while time.monotonic() < deadline and not hurry():
        reap_adopted(besides=ours)
        if all(c.poll() is not None for c in children) and descendants(os.getpid()) <= {redis_pid}:
            break
        time.sleep(0.05)
    leftovers = descendants(os.getpid()) - {redis_pid}
    if leftovers:
        log.warning("dev: %d process(es) did not stop in time; killing them", len(leftovers))
        kill_tree(leftovers, groups=[c.pid for c in children])
    for child in children:
        child.wait()
    if redis is not None:
        redis.stop()
    kill_tree(descendants(os.getpid()))  # anything forked while we were stopping


def concurrency_args(args: argparse.Namespace) -> list[str]:
    return ["--concurrency", str(args.concurrency)] if args.concurrency else []


def cmd_dev(args: argparse.Namespace) -> None:
    """Everything in one process tree; one Ctrl-C (or SIGTERM) stops all of it."""
    from gql_service.cli.embedded_redis import EmbeddedRedis
    from gql_service.cli.procs import become_subreaper, child_preexec

    settings = settings_or_exit()
    require_free_port(args.host, args.port, "--port")
    embedded = not settings.redis_url and not settings.redis_sentinels
    if embedded and settings.embedded_redis_port:
        require_free_port("127.0.0.1", settings.embedded_redis_port, "EMBEDDED_REDIS_PORT")
    if settings.database_url:
        migrate_history(settings.database_url)  # dev keeps the history's schema up to date itself
    become_subreaper()
    quiet_client_logs()  # the readiness probes
    # The handler only takes note. An exception raised from it could land in any library
    # frame, and redis-py (turning what breaks a connect into ConnectionError), finalizers
    # and `except Exception` blocks would swallow it: Ctrl-C would then be lost for good.
    received: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    # Explicit handlers: a shell that backgrounds us may have left SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, note)
    env = dict(os.environ)
    if "offline_stream_delay_ms" not in settings.model_fields_set:
        # The offline provider writes its answer at a pace a person can watch in the console.
        env["OFFLINE_STREAM_DELAY_MS"] = str(DEV_OFFLINE_STREAM_DELAY_MS)
    if "economy_poll_s" not in settings.model_fields_set:
        env["ECONOMY_POLL_S"] = str(DEV_ECONOMY_POLL_S)
    if "trusted_documents_allow_playground" not in settings.model_fields_set:
        # Trusted documents locked down, and yet the playground and console open in `dev`.
        env["TRUSTED_DOCUMENTS_ALLOW_PLAYGROUND"] = "true"
    target = settings.redis_target
    redis: EmbeddedRedis | None = None
    children: list[subprocess.Popen[bytes]] = []
    stopping = threading.Event()
    try:
        if embedded and not received:
            redis = EmbeddedRedis(port=settings.embedded_redis_port)
            try:
                redis.start()
            except RuntimeError as exc:
                raise fail(f"the embedded Redis did not start: {exc}") from None
            env["REDIS_URL"] = redis.url
            target = RedisTarget(url=redis.url)
            log.info("dev: embedded Redis at %s (nothing kept on disk)", redis.url)
        log.info("dev: LLM provider %s; starting %d worker(s) and the API", settings.provider, args.workers)
        me = [sys.executable, "-m", "gql_service"]
        for command in (
            ["worker", "--workers", str(args.workers), *concurrency_args(args)],
            ["serve", "--host", args.host, "--port", str(args.port)],
        ):
            if not received:
                children.append(subprocess.Popen([*me, *command], env=env, preexec_fn=child_preexec))
        if children and not received:
            probe = (_http_base(args.host, args.port), target, settings.rq_queue, children[0].pid, args.workers)
            threading.Thread(target=_announce_ready, args=(*probe, stopping), name="dev-ready", daemon=True).start()
        # The main thread only watches: a probe (its first imports of rq and httpx take
        # seconds on a busy machine) must never stand between a signal and the stop.
        while not received and all(c.poll() is None for c in children):
            time.sleep(0.05)
    finally:
        stopping.set()
        # A second signal while stopping: no more grace, kill what is left.
        _stop_dev(children, redis, hurry=lambda: len(received) > 1)
        log.info("dev: stopped")
    if not received:
        log.error("dev: a child exited on its own (exit codes %s); stopped the rest", [c.returncode for c in children])
        raise SystemExit(1)
    # The whole tree is down: exit now, without the interpreter's finalization. Seen once in
    # CI on a loaded machine: dev logged "stopped" and was still alive 6 s later (the readiness
    # probe, a daemon thread, may be caught mid-import; finalization can wait on its locks).
    logging.shutdown()
    os._exit(0)
