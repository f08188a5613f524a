"""`gql-service migrate`: bring the PostgreSQL history's schema up to date (Alembic)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from alembic.runtime.migration import MigrationInfo
    from alembic.script import ScriptDirectory

MIGRATIONS = Path(__file__).parents[1] / "migrations"


def sqlalchemy_url(database_url: str) -> str:
    """postgresql://… as SQLAlchemy names the psycopg 3 driver: postgresql+psycopg://…"""
    parts = urlsplit(database_url)
    return urlunsplit(parts._replace(scheme="postgresql+psycopg"))


def upgrade(database_url: str) -> tuple[list[str], str | None]:
    """(the steps applied, each "0002, what it does"; the revision the schema is at now)."""
    # Alembic's INFO lines (its plugins set up, the dialect, each step) came before our one
    # line even when PostgreSQL was not there; the caller says what was applied instead.
    # Quieted before the import: Alembic sets up its plugins, and says so, on import.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(database_url).replace("%", "%%"))
    script = ScriptDirectory.from_config(config)
    applied: list[str] = []

    def note(*, step: MigrationInfo, **_: Any) -> None:
        applied.append(str(step.up_revision_id))

    config.attributes["on_version_apply"] = note  # migrations/env.py passes it to Alembic
    command.upgrade(config, "head")
    return [_described(script, revision) for revision in applied], script.get_current_head()


def _described(script: ScriptDirectory, revision: str) -> str:
    found = script.get_revision(revision)
    return f"{revision}, {found.doc}" if found is not None and found.doc else revision
