"""Operations on rooms: the room list (the core's :mod:`room_ledger.room_list`), and purging a room."""

from __future__ import annotations

from room_ledger import db
from room_ledger.client import Ledger
from room_ledger.projections import projector
from room_ledger.room_list import room_rows as room_rows
from room_ledger.settings import Settings


async def room_event_count(ledger: Ledger, room: str) -> int:
    return await ledger.rooms.count(room)


async def projection_rows(settings: Settings, room: str, *, delete: bool) -> dict[str, int] | None:
    """Rows of the room in every projection (deleted when ``delete``); None without a running PostgreSQL."""
    # The projector brings SQLAlchemy along: loaded only by the commands that touch projections.

    if db.running_url(settings) is None:
        return None
    result = await (projector.purge_room if delete else projector.room_rows)(settings, room)
    return {str(k): int(v) for k, v in dict(result).items()}
