"""Conversation items also kept as the JSON text hydration sends.

Hydration returns a room's whole conversation (2,000 items is ordinary) on every call. Turning
that many JSONB values back into text took PostgreSQL about half of a hydration; the same JSON
kept as text next to the JSONB (which stays for queries) is sent as it is.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("conversation_items", "conversation_items_next")


def upgrade() -> None:
    for table in _TABLES:
        op.add_column(table, sa.Column("item_text", sa.Text()))
        op.execute(f"UPDATE {table} SET item_text = item::text")
        op.alter_column(table, "item_text", nullable=False)


def downgrade() -> None:
    for table in _TABLES:
        op.drop_column(table, "item_text")
