"""A job's cost in USD (Job.costUsd), kept with its usage.

Revision ID: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: instant on a table of any size, and null is what a job without a
    # priced model has (rows archived before this have no cost either).
    op.execute("ALTER TABLE jobs ADD COLUMN cost_usd double precision")


def downgrade() -> None:
    op.execute("ALTER TABLE jobs DROP COLUMN cost_usd")
