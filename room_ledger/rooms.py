"""Questions about rooms as a whole, answered from the stream's subject index: which rooms there
are with their event counts, a room's first and last events, and purging one."""

from __future__ import annotations

import contextlib
import difflib

import msgspec
import nats.js.errors

from room_ledger.connection import Connection
from room_ledger.errors import AppendError, UnknownRoom
from room_ledger.eventlog import EventLog
from room_ledger.records import RoomBounds, RoomSummary
from room_ledger.subjects import Subjects, room_from_token, room_token


class Rooms:
    """The rooms of the log: summaries, bounds, counts, the unknown-room check, purge."""

    def __init__(self, connection: Connection, subjects: Subjects, log: EventLog) -> None:
        self._connection = connection
        self._subjects = subjects
        self._log = log
        self.settings = connection.settings

    async def summaries(self) -> list[RoomSummary]:
        """Every room in the log with its event count."""
        info = await self._connection.js.stream_info(self.settings.stream, subjects_filter=self._subjects.all_rooms())
        counts: dict[str, int] = {}
        prefix_len = len(self.settings.subject_prefix) + 1
        for subject, count in (info.state.subjects or {}).items():
            token = subject[prefix_len:].split(".", 1)[0]
            room = room_from_token(token)
            counts[room] = counts.get(room, 0) + int(count)
        return [RoomSummary(room, n) for room, n in sorted(counts.items())]

    async def names(self) -> list[str]:
        return [summary.room for summary in await self.summaries()]

    async def count(self, room: str) -> int:
        """How many events the room has in the log."""
        info = await self._connection.js.stream_info(self.settings.stream, subjects_filter=self._subjects.room(room))
        return sum(int(n) for n in (info.state.subjects or {}).values())

    async def bounds(self, room: str) -> RoomBounds:
        """The room's first and last stored events: sequences and storage times, by direct gets."""
        js, stream, subject = self._connection.js, self.settings.stream, self._subjects.room(room)
        first_seq = last_seq = None
        first_time = last_time = None
        with contextlib.suppress(nats.js.errors.NotFoundError):
            first = await js.get_msg(stream, seq=1, subject=subject, next=True, direct=True)
            first_seq, first_time = first.seq, first.time
        with contextlib.suppress(nats.js.errors.NotFoundError):
            last = await js.get_last_msg(stream, subject, direct=True)
            last_seq, last_time = last.seq, last.time
        return RoomBounds(first_seq, first_time, last_seq, last_time)

    async def require(self, room: str) -> None:
        """Raise :class:`UnknownRoom` (with close names) when the room has no events."""
        if await self._log.room_last_seq(room):
            return
        names = await self.names()
        raise UnknownRoom(room, difflib.get_close_matches(room, names, n=3, cutoff=0.5))

    async def purge(self, room: str) -> int:
        """Remove every message of a room from the stream; returns how many went."""
        room_token(room)  # validated: purge only ever targets an encoded room subject
        request = msgspec.json.encode({"filter": self._subjects.room(room)})
        msg = await self._connection.nc.request(
            f"$JS.API.STREAM.PURGE.{self.settings.stream}", request, timeout=self._connection.ack_timeout_s
        )
        reply = msgspec.json.decode(msg.data)
        if "error" in reply:
            raise AppendError(f"purge of room {room!r} failed: {reply['error'].get('description')}")
        return int(reply.get("purged", 0))
