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


async def sees(room: rtc.Room, *identities: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Wait until ``room`` lists every one of ``identities`` among its remote participants.

    livekit-server announces a participant to the others once its connection is up, and batches
    those updates: a participant that has just connected is not yet known to the rest.
    """
    changed = asyncio.Event()

    def on_change(*_: Any) -> None:
        changed.set()

    room.on("participant_connected", on_change)
    try:
        async with asyncio.timeout(timeout):
            while not set(identities) <= set(room.remote_participants):
                changed.clear()
                await changed.wait()
    finally:
        room.off("participant_connected", on_change)
