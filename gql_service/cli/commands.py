"""The `gql-service` command: run the service, talk to a running one, export the schema."""

from __future__ import annotations

import argparse
import base64
import errno
import json
import logging
import multiprocessing
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from gql_service import logs
from gql_service.settings import RedisTarget, Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from gql_service.cli.embedded_redis import EmbeddedRedis

log = logging.getLogger("gql_service")

EXIT_USAGE = 2  # bad input or settings, as in the client's exit codes (gql_service.cli.client)
# How long `dev` lets its children stop cleanly before it kills whatever is left of them.
# Short: a job still running then is lost with the embedded Redis anyway (or, against a
# REDIS_URL, retried as WORKER_LOST), and Ctrl-C should feel immediate.
DEV_STOP_GRACE_S = 2.0
DEV_OFFLINE_STREAM_DELAY_MS = 20
DEFAULT_URL = "http://127.0.0.1:8000/graphql"


def _fail(message: str) -> SystemExit:
    print(f"gql-service: {message}", file=sys.stderr)
    return SystemExit(EXIT_USAGE)


def _settings() -> Settings:
    try:
        settings = load_settings()
    except SettingsError as exc:
        for line in str(exc).splitlines():
            print(f"gql-service: bad setting: {line}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    logs.configure(settings.log_format, settings.log_level)
    return settings


def _require_redis(target: RedisTarget, timeout_s: float) -> None:
    """One clear line instead of RQ's traceback when Redis is not there."""
    from redis import RedisError

    from gql_service.redis_conn import sync_client

    setting = "REDIS_SENTINELS and REDIS_SENTINEL_MASTER" if target.sentinels else "REDIS_URL"
    try:
        client = sync_client(target, timeout_s=timeout_s, max_connections=1)
        try:
            client.ping()
        finally:
            client.close()
    except (RedisError, OSError, ValueError) as exc:
        raise _fail(f"cannot reach Redis at {target} ({exc}); check {setting}") from None


def _require_free_port(host: str, port: int, what: str) -> None:
    """Fail before starting anything, rather than after Redis and workers are up."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As uvicorn and redis-server bind: a port in TIME_WAIT is free for them too.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise _fail(f"{host}:{port} is already in use (another gql-service?); choose another {what}") from None
            raise _fail(f"cannot listen on {host}:{port} ({exc.strerror}); check {what}") from None


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    settings = _settings()  # fail here, with one clear line each, not inside uvicorn's workers
    uvicorn.run(
        "gql_service.api.app:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=settings.log_level.lower(),
        log_config=None,  # keep ours (logs.configure), so LOG_FORMAT=json covers uvicorn too
        access_log=args.access_log,
        proxy_headers=True,
        ws_max_size=settings.max_body_bytes,
        # permessage-deflate keeps ~50 KiB of zlib state per socket (measured: half of an
        # idle subscription's memory) to compress messages of a few hundred bytes.
        ws_per_message_deflate=False,
        # Subscriptions can stay open for as long as a job runs: don't wait on them forever.
        timeout_graceful_shutdown=10,
    )


def cmd_worker(args: argparse.Namespace) -> None:
    from gql_service.worker.workers import run_workers

    settings = _settings()
    _require_redis(settings.redis_target, settings.redis_timeout_s)
    # Until RQ installs its own handlers (after the warm-up and, for a pool, after forking
    # its workers), SIGTERM is an interruption like Ctrl-C, so the `finally` below runs.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run_workers(settings, num_workers=args.workers, concurrency=args.concurrency, burst=args.burst)
    finally:
        # A pool interrupted while it forks its workers would otherwise wait for them at exit
        # (multiprocessing joins its children), and they, never told to stop, run forever.
        for child in multiprocessing.active_children():
            child.terminate()
            child.join(5)
            if child.is_alive():
                child.kill()


def cmd_migrate(args: argparse.Namespace) -> None:
    settings = _settings()
    if not settings.database_url:
        raise _fail("DATABASE_URL is not set: there is no job history to migrate")
    _migrate(settings.database_url)


def _migrate(database_url: str) -> None:
    import sqlalchemy.exc

    from gql_service.cli import migrate

    try:
        migrate.upgrade(database_url)
    except sqlalchemy.exc.OperationalError as exc:
        raise _fail(f"cannot reach the job history's PostgreSQL: {str(exc.orig).strip()}") from None
    log.info("migrate: the job history's schema is up to date")


def cmd_export_schema(args: argparse.Namespace) -> None:
    from gql_service.api.schema import schema

    text = schema.as_str() + "\n"
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)


def _texts(args: argparse.Namespace) -> list[str]:
    texts = [sys.stdin.read() if text == "-" else text for text in args.texts]
    if not texts and not args.file:
        raise _fail("nothing to submit: give a text, - to read one from stdin, or --file")
    return texts


def _quiet_client_logs() -> None:
    # A command-line client prints its own progress; httpx's per-request INFO lines are noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _client_target(args: argparse.Namespace) -> tuple[str, str | None]:
    return args.url or os.environ.get("GQLS_URL") or DEFAULT_URL, args.api_key or os.environ.get("GQLS_API_KEY")


def cmd_submit(args: argparse.Namespace) -> None:
    from gql_service.cli import client

    _quiet_client_logs()
    # Ctrl-C interrupts, even when started with SIGINT ignored (a shell's background job, a
    # test runner's worker): the same command then resumes a file where this one stopped.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    texts = _texts(args)
    url, api_key = _client_target(args)
    try:
        if args.file:
            code = _submit_file(args, texts, url, api_key)
        else:
            code = client.submit(url, texts, wait=args.wait, as_json=args.json, api_key=api_key, webhook=args.webhook)
    except client.ClientError as exc:
        print(f"gql-service: {exc}", file=sys.stderr)
        code = client.EXIT_USAGE
    except KeyboardInterrupt:
        # Run the same command again: it finds its batch and submits only what is missing.
        print("gql-service: interrupted; the same command resumes where this one stopped", file=sys.stderr)
        code = 130
    raise SystemExit(code)


def _submit_file(args: argparse.Namespace, texts: list[str], url: str, api_key: str | None) -> int:
    from gql_service.cli import bulk

    path = Path(args.file)
    # Texts given as arguments first, then the file's, as without a file.
    items = [bulk.Item(f"arg-{n}", text) for n, text in enumerate(texts, start=1)]
    items += bulk.read_items(path, fmt=args.format, column=args.column, id_column=args.id_column)
    source = b"\0".join(t.encode() for t in texts) + b"\0" + path.read_bytes()
    output = Path(args.output) if args.output else None
    code, ended = bulk.submit_file(
        url, items, source=source, name=path.name, output=output, wait=args.wait, api_key=api_key,
        webhook=args.webhook,
    )  # fmt: skip
    if args.wait and args.json:
        print(json.dumps(ended, indent=2))
    elif args.wait and not output:
        from gql_service.cli.client import describe

        print("\n".join(describe(job) for job in ended))
    return code


def cmd_webhook_secret(args: argparse.Namespace) -> None:
    print("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())


def cmd_status(args: argparse.Namespace) -> None:
    from gql_service.cli import client

    _quiet_client_logs()
    url, api_key = _client_target(args)
    try:
        code = client.status(url, args.id, as_json=args.json, api_key=api_key)
    except client.ClientError as exc:
        print(f"gql-service: {exc}", file=sys.stderr)
        code = client.EXIT_USAGE
    raise SystemExit(code)


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


def _add_concurrency(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="jobs at once per async worker process (default: WORKER_CONCURRENCY, 64)",
    )


def _concurrency_args(args: argparse.Namespace) -> list[str]:
    return ["--concurrency", str(args.concurrency)] if args.concurrency else []


def cmd_dev(args: argparse.Namespace) -> None:
    """Everything in one process tree; one Ctrl-C (or SIGTERM) stops all of it."""
    from gql_service.cli.embedded_redis import EmbeddedRedis
    from gql_service.cli.procs import become_subreaper, child_preexec

    settings = _settings()
    _require_free_port(args.host, args.port, "--port")
    embedded = not settings.redis_url and not settings.redis_sentinels
    if embedded and settings.embedded_redis_port:
        _require_free_port("127.0.0.1", settings.embedded_redis_port, "EMBEDDED_REDIS_PORT")
    if settings.database_url:
        _migrate(settings.database_url)  # dev keeps the history's schema up to date itself
    become_subreaper()
    _quiet_client_logs()  # the readiness probes
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
                raise _fail(f"the embedded Redis did not start: {exc}") from None
            env["REDIS_URL"] = redis.url
            target = RedisTarget(url=redis.url)
            log.info("dev: embedded Redis at %s (nothing kept on disk)", redis.url)
        log.info("dev: LLM provider %s; starting %d worker(s) and the API", settings.provider, args.workers)
        me = [sys.executable, "-m", "gql_service"]
        for command in (
            ["worker", "--workers", str(args.workers), *_concurrency_args(args)],
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults where they say something (not for flags, not for "unset")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


EPILOG = """\
examples:
  gql-service dev                                  the whole service on http://127.0.0.1:8000
                                                   (console at /, GraphiQL at /graphql)
  gql-service submit --wait "I loved the clinic."  submit a text and follow it live
  gql-service status JOB_ID                        a job's state and result
  gql-service export-schema > schema.graphql       the GraphQL SDL

Settings (REDIS_URL, OPENAI_API_KEY, LLM_PROVIDER, ...) come from the environment and
./.env; see README.md. `gql-service COMMAND --help` shows a command's options."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gql-service",
        description="Structured JSON from free text with an LLM, behind a live GraphQL API (Redis + RQ workers).",
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, formatter_class=_HelpFormatter)

    p = command("dev", "run everything: embedded Redis (if REDIS_URL is unset), RQ workers and the API")
    p.add_argument("--host", default="127.0.0.1", help="address the API listens on")
    p.add_argument("--port", type=int, default=8000, help="port the API listens on")
    p.add_argument("--workers", type=int, default=1, help="RQ worker processes")
    _add_concurrency(p)
    p.set_defaults(func=cmd_dev)

    p = command("serve", "run the GraphQL API (uvicorn) against REDIS_URL")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request (costs ~5%% at full load)")
    p.set_defaults(func=cmd_serve)

    p = command("worker", "run RQ workers for RQ_QUEUE against REDIS_URL, with the scheduler")
    p.add_argument("--workers", type=int, default=1, help="worker processes (a pool when > 1)")
    _add_concurrency(p)
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.set_defaults(func=cmd_worker)

    for name, help_ in (
        ("submit", "submit texts to a running service; prints job ids, or with --wait the results"),
        ("status", "show a job of a running service"),
    ):
        p = command(name, help_)
        p.add_argument("--url", help=f"the service's GraphQL endpoint (default: $GQLS_URL, else {DEFAULT_URL})")
        p.add_argument("--api-key", help="API key, when the service has API_KEYS (default: $GQLS_API_KEY)")
        p.add_argument("--json", action="store_true", help="print the jobs as JSON")
        if name == "submit":
            p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to submit; - reads one from stdin")
            p.add_argument(
                "--file", help="texts from a file, as one batch: plain lines, JSONL {text, id} or CSV (see --column); "
                "running the same command again resumes it"
            )  # fmt: skip
            p.add_argument(
                "--format", choices=("lines", "jsonl", "csv"), help="the file's format (default: by its suffix)"
            )
            p.add_argument("--column", default="text", help="the CSV column holding the texts")
            p.add_argument("--id-column", default="id", help="the CSV column holding the items' ids (else the line)")
            p.add_argument("--output", metavar="FILE", help="with --file: write a JSON line per job as it ends")
            p.add_argument("--wait", action="store_true", help="follow the jobs live until they end")
            p.add_argument("--webhook", metavar="URL", help="POST a signed event to URL when each job ends")
            p.set_defaults(func=cmd_submit)
        else:
            p.add_argument("id", metavar="JOB_ID", help="the job's id")
            p.set_defaults(func=cmd_status)
        p.epilog = "exit codes: 0 finished, 1 failed, 3 canceled, 4 still running, 2 bad input or no service"

    p = command("webhook-secret", "print a new WEBHOOK_SECRET (whsec_ + 32 random bytes, base64)")
    p.set_defaults(func=cmd_webhook_secret)

    p = command("migrate", "create or update the PostgreSQL job history's tables (DATABASE_URL), with Alembic")
    p.set_defaults(func=cmd_migrate)

    p = command("export-schema", "print the GraphQL SDL (what schema.graphql holds) to stdout, or write it to a file")
    p.add_argument("--output", metavar="FILE", help="write the SDL to FILE instead of stdout (- is stdout)")
    p.set_defaults(func=cmd_export_schema)
    return parser


def main(argv: list[str] | None = None) -> None:
    logs.configure()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        raise SystemExit(130) from None  # Ctrl-C is how these commands end: no traceback
