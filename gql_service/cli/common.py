"""What every `gql-service` command shares: one-line failures, settings, checks before start."""

from __future__ import annotations

import errno
import logging
import socket
import sys
from typing import TYPE_CHECKING

from gql_service import logs
from gql_service.settings import RedisTarget, Settings, SettingsError, load_settings

if TYPE_CHECKING:
    pass

log = logging.getLogger("gql_service")

EXIT_USAGE = 2  # bad input or settings, as in the client's exit codes (gql_service.cli.client)
# How long `dev` lets its children stop cleanly before it kills whatever is left of them.


def fail(message: str) -> SystemExit:
    print(f"gql-service: {message}", file=sys.stderr)
    return SystemExit(EXIT_USAGE)


def settings_or_exit() -> Settings:
    try:
        settings = load_settings()
    except SettingsError as exc:
        for line in str(exc).splitlines():
            print(f"gql-service: bad setting: {line}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    logs.configure(settings.log_format, settings.log_level)
    return settings


def check_trusted_documents(settings: Settings) -> None:
    """Every trusted document parsed and validated against the schema before the API
    starts: a bad one stops start-up with one line naming it."""
    if not settings.trusted_document_paths:
        return
    from gql_service.api.documents import ManifestError, load_manifests
    from gql_service.api.operations import core_schema
    from gql_service.api.schema import schema

    try:
        load_manifests(settings.trusted_document_paths, core_schema(schema))
    except ManifestError as exc:
        raise fail(f"bad setting: TRUSTED_DOCUMENTS: {exc}") from None


def require_redis(target: RedisTarget, timeout_s: float, *, wait_s: float = 0.0) -> None:
    """One clear line instead of RQ's traceback when Redis is not there; with `wait_s`,
    tried again (a line per attempt) until it answers or `wait_s` has passed."""
    from redis import RedisError

    from gql_service.redis_conn import Outage, sync_client

    setting = "REDIS_SENTINELS and REDIS_SENTINEL_MASTER" if target.sentinels else "REDIS_URL"

    def ping() -> None:
        with sync_client(target, timeout_s=timeout_s, max_connections=1) as client:
            client.ping()

    outage = Outage(f"Redis at {target}", log, give_up_after_s=wait_s, base_s=0.5, cap_s=5.0, every_attempt=True)
    try:
        outage.call_sync(ping)
    except (RedisError, OSError, ValueError) as exc:
        raise fail(f"cannot reach Redis at {target} ({exc}); check {setting}") from None


def require_free_port(host: str, port: int, what: str) -> None:
    """Fail before starting anything, rather than after Redis and workers are up."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As uvicorn and redis-server bind: a port in TIME_WAIT is free for them too.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise fail(f"{host}:{port} is already in use (another gql-service?); choose another {what}") from None
            raise fail(f"cannot listen on {host}:{port} ({exc.strerror}); check {what}") from None


def migrate_history(database_url: str) -> None:
    import sqlalchemy.exc

    from gql_service.cli import migrate

    try:
        applied, head = migrate.upgrade(database_url)
    except sqlalchemy.exc.ArgumentError:
        raise fail("bad setting: DATABASE_URL: not a URL such as postgresql://user:password@host:5432/db") from None
    except sqlalchemy.exc.OperationalError as exc:
        raise fail(f"cannot reach the job history's PostgreSQL: {_one_line(exc.orig)}") from None
    except sqlalchemy.exc.DBAPIError as exc:  # reached, and refused: a permission, a table changed by hand
        raise fail(f"the job history's migration failed: {_one_line(exc.orig)}") from None
    for step in applied:
        log.info("migrate: applied %s", step)
    state = "is up to date" if applied else "was up to date already"
    log.info("migrate: the job history's schema %s (%s)", state, head)


def _one_line(error: BaseException | None) -> str:
    # psycopg's messages run over lines ("…refused\n\tIs the server running…").
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def quiet_client_logs() -> None:
    # A command-line client prints its own progress; httpx's per-request INFO lines are noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)
