"""room-ledger: an event-sourced ledger of LiveKit room state on NATS JetStream.

The agent-facing API::

    from ledger import Ledger, Settings
    async with Ledger() as ledger:
        snapshot = await ledger.hydrate("support-42")   # floor, session, participants, ChatContext
        async for record in ledger.follow("support-42", after=snapshot.seq):
            ...
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: Where each name of the package's API lives: loaded on first use (PEP 562), so that importing
#: one module of the package (``ledger.errors`` for a command's error handling) does not load the
#: log client and nats-py with it.
_HOMES = {
    **dict.fromkeys(("Ledger", "Position", "Record", "RoomSummary"), "ledger.client"),
    **dict.fromkeys(("AppendError", "ConflictError", "ConnectError", "EventTooLarge", "InvalidRoomName",
                     "LedgerError", "MalformedEvent", "SettingsError", "StreamConfigError", "UnknownRoom"),
                    "ledger.errors"),
    **dict.fromkeys(("HydrateTimeout", "Snapshot"), "ledger.hydrate"),
    "Settings": "ledger.settings",
    **dict.fromkeys(("RoomWatch", "WatchTimeout"), "ledger.watch"),
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'ledger' has no attribute {name!r}")
    import importlib  # noqa: PLC0415 - only on the first use of a name

    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


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
