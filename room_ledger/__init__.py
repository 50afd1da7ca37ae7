"""room-ledger: an event-sourced ledger of LiveKit room state on NATS JetStream.

The agent-facing API::

    from room_ledger import Ledger, hydrate, watch
    async with Ledger() as ledger:
        snapshot = await hydrate(ledger, "support-42")   # floor, session, participants, ChatContext
        async for record in ledger.follow("support-42", after=snapshot.seq):
            ...
"""

import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from room_ledger.client import Ledger, Position, Record, RoomSummary
    from room_ledger.errors import (
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
    from room_ledger.hydrate import HydrateTimeout, Snapshot, hydrate
    from room_ledger.settings import Settings
    from room_ledger.watch import RoomWatch, WatchTimeout, watch

#: Where each name of the package's API lives: loaded on first use (PEP 562), so that importing
#: one module of the package (``room_ledger.errors`` for a command's error handling) does not load the
#: log client and nats-py with it.
_HOMES = {
    **dict.fromkeys(("Ledger", "Position", "Record", "RoomSummary"), "room_ledger.client"),
    **dict.fromkeys(("AppendError", "ConflictError", "ConnectError", "EventTooLarge", "InvalidRoomName",
                     "LedgerError", "MalformedEvent", "SettingsError", "StreamConfigError", "UnknownRoom"),
                    "room_ledger.errors"),
    **dict.fromkeys(("HydrateTimeout", "Snapshot", "hydrate"), "room_ledger.hydrate"),
    "Settings": "room_ledger.settings",
    **dict.fromkeys(("RoomWatch", "WatchTimeout", "watch"), "room_ledger.watch"),
}

#: Functions named like the module they live in. Loading a submodule binds it to the package's
#: attribute of its name, which would make ``from room_ledger import hydrate`` the module once
#: anything had imported ``room_ledger.hydrate``: the package binds the function instead.
_NAMED_LIKE_THEIR_MODULE = frozenset({"hydrate", "watch"})


class _Package(ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _NAMED_LIKE_THEIR_MODULE and isinstance(value, ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


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
    "hydrate",
    "watch",
]
