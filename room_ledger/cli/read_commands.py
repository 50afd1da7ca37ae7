"""The commands that read rooms: replay, state, rooms, payload (``ledger <command>``'s work,
loaded when one of them runs)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

import room_ledger.cli._nats_first  # noqa: F401 - first: nats-py without aiohttp (room_ledger/cli/_nats_first.py)
from room_ledger import db
from room_ledger import events as ev
from room_ledger.cli import replay as core
from room_ledger.cli.common import (
    CliError,
    Point,
    console,
    err_console,
    parse_point,
    settings_from,
    write_json,
)
from room_ledger.cli.replay import fold_room, state_to_builtins
from room_ledger.cli.timeline import TimelinePrinter
from room_ledger.cli.views import render_floor, render_handoffs, render_state
from room_ledger.client import Ledger, Record
from room_ledger.hydrate import hydrate
from room_ledger.room_list import room_rows
from room_ledger.settings import Settings
from room_ledger.web.html import write_page
from room_ledger.web.roomview import participant_views

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
                render_state(console, state, title=f"room {room!r} at {request.at.describe()} (#{state.seq})")
            return
        if request.floor:
            timeline = await core.floor_timeline(ledger, room, request.until)
            if request.as_json:
                write_json(timeline.to_builtins())
            else:
                render_floor(console, timeline)
            return
        if request.handoffs:
            rows = await core.handoffs(ledger, room, window)
            if request.as_json:
                write_json([row.to_builtins() for row in rows])
            else:
                render_handoffs(console, rows, room)
            return
        if request.html is not None:
            summary = await write_page(ledger, room, request.html, request.until)
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
    first = last = 0
    try:
        async for record in core.records(ledger, room, window, follow=follow):
            if not printer.count:
                first = record.seq
            last = record.seq
            printer.print(record)
    finally:
        if printer.count:
            gaps = f", {printer.gaps} bridge gap(s)" if printer.gaps else ""
            console.print(Text(f"{printer.count} events, #{first}–#{last}{gaps}", style="bright_black"))
    if not printer.count and not follow:
        console.print(f"No events of room {room!r} match these filters.")


# --- state, rooms, purge ------------------------------------------------------------------------


async def _state_now(ledger: Ledger, room: str) -> Any:
    """The projected state now: hydration (projection rows + the log after them) when available,
    else the log folded with the reducers."""

    if db.running_url(ledger.settings) is not None:
        await ledger.require_room(room)
        snapshot = await hydrate(ledger, room, full_conversation=True)
        return snapshot.state
    return await fold_room(ledger, room, keep_items=5000)


async def state(settings: Settings, room: str, *, as_json: bool) -> None:
    async with Ledger(settings, name="ledger-state") as ledger:
        snapshot = await _state_now(ledger, room)
    if as_json:
        data = state_to_builtins(snapshot)
        # A participant's lock is whether the floor is its now (as every view shows it); what its
        # last status packet claimed stays as lock_sent (issue 16.5).
        for view in participant_views(snapshot):
            entry = data["participants"].get(view.identity)
            if entry is not None:
                entry.update(lock_sent=entry.get("lock"), lock=view.lock == "holds", queued=view.lock == "queued",
                             note=view.note)
        write_json(data)
        return

    render_state(console, snapshot, title=f"room {room!r} now (#{snapshot.seq})")


async def rooms(settings: Settings, *, as_json: bool) -> None:
    async with Ledger(settings, name="ledger-rooms") as ledger:
        rows = await room_rows(ledger)
    if as_json:
        write_json([row.to_builtins() for row in rows])
        return
    if not rows:
        console.print(f"No rooms in stream {settings.stream!r} yet. Try `ledger demo --keep`.")
        return
    table = Table(box=box.SIMPLE_HEAD, title=f"{len(rows)} room(s) in stream {settings.stream}", title_justify="left")
    columns = ["room", "events", "first activity", "last activity", "present", "gaps"]
    server_view = any(row.server_events for row in rows)
    if server_view:  # `ledger webhooks` runs: what the server saw that the bridge did not
        columns.append("bridge missed")
    for col in columns:
        table.add_column(col, no_wrap=col not in ("present", "bridge missed"), overflow="ellipsis",
                         justify="right" if col in ("events", "gaps") else "left")
    for row in rows:
        present = ", ".join(row.participants[:6]) + (f" +{len(row.participants) - 6}" if len(row.participants) > 6
                                                      else "")
        table.add_row(
            row.room,
            f"{row.events:,}",
            f"{row.first_activity:%Y-%m-%d %H:%M:%S}" if row.first_activity else "",
            f"{row.last_activity:%Y-%m-%d %H:%M:%S}" if row.last_activity else "",
            present,
            Text(str(row.gaps), style="bold red") if row.gaps else Text("0", style="bright_black"),
            *([_missed_cell(row)] if server_view else []),
        )
    console.print(table)


def _missed_cell(row: Any) -> Text:
    if row.uncovered:
        return Text("the whole room (server started it; no bridge.joined)", style="bold red")
    if row.missed:
        return Text(", ".join(row.missed[:4]) + (f" +{len(row.missed) - 4}" if len(row.missed) > 4 else ""),
                    style="yellow")
    return Text("")


async def payload(settings: Settings, room: str, seq: int, *, out: Path | None, as_json: bool) -> None:
    """The exact bytes of one event's payload: from the Object Store when it lives there, else
    the JSON as sent (typed events), the text or the decoded base64 (data events)."""
    async with Ledger(settings, name="ledger-payload") as ledger:
        record = await _record_at(ledger, room, seq)
        event = record.event
        if isinstance(event, ev.OpaqueEvent):
            raise CliError(f"event #{seq} of room {room!r} is not readable by this version ({event.error or event.type})")
        ref = event.payload
        if as_json:
            info: dict[str, Any] = {"room": room, "seq": seq, "type": event.type, "id": event.id}
            if ref is not None:
                info.update({"object": ref.name, "bucket": settings.payload_bucket, "size": ref.size,
                             "sha256": ref.sha256, "form": ref.form})
            else:
                data = inline_payload(event)
                info.update({"object": None, "size": len(data) if data is not None else None,
                             "sha256": hashlib.sha256(data).hexdigest() if data is not None else None})
            write_json(info)
            return
        if ref is not None:
            # Streamed chunk by chunk (nats-py checks the digest): a 200 MB payload needs no 200 MB.
            if out is not None:
                handle = await asyncio.to_thread(out.open, "wb")
                try:
                    await ledger.payloads.read(ref, into=handle)
                finally:
                    handle.close()
            else:
                sys.stdout.flush()
                await ledger.payloads.read(ref, into=sys.stdout.buffer)
                sys.stdout.buffer.flush()
            return
        else:
            found = inline_payload(event)
            if found is None:
                raise CliError(f"event #{seq} ({event.type}) carries no payload of a packet or stream; "
                               f"`ledger replay {room} --json` shows its body")
            data = found
    if out is not None:
        await asyncio.to_thread(out.write_bytes, data)
        return
    sys.stdout.flush()
    stdout = sys.stdout.buffer
    stdout.write(data)
    stdout.flush()


def inline_payload(event: ev.KnownEvent) -> bytes | None:
    """An inline event's payload bytes: the JSON as sent, a data event's text or base64, a chat
    message's text; None for events not made from a payload."""
    if event.sent:
        return bytes(event.sent)
    body = event.body
    if isinstance(body, ev.Data):
        if body.payload_b64 is not None:
            return base64.b64decode(body.payload_b64)
        if body.text is not None:
            return body.text.encode("utf-8", "surrogatepass")
        return b"" if body.size == 0 and body.transport != "internal" else None
    if isinstance(body, ev.ChatMessage | ev.Transcript):
        return body.text.encode("utf-8", "surrogatepass")
    return None


async def _record_at(ledger: Ledger, room: str, seq: int) -> Record:
    """The room's event at stream sequence ``seq`` (its body loaded, when it lives in the bucket)."""
    async for record in ledger.read(room, after=seq - 1, until=seq):
        if record.seq == seq:
            return record
        break
    await ledger.require_room(room)
    raise CliError(f"room {room!r} has no event at sequence #{seq}: `ledger replay {room}` shows its sequences")


