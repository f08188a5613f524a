"""The `gql-service` command: run the service, talk to a running one, export the schema."""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import secrets
import signal
import sys
from pathlib import Path

from gql_service import logs
from gql_service.cli import outbox
from gql_service.cli.common import (
    check_trusted_documents,
    fail,
    migrate_history,
    quiet_client_logs,
    require_redis,
    settings_or_exit,
)
from gql_service.cli.dev import cmd_dev

DEFAULT_URL = "http://127.0.0.1:8000/graphql"


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from gql_service.api.edge import edge_limits, edge_protocol

    settings = settings_or_exit()  # fail here, with one clear line each, not inside uvicorn's workers
    check_trusted_documents(settings)
    # Connections that never send a whole request head are closed, and connections per
    # process are bounded (HEADER_TIMEOUT_S, MAX_CONNECTIONS): uvicorn's httptools protocol
    # with those two rules, passed as the protocol class. `dev` runs the API through here too.
    limits = edge_limits(settings.header_timeout_s, settings.max_connections)
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
        http=edge_protocol(limits),
        ws_max_size=settings.max_body_bytes,
        # permessage-deflate keeps ~50 KiB of zlib state per socket (measured: half of an
        # idle subscription's memory) to compress messages of a few hundred bytes.
        ws_per_message_deflate=False,
        # Subscriptions can stay open for as long as a job runs: don't wait on them forever.
        timeout_graceful_shutdown=10,
    )


def cmd_worker(args: argparse.Namespace) -> None:
    from gql_service.worker.workers import run_workers

    settings = settings_or_exit()
    # A burst run is a one-off: it says at once that Redis is not there.
    wait_s = 0.0 if args.burst else settings.worker_start_timeout_s
    require_redis(settings.redis_target, settings.redis_timeout_s, wait_s=wait_s)
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
    settings = settings_or_exit()
    if not settings.database_url:
        raise fail("DATABASE_URL is not set: there is no job history to migrate")
    migrate_history(settings.database_url)


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
        raise fail("nothing to submit: give a text, - to read one from stdin, or --file")
    if args.economy and not args.file:
        raise fail("--economy makes a batch of a file: give --file")
    if args.output and not args.file:
        raise fail("--output writes the results of a --file: give --file")
    return texts


def _client_target(args: argparse.Namespace) -> tuple[str, str | None]:
    return args.url or os.environ.get("GQLS_URL") or DEFAULT_URL, args.api_key or os.environ.get("GQLS_API_KEY")


def _client_logs(args: argparse.Namespace) -> None:
    if not args.debug:  # with --debug, httpx's line per request shows what answered
        quiet_client_logs()


def cmd_submit(args: argparse.Namespace) -> None:
    from gql_service.cli import client

    _client_logs(args)
    # Ctrl-C interrupts, even when started with SIGINT ignored (a shell's background job, a
    # test runner's worker): the same command then resumes a file where this one stopped.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    texts = _texts(args)
    url, api_key = _client_target(args)

    def submit() -> int:
        if args.file:
            return _submit_file(args, texts, url, api_key)
        return client.submit(
            url, texts, wait=args.wait, as_json=args.json, api_key=api_key, webhook=args.webhook,
            priority=args.priority,
        )  # fmt: skip

    try:
        code = client.run(submit, debug=args.debug)
    except KeyboardInterrupt:
        # Run the same command again: it finds its batch and submits only what is missing.
        print("gql-service: interrupted; the same command resumes where this one stopped", file=sys.stderr)
        code = 130
    raise SystemExit(code)


def _submit_file(args: argparse.Namespace, texts: list[str], url: str, api_key: str | None) -> int:
    from gql_service.cli import bulk

    path = Path(args.file)
    output = Path(args.output) if args.output else None
    if output is not None:
        bulk.check_output(output)
    # Texts given as arguments first, then the file's, as without a file.
    items = [bulk.Item(f"arg-{n}", text) for n, text in enumerate(texts, start=1)]
    items += bulk.read_items(path, fmt=args.format, column=args.column, id_column=args.id_column)
    source = b"\0".join(t.encode() for t in texts) + b"\0" + path.read_bytes()
    code, ended = bulk.submit_file(
        url, items, source=source, name=path.name, output=output, wait=args.wait, api_key=api_key,
        webhook=args.webhook, priority=args.priority, mode="ECONOMY" if args.economy else "INTERACTIVE",
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

    _client_logs(args)
    url, api_key = _client_target(args)

    def status() -> int:
        return client.status(url, args.id, as_json=args.json, api_key=api_key)

    raise SystemExit(client.run(status, debug=args.debug))


def _add_concurrency(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="jobs at once per async worker process (default: WORKER_CONCURRENCY, 64)",
    )


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
./.env (every setting: the settings reference, ./scripts/docs). `gql-service COMMAND --help`
shows a command's options."""


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
        p.add_argument("--debug", action="store_true", help="on a problem, its traceback too (else one line)")
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
            p.add_argument(
                "--priority", choices=("HIGH", "NORMAL", "LOW"), default="NORMAL",
                help="the jobs' priority (with --file: the batch's): HIGH goes before NORMAL, NORMAL before LOW",
            )  # fmt: skip
            p.add_argument(
                "--economy", action="store_true",
                help="with --file: an ECONOMY batch, through the provider's Batch API at its batch price (answered "
                "within 24 h; the offline provider's in OFFLINE_BATCH_DELAY_MS)",
            )  # fmt: skip
            p.set_defaults(func=cmd_submit)
        else:
            p.add_argument("id", metavar="JOB_ID", help="the job's id")
            p.set_defaults(func=cmd_status)
        p.epilog = (
            "exit codes: 0 finished, 1 failed, 3 canceled, 4 still running, 2 bad input, no service or another "
            "problem (one line; --debug shows its traceback)"
        )

    p = command("webhook-secret", "print a new WEBHOOK_SECRET (whsec_ + 32 random bytes, base64)")
    p.set_defaults(func=cmd_webhook_secret)

    p = command("migrate", "create or update the PostgreSQL job history's tables (DATABASE_URL), with Alembic")
    p.set_defaults(func=cmd_migrate)

    outbox.add_command(command)

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
