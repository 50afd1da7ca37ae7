"""The room list: every room with its events, first and last activity, who is present, and gaps.

What ``ledger rooms`` prints and the web view's rooms page shows, read once here.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from room_ledger import events as ev
from room_ledger.client import Ledger
from room_ledger.state import RoomState, apply_safely

#: How many rooms ``ledger rooms`` looks into at once.
ROOM_CONCURRENCY = 16


@dataclass
class RoomRow:
    room: str
    events: int
    first_seq: int | None = None
    first_activity: datetime | None = None
    last_seq: int | None = None
    last_activity: datetime | None = None
    participants: list[str] = field(default_factory=list)
    gaps: int = 0
    #: livekit-server's own view (``ledger webhooks``): ``server.*`` events of the room.
    server_events: int = 0
    #: The server reported the room started, and the bridge never joined it.
    uncovered: bool = False
    #: Participants the server saw join whom the bridge never recorded (hidden ones left out).
    missed: list[str] = field(default_factory=list)

    def to_builtins(self) -> dict[str, Any]:
        return {
            "server_events": self.server_events,
            "uncovered": self.uncovered,
            "missed": self.missed,
            "room": self.room,
            "events": self.events,
            "first_seq": self.first_seq,
            "first_activity": self.first_activity,
            "last_seq": self.last_seq,
            "last_activity": self.last_activity,
            "participants": self.participants,
            "gaps": self.gaps,
        }


async def _room_row(ledger: Ledger, room: str, events: int) -> RoomRow:
    row = RoomRow(room=room, events=events)
    bounds = await ledger.rooms.bounds(room)
    row.first_seq, row.first_activity = bounds.first_seq, bounds.first_time
    row.last_seq, row.last_activity = bounds.last_seq, bounds.last_time
    # Presence and gaps come from two small categories of the room, folded by the reducers. Read
    # by direct gets: a consumer per room and category is a create and a delete on the server's
    # meta layer each, for a handful of events, in a listing of thousands of rooms.
    state = RoomState(room=room)
    for record in await ledger.read_recent(room, after=0, types=["participant.*"]):
        apply_safely(state, record)
    row.participants = sorted(p.identity for p in state.participants.values() if p.present)
    row.gaps = len(await ledger.read_recent(room, after=0, types=["bridge.gap"]))
    await _server_view(ledger, room, row, state)
    return row


async def _server_view(ledger: Ledger, room: str, row: RoomRow, state: Any) -> None:
    """What the server's webhooks say the bridge did not see: the whole room, or participants."""

    started = False
    joined: dict[str, None] = {}
    for record in await ledger.read_recent(room, after=0, types=["server.*"]):
        row.server_events += 1
        event = record.event
        if isinstance(event, ev.ServerRoomStartedEvent):
            started = True
        elif isinstance(event, ev.ServerParticipantJoinedEvent) and event.body.identity:
            permission = event.body.webhook.get("participant", {}).get("permission", {})
            # Hidden participants (the bridge itself among them) are never announced to the room.
            if not (isinstance(permission, dict) and permission.get("hidden")):
                joined[event.body.identity] = None
    if not row.server_events:
        return
    bridged = bool(await ledger.read_recent(room, after=0, types=["bridge.joined"]))
    row.uncovered = started and not bridged
    row.missed = [identity for identity in joined if identity not in state.participants]


async def room_rows(ledger: Ledger) -> list[RoomRow]:
    """Every room with its events, first/last activity, who is present, and its bridge gaps."""
    summaries = await ledger.rooms.summaries()
    limit = asyncio.Semaphore(ROOM_CONCURRENCY)

    async def one(room: str, events: int) -> RoomRow:
        async with limit:
            return await _room_row(ledger, room, events)

    rows = await asyncio.gather(*(one(s.room, s.events) for s in summaries))
    return sorted(rows, key=lambda r: (r.last_seq or 0), reverse=True)
