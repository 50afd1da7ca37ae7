"""One follower per watched room, fanned out to every browser watching it.

A single ordered consumer (the core's :class:`~room_ledger.following.FollowedRoom`) follows the
room's log, folds it with
:class:`room_ledger.web.roomview.RoomCollector` (the HTML report's derivation) and hands each event
to every subscriber, so a room watched by twenty people costs one consumer. A room nobody watches
stops following after :data:`IDLE_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from room_ledger.client import Ledger
from room_ledger.errors import LedgerError
from room_ledger.following import FollowedRoom
from room_ledger.records import Record
from room_ledger.room_list import room_rows
from room_ledger.web.room_json import record_bytes, view_json
from room_ledger.web.roomview import RoomCollector

log = logging.getLogger("ledger.serve")

#: Events each room keeps ready for a browser that connects (its first screen of the timeline).
RECENT: Final = 2000
#: Events sent to a browser that connects without a position (the latest ones).
FIRST_SCREEN: Final = 300
#: Events queued for one browser before it is dropped as too slow (it reconnects where it was).
MAX_BACKLOG: Final = 20_000
#: A room nobody has watched for this long stops following its log.
IDLE_S: Final = 120.0
#: Comment line sent on a quiet event stream, so dead connections are noticed.
HEARTBEAT_S: Final = 15.0
#: The room list is read from the log at most this often, however many rooms pages are open.
ROOMS_EVERY_S: Final = 1.0


@dataclass(eq=False)
class Subscriber:
    queue: asyncio.Queue[tuple[int, bytes]] = field(default_factory=asyncio.Queue)
    dropped: bool = False


class RoomHub:
    """Follows one room's log once and fans it out; keeps the folded view of the room live."""

    def __init__(self, ledger: Ledger, room: str) -> None:
        self.ledger = ledger
        self.room = room
        self.collector = RoomCollector(room)
        self.recent: deque[tuple[int, bytes]] = deque(maxlen=RECENT)
        self.subscribers: set[Subscriber] = set()
        self.last_used = time.monotonic()
        self._view: tuple[int, bytes] | None = None
        # The core's followed room (the one agents and `watch` use): it follows, this hub folds
        # each record into the page and fans it out, and requests wait on it to catch up.
        self.followed = FollowedRoom(ledger, room)
        self.followed.on_record(self._fan_out)
        self.followed.on_end(self._ended)

    def start(self) -> None:
        self.followed.start(name=f"serve-follow-{self.room}")

    async def close(self) -> None:
        await self.followed.close()

    @property
    def seq(self) -> int:
        return self.collector.seq

    def _fan_out(self, record: Record) -> None:
        self.collector.feed(record)
        line = (record.seq, record_bytes(record))
        self.recent.append(line)
        for sub in list(self.subscribers):
            if sub.queue.qsize() >= MAX_BACKLOG:
                # Too slow: it reconnects with Last-Event-ID and reads on from the log.
                sub.dropped = True
                self.subscribers.discard(sub)
                sub.queue.put_nowait((-1, b""))
            else:
                sub.queue.put_nowait(line)

    def _ended(self, error: Exception | None) -> None:
        if error is None:  # closed: nobody is listening any more
            return
        # A reader that failed: every browser following the room hears the end, and reconnects.
        log.warning("following room failed: %s", error)
        for sub in list(self.subscribers):
            sub.queue.put_nowait((-1, b""))

    async def ready(self, timeout: float = 30.0) -> None:
        """Wait until the page holds every event the room had when asked."""
        self.last_used = time.monotonic()
        try:
            await self.followed.catch_up(timeout)
        except TimeoutError:
            raise LedgerError(f"room {self.room!r}: the log did not answer within {timeout:.0f}s; "
                              "`ledger doctor` shows the stream's state") from None
        if self.followed.error is not None:
            raise LedgerError(f"room {self.room!r} cannot be followed: {self.followed.error}")

    def view(self) -> bytes:
        """The room's view now as JSON (built once per new sequence, whoever asks)."""
        seq = self.seq
        if self._view is None or self._view[0] != seq:
            page = self.collector.page()
            self._view = (seq, msgspec.json.encode(view_json(page, live=True)))
        return self._view[1]

    def subscribe(self) -> Subscriber:
        sub = Subscriber()
        self.subscribers.add(sub)
        self.last_used = time.monotonic()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        self.last_used = time.monotonic()


class Hubs:
    """The rooms being followed; a room nobody watches stops after :data:`IDLE_S`."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.hubs: dict[str, RoomHub] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._rows: tuple[float, list[Any]] | None = None
        self._rows_task: asyncio.Future[list[Any]] | None = None

    async def room_rows(self) -> list[Any]:
        """:func:`room_ledger.room_list.room_rows`, read at most once per :data:`ROOMS_EVERY_S` whoever asks
        (every open rooms page asks every two seconds; each read looks into every room)."""

        now = time.monotonic()
        if self._rows is None or now - self._rows[0] > ROOMS_EVERY_S:
            if self._rows_task is None or self._rows_task.done():
                self._rows_task = asyncio.ensure_future(room_rows(self.ledger))
            task = self._rows_task
            rows = await asyncio.shield(task)
            self._rows = (time.monotonic(), rows)
        return self._rows[1]

    def get(self, room: str) -> RoomHub:
        hub = self.hubs.get(room)
        if hub is None or hub.followed.error is not None:
            hub = self.hubs[room] = RoomHub(self.ledger, room)
            hub.start()
        return hub

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap(), name="serve-reaper")

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(IDLE_S / 4)
            now = time.monotonic()
            for room, hub in list(self.hubs.items()):
                if not hub.subscribers and now - hub.last_used > IDLE_S:
                    del self.hubs[room]
                    await hub.close()

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for hub in list(self.hubs.values()):
            await hub.close()
        self.hubs.clear()


#: A batch of the room's events as ``(seq, record JSON)``; empty: nothing for a while (heartbeat).
Batch = list[tuple[int, bytes]]


async def batches(hub: RoomHub, sub: Subscriber, after: int | None) -> AsyncIterator[Batch]:
    """What a client has not seen yet: the room's buffer (or the log before it), then live batches.

    Ends when the subscriber was dropped as too slow or the room's reader failed: the client
    reconnects from the last sequence it has.
    """
    backlog = list(hub.recent)
    if after is None:
        backlog = backlog[-FIRST_SCREEN:]
        sent = backlog[0][0] - 1 if backlog else 0
    else:
        sent = after
        first = backlog[0][0] if backlog else hub.seq + 1
        if after + 1 < first:
            older: Batch = []
            async for record in hub.ledger.read(hub.room, after=after, until=first - 1):
                older.append((record.seq, record_bytes(record)))
                if len(older) >= 1000:
                    yield older
                    older = []
                sent = record.seq
            if older:
                yield older
    chunk = [(seq, data) for seq, data in backlog if seq > sent]
    if chunk:
        yield chunk
        sent = chunk[-1][0]
    while True:
        try:
            seq, data = await asyncio.wait_for(sub.queue.get(), HEARTBEAT_S)
        except TimeoutError:
            yield []
            continue
        if seq < 0:
            return
        batch = [(seq, data)] if seq > sent else []
        sent = max(sent, seq)
        # Whatever else is waiting goes in the same write (a busy room is not one write per event).
        while not sub.queue.empty():
            seq, data = sub.queue.get_nowait()
            if seq < 0:
                break
            if seq > sent:
                batch.append((seq, data))
                sent = seq
        if batch:
            yield batch
        if seq < 0:
            return
