"""One room's log followed in the background, for whoever waits on what it records.

:class:`FollowedRoom` follows a room from a sequence on, hands each record to its listeners in
log order (they fold it: into a :class:`~room_ledger.state.RoomState`, a list of records, a web
view), then wakes everyone waiting on a condition, with a deadline. A follow that ends (a failed
read) wakes the waiters too, so they report it instead of waiting out their deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from room_ledger.client import Ledger
    from room_ledger.records import Record


class FollowedRoom:
    """A room's log as it grows: listeners see each record, waiters wake on each."""

    def __init__(self, ledger: Ledger, room: str, *, after: int = 0) -> None:
        self.ledger = ledger
        self.room = room
        #: The sequence of the last record handed to the listeners (``after`` before the first).
        self.seq = after
        #: Why the follow stopped, when it failed (None while it runs, or when it was closed).
        self.error: Exception | None = None
        self._record_listeners: list[Callable[[Record], None]] = []
        self._end_listeners: list[Callable[[Exception | None], None]] = []
        self._changed = asyncio.Condition()
        self._ended = False
        self._task: asyncio.Task[None] | None = None

    def on_record(self, listener: Callable[[Record], None]) -> Callable[[], None]:
        """Call ``listener(record)`` for each record, in log order, before waiters wake; returns the undo."""
        self._record_listeners.append(listener)
        return lambda: self._record_listeners.remove(listener) if listener in self._record_listeners else None

    def on_end(self, listener: Callable[[Exception | None], None]) -> None:
        """Call ``listener(error)`` once when the follow stops (``None`` when it was closed)."""
        self._end_listeners.append(listener)

    def start(self, *, name: str | None = None) -> None:
        """Start following (``name``: the task's, as task dumps show it)."""
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name=name or f"follow {self.room}")

    @property
    def ended(self) -> bool:
        return self._ended

    async def _follow(self) -> None:
        try:
            async for record in self.ledger.follow(self.room, after=self.seq):
                self.seq = record.seq
                for listener in list(self._record_listeners):
                    listener(record)
                async with self._changed:
                    self._changed.notify_all()
        except Exception as exc:
            self.error = exc
        finally:
            self._ended = True
            for ended in list(self._end_listeners):
                ended(self.error)
            async with self._changed:
                self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds or the follow has ended; returns ``predicate()``.
        Raises :class:`TimeoutError` when neither happens within ``timeout`` seconds."""

        async def settled() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: self._ended or predicate())

        await asyncio.wait_for(settled(), timeout)
        return predicate()

    async def catch_up(self, timeout: float) -> bool:
        """Wait until every record the room had when asked was handed out (or the follow ended);
        returns whether it was. Raises :class:`TimeoutError` past ``timeout`` seconds."""
        head = await self.ledger.room_last_seq(self.room)
        return await self.wait_for(lambda: self.seq >= head, timeout)

    async def close(self) -> None:
        """Stop following. A failure stays in :attr:`error`; nothing is raised here."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
