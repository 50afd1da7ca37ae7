"""Await ``livekit.rtc.Room`` events with a timeout (room callbacks must be plain functions)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from livekit import rtc

DEFAULT_TIMEOUT = 10.0


class Events:
    """Queue a room's events of the given names, in the order the SDK emits them."""

    def __init__(self, room: rtc.Room, *names: str) -> None:
        self.queue: asyncio.Queue[tuple[str, tuple[Any, ...]]] = asyncio.Queue()
        for name in names:
            room.on(name, functools.partial(self._put, name))  # type: ignore[arg-type]

    def _put(self, name: str, *args: Any) -> None:
        self.queue.put_nowait((name, args))

    async def next(
        self,
        name: str,
        where: Callable[..., bool] = lambda *args: True,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> tuple[Any, ...]:
        """The arguments of the next ``name`` event matching ``where``; earlier ones are dropped."""
        async with asyncio.timeout(timeout):
            while True:
                got, args = await self.queue.get()
                if got == name and where(*args):
                    return args

    def pending(self) -> list[tuple[str, tuple[Any, ...]]]:
        """Events received and not consumed yet (without waiting)."""
        items = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items
