"""A room's log as it grows, for tests that wait on what the bridge recorded (never sleep)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from ledger.client import Ledger, Record


class FollowedLog:
    """Follows one room's log in the background; ``until`` waits for a condition on it."""

    def __init__(self, ledger: Ledger, room: str) -> None:
        self.records: list[Record] = []
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._follow(ledger, room))

    async def _follow(self, ledger: Ledger, room: str) -> None:
        async for record in ledger.follow(room):
            self.records.append(record)
            async with self._changed:
                self._changed.notify_all()

    async def until(self, predicate: Callable[[list[Record]], bool], timeout: float = 20.0) -> list[Record]:
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self.records))

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"log never matched; has {[r.type for r in self.records]}") from None
        return self.records

    def of(self, *types: str) -> list[Record]:
        return [r for r in self.records if r.type in types]

    def count(self, event_type: str) -> int:
        return sum(1 for r in self.records if r.type == event_type)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
