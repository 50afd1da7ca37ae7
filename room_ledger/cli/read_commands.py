"""The commands that read a room or the room list: state, rooms, payload (``ledger <command>``'s work,
loaded when one of them runs)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import sys
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

import room_ledger.cli._nats_first  # noqa: F401 - first: nats-py without aiohttp (room_ledger/cli/_nats_first.py)
from room_ledger import db
from room_ledger import events as ev
from room_ledger.cli.common import (
    CliError,
    console,
    write_json,
)
from room_ledger.cli.replay import fold_room, state_to_builtins
from room_ledger.cli.views import render_state
from room_ledger.client import Ledger, Record
from room_ledger.hydrate import hydrate
from room_ledger.room_list import room_rows
from room_ledger.settings import Settings
from room_ledger.web.roomview import participant_views

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


