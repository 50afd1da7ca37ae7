"""What a projection holds, for its operator: checkpoints, lag and errors (``ledger doctor``), and
one room's rows in every projection table (``ledger purge``)."""

from __future__ import annotations

from datetime import datetime

import msgspec

from room_ledger import db
from room_ledger.projections import rows as pg_rows
from room_ledger.projections.tables import ROOMS
from room_ledger.settings import Settings

# --- status (ledger doctor) -------------------------------------------------------------------


class CheckpointStatus(msgspec.Struct, kw_only=True):
    projection: str
    partition: int
    partitions: int
    seq: int
    lag: int | None
    updated_at: datetime


class ErrorRow(msgspec.Struct, kw_only=True):
    projection: str
    seq: int
    room: str | None
    event_type: str | None
    error: str
    created_at: datetime


class ProjectionStatus(msgspec.Struct, kw_only=True):
    head: int | None
    checkpoints: list[CheckpointStatus]
    #: Largest lag over the live projection's partitions (None: never projected or head unknown).
    lag: int | None
    errors_total: int
    errors: list[ErrorRow]
    rooms: int


async def status(settings: Settings, *, head: int | None = None, errors_limit: int = 20) -> ProjectionStatus:
    """Checkpoints, lag (head − checkpoint) and recorded errors, for ``ledger doctor --json``.

    Pass ``head`` (``await ledger.head()``) to get lags; raises ConnectError when Postgres is down.
    """
    conn = await db.connect(settings)
    try:
        rows = await conn.fetch(
            "SELECT projection, partition, partitions, seq, updated_at FROM projection_checkpoints "
            "ORDER BY projection, partition"
        )
        errors = await conn.fetch(
            "SELECT projection, seq, room, event_type, error, created_at FROM projection_errors "
            "ORDER BY seq DESC LIMIT $1", errors_limit,
        )
        total = await conn.fetchval("SELECT count(*) FROM projection_errors")
        rooms = await conn.fetchval("SELECT count(*) FROM room_state")
    finally:
        await conn.close()
    checkpoints = [
        CheckpointStatus(projection=r["projection"], partition=r["partition"], partitions=r["partitions"],
                         seq=r["seq"], lag=(max(head - r["seq"], 0) if head is not None else None),
                         updated_at=r["updated_at"])
        for r in rows
    ]
    live = [c.lag for c in checkpoints if c.projection == ROOMS and c.lag is not None]
    return ProjectionStatus(
        head=head, checkpoints=checkpoints, lag=max(live) if live else (head if head is not None else None),
        errors_total=int(total or 0), errors=[ErrorRow(**dict(e)) for e in errors], rooms=int(rooms or 0),
    )


# --- per-room rows (``ledger purge``) -------------------------------------------------------------

_ROOM_TABLES = ("room_state", "conversation_items", "conversation_pages", "room_state_next", "conversation_items_next",
                "conversation_pages_next", "projection_errors")


async def _room_table_rows(settings: Settings, room: str, *, delete: bool) -> dict[str, int]:
    conn = await db.connect(settings)
    key = pg_rows.pg_text(room)
    counts: dict[str, int] = {}
    try:
        async with conn.transaction():
            for table in _ROOM_TABLES:
                if await conn.fetchval("SELECT to_regclass($1)", table) is None:
                    continue
                # Table names come from the constant above, never from input; the room is bound.
                if delete:
                    status_line = await conn.execute(f"DELETE FROM {table} WHERE room = $1", key)
                    counts[table] = int(status_line.rsplit(" ", 1)[-1])
                else:
                    counts[table] = int(await conn.fetchval(f"SELECT count(*) FROM {table} WHERE room = $1", key))
    finally:
        await conn.close()
    return counts


async def room_rows(settings: Settings, room: str) -> dict[str, int]:
    """How many rows each projection table holds for ``room``."""
    return await _room_table_rows(settings, room, delete=False)


async def purge_room(settings: Settings, room: str) -> dict[str, int]:
    """Delete every projection row of ``room``; returns the rows removed per table."""
    return await _room_table_rows(settings, room, delete=True)
