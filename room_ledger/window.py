"""Which of a room's records to read: points in its log, as people write them, and windows.

Every reader that a person points somewhere (``ledger replay --since/--until/--at``, the web
view's ``?at=``, ``ledger export``) parses and reads through here, so a point means the same
everywhere.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from room_ledger.errors import SettingsError
from room_ledger.settings import parse_duration

if TYPE_CHECKING:
    from room_ledger.client import Ledger, Record


@dataclass(frozen=True)
class Point:
    """A point in a room's log: a stream sequence or a wall-clock time (UTC)."""

    seq: int | None = None
    time: datetime | None = None

    def describe(self) -> str:
        if self.seq is not None:
            return f"sequence {self.seq}"
        assert self.time is not None
        return self.time.isoformat(timespec="milliseconds")


_RELATIVE_RE = re.compile(r"^\s*\d+(?:\.\d+)?\s*(ms|s|m|h|d|w)\s*$")


def parse_point(value: str, option: str, *, now: datetime | None = None) -> Point:
    """``120`` (sequence), ``2024-05-01T10:00:00Z`` (ISO time), ``5m`` (that long ago)."""
    text = value.strip()
    if re.fullmatch(r"\d+", text):
        seq = int(text)
        if seq < 1:
            raise SettingsError(f"{option} {value!r}: sequences start at 1")
        return Point(seq=seq)
    if _RELATIVE_RE.match(text):
        seconds = parse_duration(text, option)
        return Point(time=(now or datetime.now(UTC)) - timedelta(seconds=seconds))
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        parsed = None
    if parsed is None:
        raise SettingsError(
            f"{option} {value!r} is not a position: expected a sequence (120), an ISO time "
            "(2024-05-01T10:00:00Z) or a relative time (90s, 5m, 2h, 1d)"
        )
    if parsed.tzinfo is None:
        parsed = parsed.astimezone()  # a naive time is the user's local time
    return Point(time=parsed.astimezone(UTC))


@dataclass(frozen=True)
class Window:
    """Which of a room's records to read."""

    since: Point | None = None
    until: Point | None = None
    types: tuple[str, ...] = ()
    senders: tuple[str, ...] = ()

    def read_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self.since is not None:
            if self.since.seq is not None:
                args["after"] = self.since.seq - 1
            else:
                args["since_time"] = self.since.time
        if self.until is not None and self.until.seq is not None:
            args["until"] = self.until.seq
        if self.types:
            args["types"] = list(self.types)
        return args

    def check(self) -> None:
        if (
            self.since is not None
            and self.until is not None
            and self.since.seq is not None
            and self.until.seq is not None
            and self.until.seq < self.since.seq
        ):
            raise SettingsError(f"--until {self.until.seq} is before --since {self.since.seq}")
        if (
            self.since is not None
            and self.until is not None
            and self.since.time is not None
            and self.until.time is not None
            and self.until.time < self.since.time
        ):
            raise SettingsError(f"--until {self.until.describe()} is before --since {self.since.describe()}")


async def records(
    ledger: Ledger, room: str, window: Window = Window(), *, follow: bool = False
) -> AsyncIterator[Record]:
    """The room's records in the window, in log order (after checking the room exists)."""
    window.check()
    if not follow:
        await ledger.require_room(room)
    until_time: datetime | None = window.until.time if window.until is not None else None
    senders = list(window.senders)
    async for record in ledger.read(room, follow=follow, **window.read_args()):
        if until_time is not None and record.time > until_time:
            return
        if senders and not any(fnmatch.fnmatchcase(record.event.sender.identity, p) for p in senders):
            continue
        yield record
