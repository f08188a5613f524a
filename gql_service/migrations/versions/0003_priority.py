"""A job's priority (Job.priority), kept in the history.

Revision ID: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: instant on a table of any size. Rows archived before this have
    # none (null: unknown, shown as such, rather than a NORMAL they may not have had).
    op.execute("ALTER TABLE jobs ADD COLUMN priority text")


def downgrade() -> None:
    op.execute("ALTER TABLE jobs DROP COLUMN priority")
