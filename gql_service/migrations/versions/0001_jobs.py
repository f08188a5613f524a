"""The jobs table: every ended job, newest first per tenant.

Revision ID: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE jobs (
            id          text PRIMARY KEY,
            tenant      text NOT NULL,
            status      text NOT NULL,
            stage       text NOT NULL,
            version     integer NOT NULL,
            created_at  timestamptz NOT NULL,
            updated_at  timestamptz NOT NULL,
            started_at  timestamptz,
            finished_at timestamptz,
            attempts    integer NOT NULL,
            model       text,
            result      jsonb,
            error       jsonb,
            usage       jsonb,
            request_id  text,
            text        text
        )
        """
    )
    # `jobs(first, after)` pages by (created_at, id) within a tenant; retention by age.
    op.execute("CREATE INDEX jobs_tenant_created ON jobs (tenant, created_at DESC, id DESC)")
    op.execute("CREATE INDEX jobs_finished ON jobs (finished_at)")


def downgrade() -> None:
    op.execute("DROP TABLE jobs")
