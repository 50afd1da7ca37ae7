"""Wait for what a room's log records: ``async with ledger.watch(room) as log: await log.until(...)``.

A :class:`RoomWatch` follows one room from the start of its log (or from ``after``) in the
background and keeps its records in memory, so a script, an operator's check or a test can wait
on a condition over the log (the bridge has recorded a join, an agent has claimed the floor)
with a deadline instead of sleeping. It holds every record it has seen: watch a room for the
length of a task, not for the life of a process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from room_ledger.errors import LedgerError

if TYPE_CHECKING:
    from room_ledger.client import Ledger, Record

#: How long :meth:`RoomWatch.until` waits unless told otherwise.
DEFAULT_WATCH_TIMEOUT_S = 20.0


class WatchTimeout(LedgerError, TimeoutError):
    """The room's log did not match in time. The message says what was awaited and what the log has."""


class RoomWatch:
    """One room's log as it grows. ``records`` is every record seen so far, in log order."""

    def __init__(self, ledger: Ledger, room: str, *, after: int = 0) -> None:
        self.room = room
        self.records: list[Record] = []
        self._changed = asyncio.Condition()
        self._reported = False
        self._task = asyncio.create_task(self._follow(ledger, after), name=f"watch {room}")

    async def _follow(self, ledger: Ledger, after: int) -> None:
        try:
            async for record in ledger.follow(self.room, after=after):
                self.records.append(record)
                async with self._changed:
                    self._changed.notify_all()
        finally:
            # A follow that ends (or fails) wakes the waiters, so they report it instead of timing out.
            async with self._changed:
                self._changed.notify_all()

    async def until(self, predicate: Callable[[list[Record]], bool], timeout: float = DEFAULT_WATCH_TIMEOUT_S,
                    *, what: str | None = None) -> list[Record]:
        """Wait until ``predicate(records)`` holds; returns the records. Raises :class:`WatchTimeout`."""

        def settled() -> bool:
            return self._task.done() or predicate(self.records)

        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(settled)

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise WatchTimeout(self._describe(what or "a matching record", timeout)) from None
        if not predicate(self.records):
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
        error = self._task.exception() if not self._task.cancelled() else None
        if error is not None:
            self._reported = True
            raise error  # the follow's own error (the log unavailable, say): it says what to do
        raise WatchTimeout(f"room {self.room!r}: stopped following the log before {what or 'a matching record'}")

    async def close(self) -> None:
        """Stop following. A follow error that :meth:`until` did not report is raised here."""
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        except Exception:
            if not self._reported:
                raise

    async def __aenter__(self) -> RoomWatch:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
