"""Wait for what a room's log records: ``async with watch(ledger, room) as log: await log.until(...)``.

A :class:`RoomWatch` follows one room from the start of its log (or from ``after``) in the
background and keeps its records in memory, so a script, an operator's check or a test can wait
on a condition over the log (the bridge has recorded a join, an agent has claimed the floor)
with a deadline instead of sleeping. It holds every record it has seen: watch a room for the
length of a task, not for the life of a process.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from room_ledger.errors import LedgerError
from room_ledger.following import FollowedRoom

if TYPE_CHECKING:
    from room_ledger.client import Ledger
    from room_ledger.records import Record

#: How long :meth:`RoomWatch.until` waits unless told otherwise.
DEFAULT_WATCH_TIMEOUT_S = 20.0


class WatchTimeout(LedgerError, TimeoutError):
    """The room's log did not match in time. The message says what was awaited and what the log has."""


def watch(ledger: Ledger, room: str, *, after: int = 0) -> RoomWatch:
    """Follow the room in the background and wait on conditions over its log.

    ``async with watch(ledger, room) as log: await log.until(lambda rs: ..., what="the join")``
    """
    return RoomWatch(ledger, room, after=after)


class RoomWatch:
    """One room's log as it grows. ``records`` is every record seen so far, in log order."""

    def __init__(self, ledger: Ledger, room: str, *, after: int = 0) -> None:
        self.room = room
        self.records: list[Record] = []
        self._reported = False
        self._followed = FollowedRoom(ledger, room, after=after)
        self._followed.on_record(self.records.append)
        self._followed.start(name=f"watch {room}")

    async def until(self, predicate: Callable[[list[Record]], bool], timeout: float = DEFAULT_WATCH_TIMEOUT_S,
                    *, what: str | None = None) -> list[Record]:
        """Wait until ``predicate(records)`` holds; returns the records. Raises :class:`WatchTimeout`."""
        try:
            held = await self._followed.wait_for(lambda: predicate(self.records), timeout)
        except TimeoutError:
            raise WatchTimeout(self._describe(what or "a matching record", timeout)) from None
        if not held:
            self._raise_ended(what)
        return self.records

    async def next_index(self, match: Callable[[Record], bool], *, after: int = 0,
                         timeout: float = DEFAULT_WATCH_TIMEOUT_S, what: str | None = None) -> int:
        """Wait for the first record at index ``after`` or later that ``match``es; returns its index."""

        def found() -> int | None:
            return next((i for i in range(after, len(self.records)) if match(self.records[i])), None)

        await self.until(lambda _: found() is not None, timeout, what=what)
        index = found()
        assert index is not None  # until() returned, so the predicate held
        return index

    def of(self, *types: str) -> list[Record]:
        """The records of these event types, in log order."""
        return [r for r in self.records if r.type in types]

    def count(self, *types: str) -> int:
        return sum(1 for r in self.records if r.type in types)

    def _describe(self, what: str, timeout: float) -> str:
        types = [r.type for r in self.records]
        last = f", the last: {', '.join(types[-5:])}" if types else ""
        plural = "" if len(types) == 1 else "s"
        return (f"room {self.room!r}: waited {timeout:g}s for {what}; the log has {len(types)} record{plural}{last}. "
                f"Is the bridge in the room? (`ledger doctor`, `ledger replay {self.room}`)")

    def _raise_ended(self, what: str | None) -> None:
        error = self._followed.error
        if error is not None:
            self._reported = True
            raise error  # the follow's own error (the log unavailable, say): it says what to do
        raise WatchTimeout(f"room {self.room!r}: stopped following the log before {what or 'a matching record'}")

    async def close(self) -> None:
        """Stop following. A follow error that :meth:`until` did not report is raised here."""
        await self._followed.close()
        error = self._followed.error
        if error is not None and not self._reported:
            raise error

    async def __aenter__(self) -> RoomWatch:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
