"""The ``Ledger`` client: append, read and follow a room's events on JetStream.

Every other part of room-ledger (bridge, projector, CLI, agents) goes through this class::

    async with Ledger(Settings.from_env()) as ledger:
        position = await ledger.append(make_event("support-42", FloorRequest(agent_id="triage")))
        async for record in ledger.read("support-42"):
            ...

``Ledger`` is a facade over small pieces sharing one connection (nats.py's shape): the log
(append, read, follow: :mod:`room_ledger.eventlog`, whose methods ``Ledger`` offers itself),
``ledger.stream`` (the stream's configuration and the server's probes), ``ledger.payloads``
(the Object Store) and ``ledger.rooms`` (room listings, bounds, purge). Hydration and watching
sit above it: :func:`room_ledger.hydrate.hydrate` and :func:`room_ledger.watch.watch`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from datetime import datetime

from room_ledger import events as ev
from room_ledger._wire import credentials_refused
from room_ledger.connection import ACK_TIMEOUT_S, Connection
from room_ledger.eventlog import ATOMIC_BATCH_SIZE, ERR_BATCH_DUPLICATE, MSG_ID, EventLog
from room_ledger.payloads import ObjectUpload, Payloads
from room_ledger.records import (
    Position,
    Record,
    RoomBounds,
    RoomSummary,
    ack_position,
    needs_payload,
    stored_time,
)
from room_ledger.rooms import Rooms
from room_ledger.settings import DIRECT_BATCH, Settings
from room_ledger.stream import StreamAdmin
from room_ledger.subjects import Subjects

#: Names that lived here before the pieces, imported from here by many callers.
__all__ = [
    "ACK_TIMEOUT_S",
    "ATOMIC_BATCH_SIZE",
    "ERR_BATCH_DUPLICATE",
    "MSG_ID",
    "Ledger",
    "ObjectUpload",
    "Position",
    "Record",
    "RoomBounds",
    "RoomSummary",
    "ack_position",
    "credentials_refused",
    "needs_payload",
    "stored_time",
]


class Ledger:
    """An async context manager around one NATS connection and the ledger's stream."""

    def __init__(self, settings: Settings | None = None, *, name: str = "room-ledger") -> None:
        self.settings = settings or Settings.from_env()
        self.subjects = Subjects(self.settings.subject_prefix)
        self.connection = Connection(self.settings, name=name)
        self.stream = StreamAdmin(self.connection, self.subjects)
        self.payloads = Payloads(self.connection)
        self._log = EventLog(self.connection, self.subjects, self.stream.limits, self.payloads)
        self.rooms = Rooms(self.connection, self.subjects, self._log)

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Ledger:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self, *, ensure_stream: bool = True) -> None:
        await self.connection.connect()
        if ensure_stream:
            await self.stream.ensure()

    async def close(self) -> None:
        await self.connection.close()

    def on_close(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Await ``hook()`` when this ledger closes (errors ignored): for resources kept per ledger."""
        self.connection.on_close(hook)

    @property
    def nats_url(self) -> str:
        """The NATS servers connected to, comma-separated."""
        return self.connection.url

    @property
    def atomic_batch_size(self) -> int:
        """Events per atomic batch now: ATOMIC_BATCH_SIZE, or less after the server refused it."""
        return self._log.atomic_batch_size

    # --- the log (room_ledger/eventlog.py) ---------------------------------------------------

    async def append(
        self, event: ev.KnownEvent, *, expect_room_seq: int | None = None, expect_category: str | None = None
    ) -> Position:
        """Append one event; returns its position (see :meth:`EventLog.append`)."""
        return await self._log.append(event, expect_room_seq=expect_room_seq, expect_category=expect_category)

    async def append_many(
        self, events: Iterable[ev.KnownEvent], *, atomic: bool | None = None, payloads: Sequence[bytes] | None = None
    ) -> list[Position]:
        """Append many events, in order, every one acknowledged (see :meth:`EventLog.append_many`)."""
        return await self._log.append_many(events, atomic=atomic, payloads=payloads)

    def read(
        self,
        room: str,
        *,
        after: int = 0,
        until: int | None = None,
        types: Sequence[str] | None = None,
        since_time: datetime | None = None,
        follow: bool = False,
    ) -> AsyncGenerator[Record, None]:
        """The room's events in order (see :meth:`EventLog.read`)."""
        return self._log.read(room, after=after, until=until, types=types, since_time=since_time, follow=follow)

    async def read_recent(self, room: str, *, after: int, batch: int = DIRECT_BATCH,
                          types: Sequence[str] | None = None) -> list[Record]:
        """The room's events after ``after`` without creating a consumer (see :meth:`EventLog.read_recent`)."""
        return await self._log.read_recent(room, after=after, batch=batch, types=types)

    def follow(self, room: str, *, after: int = 0, types: Sequence[str] | None = None) -> AsyncGenerator[Record, None]:
        """History after ``after``, then live events: no gap, no duplicate, across reconnects."""
        return self._log.follow(room, after=after, types=types)

    def read_all(self, *, after: int = 0, follow: bool = False) -> AsyncGenerator[Record, None]:
        """Every room's events in stream order (for projectors and tools)."""
        return self._log.read_all(after=after, follow=follow)

    async def head(self) -> int:
        """The sequence of the last event stored in the log (0 when there is none)."""
        return await self._log.head()

    async def room_last_seq(self, room: str) -> int:
        """The sequence of the room's last event, 0 when it has none."""
        return await self._log.room_last_seq(room)

    async def require_room(self, room: str) -> None:
        """Raise :class:`~room_ledger.errors.UnknownRoom` (with close names) when the room has no events."""
        await self.rooms.require(room)
