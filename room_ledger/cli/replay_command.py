"""``ledger replay``'s work: the timeline and NDJSON, and the views (``--at``, ``--floor``,
``--handoffs``, ``--html``), each view's renderer imported when that view is asked for."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.text import Text

import room_ledger.cli._nats_first  # noqa: F401 - first: nats-py without aiohttp (room_ledger/cli/_nats_first.py)
from room_ledger.cli import replay as core
from room_ledger.cli.common import (
    CliError,
    ImportedWhenUsed,
    Point,
    console,
    err_console,
    parse_point,
    settings_from,
    write_json,
)
from room_ledger.cli.timeline import TimelinePrinter
from room_ledger.client import Ledger
from room_ledger.settings import Settings

if TYPE_CHECKING:
    from room_ledger.cli import views
    from room_ledger.web import html
else:
    # The views' renderers (rich tables, the HTML page): a plain replay does without them.
    views = ImportedWhenUsed("room_ledger.cli.views")
    html = ImportedWhenUsed("room_ledger.web.html")


# --- replay -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayRequest:
    settings: Settings
    room: str
    since: Point | None
    until: Point | None
    types: tuple[str, ...]
    senders: tuple[str, ...]
    follow: bool
    as_json: bool
    at: Point | None
    floor: bool
    handoffs: bool
    html: Path | None


def replay_request(
    room: str,
    *,
    since: str | None,
    until: str | None,
    types: list[str],
    senders: list[str],
    follow: bool,
    as_json: bool,
    at: str | None,
    floor: bool,
    handoffs: bool,
    html: Path | None,
) -> ReplayRequest:
    """Check and parse replay's options (before connecting to anything)."""
    views = [name for name, on in (("--at", at is not None), ("--floor", floor), ("--handoffs", handoffs),
                                   ("--html", html is not None)) if on]
    if len(views) > 1:
        raise CliError(f"{' and '.join(views)} are different views: pick one")
    if views and follow:
        raise CliError(f"--follow prints the live timeline; it does not combine with {views[0]}")
    if at is not None and (since or types or senders):
        raise CliError("--at folds the whole room up to a point; it does not combine with --since, --type or --sender")
    if views and (types or senders):
        raise CliError(f"{views[0]} needs every event of the room; --type and --sender apply to the timeline only")
    if since and (floor or html is not None):
        raise CliError(f"{views[0]} draws the room from its first event; use --until to end it earlier")
    return ReplayRequest(
        settings=settings_from(),
        room=room,
        since=parse_point(since, "--since") if since else None,
        until=parse_point(until, "--until") if until else None,
        types=tuple(types),
        senders=tuple(senders),
        follow=follow,
        as_json=as_json,
        at=parse_point(at, "--at") if at is not None else None,
        floor=floor,
        handoffs=handoffs,
        html=html,
    )


async def replay(request: ReplayRequest) -> None:
    window = core.Window(since=request.since, until=request.until, types=request.types, senders=request.senders)
    window.check()
    room = request.room
    async with Ledger(request.settings, name="ledger-replay") as ledger:
        if request.at is not None:
            state = await core.fold_room(ledger, room, request.at)
            if request.as_json:
                write_json(core.state_to_builtins(state, last_items=50))
            else:
                views.render_state(console, state, title=f"room {room!r} at {request.at.describe()} (#{state.seq})")
            return
        if request.floor:
            timeline = await core.floor_timeline(ledger, room, request.until)
            if request.as_json:
                write_json(timeline.to_builtins())
            else:
                views.render_floor(console, timeline)
            return
        if request.handoffs:
            rows = await core.handoffs(ledger, room, window)
            if request.as_json:
                write_json([row.to_builtins() for row in rows])
            else:
                views.render_handoffs(console, rows, room)
            return
        if request.html is not None:
            summary = await html.write_page(ledger, room, request.html, request.until)
            if request.as_json:
                write_json(summary)
            else:
                console.print(f"wrote {summary['file']} ({summary['bytes']:,} bytes, {summary['events']} events); "
                              "open it in any browser, it needs no network")
            return
        if request.follow and not await ledger.room_last_seq(room):
            err_console.print(f"room {room!r} has no events yet; waiting for its first (Ctrl-C ends)")
        if request.as_json:
            await core.replay_ndjson(ledger, room, window, follow=request.follow)
            return
        await _timeline(ledger, room, window, follow=request.follow)


async def _timeline(ledger: Ledger, room: str, window: Any, *, follow: bool) -> None:
    printer = TimelinePrinter(console)
    marks = await core.rejection_tracker(ledger, room, window)
    first = last = 0
    try:
        async for record in core.records(ledger, room, window, follow=follow):
            if not printer.count:
                first = record.seq
            last = record.seq
            printer.print(record, marks.feed(record))
    finally:
        if printer.count:
            gaps = f", {printer.gaps} bridge gap(s)" if printer.gaps else ""
            rejected = f", {printer.rejected} rejected (superseded epoch)" if printer.rejected else ""
            console.print(Text(f"{printer.count} events, #{first}–#{last}{gaps}{rejected}", style="bright_black"))
    if not printer.count and not follow:
        console.print(f"No events of room {room!r} match these filters.")


