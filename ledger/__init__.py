"""room-ledger: an event-sourced ledger of LiveKit room state on NATS JetStream.

The agent-facing API::

    from ledger import Ledger, Settings
    async with Ledger() as ledger:
        snapshot = await ledger.hydrate("support-42")   # floor, session, participants, ChatContext
        async for record in ledger.follow("support-42", after=snapshot.seq):
            ...
"""

from typing import TYPE_CHECKING, Any

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
from ledger.settings import Settings

if TYPE_CHECKING:
    from ledger.hydrate import HydrateTimeout, Snapshot


def __getattr__(name: str) -> Any:
    # Hydration builds on projections.reducers, which imports ledger.events: load it lazily so
    # `import ledger` does not go round in a circle.
    if name in ("HydrateTimeout", "Snapshot"):
        from ledger import hydrate

        return getattr(hydrate, name)
    raise AttributeError(f"module 'ledger' has no attribute {name!r}")

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
    "Settings",
    "SettingsError",
    "Snapshot",
    "StreamConfigError",
    "UnknownRoom",
]
