"""Room state documents stored out of line without compression.

Every projector batch rewrites the state document of each room it touched (several KB once a
room has a session and a floor history). pglz compression of those documents took half of the
projector's write time; the documents are small enough that the disk they save is not worth it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("room_state", "room_state_next")


def upgrade() -> None:
    for table in _TABLES:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN state SET STORAGE EXTERNAL")


def downgrade() -> None:
    for table in _TABLES:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN state SET STORAGE EXTENDED")
