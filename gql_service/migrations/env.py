"""Alembic's entry point: run the migrations against the URL `gql_service.cli.migrate` sets.

The migrations are plain SQL (`op.execute`): there are no ORM models to compare with.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

url = context.config.get_main_option("sqlalchemy.url")
assert url, "gql_service.cli.migrate sets the database URL"
engine = create_engine(url)
with engine.connect() as connection:
    # `migrate` notes each step applied, to say so in its own words (Alembic's are quiet).
    context.configure(connection=connection, on_version_apply=context.config.attributes.get("on_version_apply"))
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
