"""room-ledger: an event-sourced ledger of LiveKit room state on NATS JetStream.

The agent-facing API::

    from ledger import Ledger, Settings
    async with Ledger() as ledger:
        snapshot = await ledger.hydrate("support-42")   # floor, session, participants, ChatContext
        async for record in ledger.follow("support-42", after=snapshot.seq):
            ...
"""

from ledger.client import Ledger, Position, Record, RoomSummary
from ledger.errors import (
    AppendError,
    ConflictError,
    ConnectError,
    EventTooLarge,
    InvalidRoomName,
    LedgerError,
    MalformedEvent,
    SettingsError,
    StreamConfigError,
    UnknownRoom,
)
from ledger.hydrate import HydrateTimeout, Snapshot
from ledger.settings import Settings
from ledger.watch import RoomWatch, WatchTimeout

__all__ = [
    "AppendError",
    "ConflictError",
    "ConnectError",
    "EventTooLarge",
    "HydrateTimeout",
    "InvalidRoomName",
    "Ledger",
    "LedgerError",
    "MalformedEvent",
    "Position",
    "Record",
    "RoomSummary",
    "RoomWatch",
    "Settings",
    "SettingsError",
    "Snapshot",
    "StreamConfigError",
    "UnknownRoom",
    "WatchTimeout",
]
