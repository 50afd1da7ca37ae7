"""Conversation pages: each run of 64 items of a room as one text row, for hydration.

Hydration sends a room's whole conversation on every call. Aggregating thousands of item rows
took PostgreSQL most of a hydration (4 of 6.6 ms for 1,907 items); reading ~30 page rows and
the few items after the last page takes about one. The projector seals a page when 64 items
follow the room's last page, and rewrites a page only when one of its items changes. Pages are
stored uncompressed, like the room state (0002).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The page size when this migration was written (projections.tables.PAGE_ITEMS); a migration
#: keeps its own copy so that it means the same thing later.
_PAGE_ITEMS = 64
_TABLES = (("conversation_pages", "conversation_items"), ("conversation_pages_next", "conversation_items_next"))


def upgrade() -> None:
    for pages, items in _TABLES:
        op.create_table(
            pages,
            sa.Column("room", sa.Text(), nullable=False),
            sa.Column("start_seq", sa.BigInteger(), nullable=False),
            sa.Column("end_seq", sa.BigInteger(), nullable=False),
            sa.Column("items", sa.Integer(), nullable=False),
            sa.Column("body", sa.Text(), nullable=False),
            sa.PrimaryKeyConstraint("room", "start_seq", name=op.f(f"pk_{pages}")),
        )
        # Out of line, uncompressed: pglz on every sealed page cost the projector more than the
        # disk it saves, and hydration would pay for the decompression on every read.
        op.execute(f"ALTER TABLE {pages} ALTER COLUMN body SET STORAGE EXTERNAL")
        # Rooms projected before this revision: their complete runs of items become pages.
        op.execute(
            f"""
            INSERT INTO {pages} (room, start_seq, end_seq, items, body)
            SELECT room, min(seq), max(seq), count(*), string_agg(item_text, ',' ORDER BY seq)
            FROM (SELECT room, seq, item_text,
                         (row_number() OVER (PARTITION BY room ORDER BY seq) - 1) / {_PAGE_ITEMS} AS chunk,
                         count(*) OVER (PARTITION BY room) AS total
                  FROM {items}) AS numbered
            WHERE chunk < total / {_PAGE_ITEMS}
            GROUP BY room, chunk
            """
        )


def downgrade() -> None:
    for pages, _ in _TABLES:
        op.drop_table(pages)
