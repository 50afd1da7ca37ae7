"""Rooms projection: room state, conversation items, their rebuild twins, checkpoints, errors.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _room_state(name: str) -> None:
    op.create_table(
        name,
        sa.Column("room", sa.Text(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("first_seq", sa.BigInteger()),
        sa.Column("last_activity", sa.DateTime(timezone=True)),
        sa.Column("events", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("floor_holder", sa.Text()),
        sa.Column("session_version", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("summary_covers_seq", sa.BigInteger()),
        sa.Column("state", JSONB(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("room", name=op.f(f"pk_{name}")),
    )


def _conversation(name: str) -> None:
    op.create_table(
        name,
        sa.Column("room", sa.Text(), nullable=False),
        sa.Column("item_id", sa.Text(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("role", sa.Text()),
        sa.Column("speaker", sa.Text()),
        sa.Column("item", JSONB(), nullable=False),
        sa.PrimaryKeyConstraint("room", "item_id", name=op.f(f"pk_{name}")),
    )
    op.create_index(op.f(f"ix_{name}_room_seq"), name, ["room", "seq"])


def upgrade() -> None:
    op.create_table(
        "projection_checkpoints",
        sa.Column("projection", sa.Text(), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("partitions", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("seq", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("projection", "partition", name=op.f("pk_projection_checkpoints")),
    )
    op.create_table(
        "projection_errors",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("projection", sa.Text(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("room", sa.Text()),
        sa.Column("event_type", sa.Text()),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_projection_errors")),
        sa.UniqueConstraint("projection", "seq", name=op.f("uq_projection_errors_projection_seq")),
    )
    for name in ("room_state", "room_state_next"):
        _room_state(name)
    for name in ("conversation_items", "conversation_items_next"):
        _conversation(name)


def downgrade() -> None:
    for name in ("conversation_items_next", "conversation_items"):
        op.drop_index(op.f(f"ix_{name}_room_seq"), table_name=name)
        op.drop_table(name)
    for name in ("room_state_next", "room_state", "projection_errors", "projection_checkpoints"):
        op.drop_table(name)
