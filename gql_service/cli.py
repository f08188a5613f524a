"""`gql-service`: dev, serve, worker, export-schema. Entry points only wire."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from . import logs
from .settings import Settings, SettingsError, load_settings

log = logging.getLogger("gql_service")


def _settings() -> Settings:
    try:
        settings = load_settings()
    except SettingsError as exc:
        for line in str(exc).splitlines():
            print(f"gql-service: bad setting: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    logs.configure(settings.log_format, settings.log_level)
    return settings


def _redis_url(settings: Settings) -> str:
    from .redis_conn import DEFAULT_URL

    return settings.redis_url or DEFAULT_URL


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    settings = _settings()  # fail here, with one clear line each, not inside uvicorn's workers
    uvicorn.run(
        "gql_service.app:app_from_env",
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
    from .workers import run_workers

    settings = _settings()
    run_workers(settings, redis_url=_redis_url(settings), num_workers=args.workers, burst=args.burst)


def cmd_export_schema(args: argparse.Namespace) -> None:
    from .schema import schema

    text = schema.as_str() + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")


def _texts(args: argparse.Namespace) -> list[str]:
    texts: list[str] = []
    for text in args.texts:
        texts.append(sys.stdin.read() if text == "-" else text)
    if args.file:
        texts += [line.rstrip("\n") for line in Path(args.file).read_text().splitlines() if line.strip()]
    if not texts:
        raise SystemExit("gql-service submit: give a text, - for stdin, or --file")
    return texts


def _quiet_client_logs() -> None:
    # A command-line client prints its own progress; httpx's per-request INFO lines are noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def cmd_submit(args: argparse.Namespace) -> None:
    from . import client

    _quiet_client_logs()
    try:
        code = client.submit(args.url, _texts(args), wait=args.wait, as_json=args.json, api_key=args.api_key)
    except client.ClientError as exc:
        print(f"gql-service: {exc}", file=sys.stderr)
        code = client.EXIT_USAGE
    raise SystemExit(code)


def cmd_status(args: argparse.Namespace) -> None:
    from . import client

    _quiet_client_logs()
    try:
        code = client.status(args.url, args.id, as_json=args.json, api_key=args.api_key)
    except client.ClientError as exc:
        print(f"gql-service: {exc}", file=sys.stderr)
        code = client.EXIT_USAGE
    raise SystemExit(code)


def cmd_dev(args: argparse.Namespace) -> None:
    """Everything in one process tree; one Ctrl-C (or SIGTERM) stops all of it."""
    from .embedded_redis import EmbeddedRedis
    from .procs import child_preexec

    settings = _settings()
    env = dict(os.environ)
    redis: EmbeddedRedis | None = None
    if not settings.redis_url:
        redis = EmbeddedRedis().start()
        env["REDIS_URL"] = redis.url
        log.info("dev: embedded Redis at %s (nothing kept on disk)", redis.url)
    log.info("dev: LLM provider %s", settings.provider)
    me = [sys.executable, "-m", "gql_service"]
    children = [
        subprocess.Popen([*me, "worker", "--workers", str(args.workers)], env=env, preexec_fn=child_preexec),
        subprocess.Popen(
            [*me, "serve", "--host", args.host, "--port", str(args.port)], env=env, preexec_fn=child_preexec
        ),
    ]
    log.info("dev: API on http://%s:%d/graphql  (Ctrl-C stops everything)", args.host, args.port)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Explicit handlers: a shell that backgrounds us may have left SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        while all(c.poll() is None for c in children):
            with contextlib.suppress(subprocess.TimeoutExpired):
                children[0].wait(timeout=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan anything
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if redis is not None:
            redis.stop()
        log.info("dev: stopped")
    failed = [c.returncode for c in children if c.returncode not in (0, -signal.SIGINT, -signal.SIGTERM)]
    if failed:
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gql-service", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("dev", help="embedded Redis (if REDIS_URL is unset) + workers + API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=2, help="RQ worker processes")
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser("serve", help="the GraphQL API (uvicorn)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request (costs ~5%% at full load)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="RQ workers for RQ_QUEUE, with the scheduler")
    p.add_argument("--workers", type=int, default=1, help="worker processes (a pool when > 1)")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.set_defaults(func=cmd_worker)

    for name, help_ in (("submit", "submit texts to a running service"), ("status", "show a job")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--url", default=os.environ.get("GQLS_URL", "http://127.0.0.1:8000/graphql"))
        p.add_argument("--api-key", default=os.environ.get("GQLS_API_KEY"), help="or GQLS_API_KEY")
        p.add_argument("--json", action="store_true", help="print JSON")
        if name == "submit":
            p.add_argument("texts", nargs="*", help="texts to submit; - reads one from stdin")
            p.add_argument("--file", help="a file with one text a line (a batch)")
            p.add_argument("--wait", action="store_true", help="follow the jobs live until they end")
            p.set_defaults(func=cmd_submit)
        else:
            p.add_argument("id")
            p.set_defaults(func=cmd_status)

    p = sub.add_parser("export-schema", help="print or write the GraphQL SDL")
    p.add_argument("--output", default="schema.graphql", help="file to write, or - for stdout")
    p.set_defaults(func=cmd_export_schema)
    return parser


def main(argv: list[str] | None = None) -> None:
    logs.configure()
    args = build_parser().parse_args(argv)
    args.func(args)
