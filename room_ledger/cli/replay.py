"""``ledger replay``: a room's history as a timeline, NDJSON, a state at a point, floor lanes, handoffs.

Everything here streams: records are read in order from an ordered consumer and printed (or
folded) one at a time, so a room of any size replays in constant memory and the first line
appears as soon as the first message arrives. Views that need state (``--at``, ``--floor``,
``--html``) fold with the core's reducers and trackers (:mod:`room_ledger.timeline`), the same code every
other reader uses.
"""

from __future__ import annotations

import sys
from typing import IO, Any

import msgspec

from room_ledger.cli.common import CliError
from room_ledger.client import Ledger
from room_ledger.state import RoomState, apply_safely
from room_ledger.timeline import (
    CONVERSATION_WINDOW,
    FloorTimeline,
    FloorTracker,
    HandoffRow,
    HandoffTracker,
    RejectionTracker,
    trim_conversation,
    write_ndjson,
)
from room_ledger.window import Point
from room_ledger.window import Window as Window
from room_ledger.window import records as records

# --- NDJSON ---------------------------------------------------------------------------------


def _binary_stdout() -> IO[bytes]:
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:
        raise CliError("stdout takes no bytes here; NDJSON needs a binary-capable stdout")
    out: IO[bytes] = buffer
    return out


async def replay_ndjson(
    ledger: Ledger, room: str, window: Window, *, follow: bool = False, out: IO[bytes] | None = None
) -> int:
    """Write the room's events as NDJSON (to stdout by default); returns how many.

    Output is buffered, and flushed at the first line (so it shows at once) and, when following,
    after every line.
    """
    out = out if out is not None else _binary_stdout()
    marks = await rejection_tracker(ledger, room, window)
    return await write_ndjson(records(ledger, room, window, follow=follow), out, follow=follow, rejections=marks)


async def rejection_tracker(ledger: Ledger, room: str, window: Window) -> RejectionTracker:
    """What marks the writes the fold rejected among the records of ``window``.

    A window from the room's first event feeds it every record as it is shown (nothing more is
    read); a window showing part of the room reads the fence's inputs of the whole room first.
    Following with a filter, later records the filter hides are not folded: a rejection that
    depends on one of them is not marked.
    """
    tracker = RejectionTracker()
    if window.since is not None or window.types or window.senders:
        await tracker.read_ahead(ledger, room, window.until.seq if window.until is not None else None)
    return tracker


# --- state at a point ---------------------------------------------------------------------------


async def fold_room(
    ledger: Ledger, room: str, until: Point | None = None, *, keep_items: int = CONVERSATION_WINDOW
) -> Any:
    """The room's state folded with the projections' reducers up to ``until`` (inclusive)."""
    state = RoomState(room=room)
    async for record in records(ledger, room, Window(until=until)):
        apply_safely(state, record)
        trim_conversation(state, keep_items)
    if until is not None and state.seq == 0:
        raise CliError(f"room {room!r} has no events at or before {until.describe()}")
    return state


def state_to_builtins(state: Any, *, last_items: int | None = None) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(state)
    for bookkeeping in ("feeds", "user_feed", "transcribers"):
        data.pop(bookkeeping, None)
    data["seq"] = state.seq
    if last_items is not None:
        data["conversation"] = data["conversation"][-last_items:]
    return data


# --- floor timeline -----------------------------------------------------------------------------


async def floor_timeline(ledger: Ledger, room: str, until: Point | None = None) -> FloorTimeline:
    """Fold the room and note every change of holder or queue (who held the floor when)."""
    tracker = FloorTracker(room)
    async for record in records(ledger, room, Window(until=until)):
        tracker.feed(record)
    return tracker.finish()


# --- handoffs -----------------------------------------------------------------------------------


async def handoffs(ledger: Ledger, room: str, window: Window = Window()) -> list[HandoffRow]:
    """The room's handoffs (all of the log is read: a handoff's dead air needs what came before)."""
    tracker = HandoffTracker()
    async for record in records(ledger, room, Window(until=window.until)):
        tracker.feed(record)
    since = window.since
    return tracker.finish(since.seq if since else None, since.time if since else None)
