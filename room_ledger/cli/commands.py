"""The core function behind each command: one coroutine each, printing with rich or as JSON."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.table import Table
from rich.text import Text

import room_ledger.cli._nats_first  # noqa: F401 - first: nats-py without aiohttp (room_ledger/cli/_nats_first.py)
from room_ledger import events as ev
from room_ledger.cli.common import (
    CliError,
    Point,
    console,
    err_console,
    format_duration,
    parse_point,
    settings_from,
    write_json,
)
from room_ledger.client import Ledger, Record
from room_ledger.errors import UnknownRoom
from room_ledger.hydrate import hydrate
from room_ledger.settings import Settings


def settings() -> Settings:
    return settings_from()


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
    from room_ledger.cli import replay as core  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it

    window = core.Window(since=request.since, until=request.until, types=request.types, senders=request.senders)
    window.check()
    room = request.room
    async with Ledger(request.settings, name="ledger-replay") as ledger:
        if request.at is not None:
            state = await core.fold_room(ledger, room, request.at)
            if request.as_json:
                write_json(core.state_to_builtins(state, last_items=50))
            else:
                from room_ledger.cli.views import render_state  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it

                render_state(console, state, title=f"room {room!r} at {request.at.describe()} (#{state.seq})")
            return
        if request.floor:
            timeline = await core.floor_timeline(ledger, room, request.until)
            if request.as_json:
                write_json(timeline.to_builtins())
            else:
                from room_ledger.cli.views import render_floor  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it

                render_floor(console, timeline)
            return
        if request.handoffs:
            rows = await core.handoffs(ledger, room, window)
            if request.as_json:
                write_json([row.to_builtins() for row in rows])
            else:
                from room_ledger.cli.views import render_handoffs  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it

                render_handoffs(console, rows, room)
            return
        if request.html is not None:
            from room_ledger.web.html import write_page  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it

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
    from room_ledger.cli import replay as core  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it
    from room_ledger.cli.timeline import TimelinePrinter  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it

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
    from room_ledger import db  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it
    from room_ledger.cli.replay import fold_room  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it

    if db.running_url(ledger.settings) is not None:
        await ledger.require_room(room)
        snapshot = await hydrate(ledger, room, full_conversation=True)
        return snapshot.state
    return await fold_room(ledger, room, keep_items=5000)


async def state(settings: Settings, room: str, *, as_json: bool) -> None:
    from room_ledger.cli.replay import state_to_builtins  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it

    async with Ledger(settings, name="ledger-state") as ledger:
        snapshot = await _state_now(ledger, room)
    if as_json:
        from room_ledger.web.roomview import participant_views  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it

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
    from room_ledger.cli.views import render_state  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it

    render_state(console, snapshot, title=f"room {room!r} now (#{snapshot.seq})")


async def rooms(settings: Settings, *, as_json: bool) -> None:
    from room_ledger.cli.ops import room_rows  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it

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


async def purge(settings: Settings, room: str, *, yes: bool, as_json: bool) -> None:
    from room_ledger.cli.ops import projection_rows, room_event_count  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it

    async with Ledger(settings, name="ledger-purge") as ledger:
        events = await room_event_count(ledger, room)
        rows = await projection_rows(settings, room, delete=False)
        if not events and not any((rows or {}).values()):
            names = await ledger.rooms.names()
            import difflib  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it

            raise UnknownRoom(room, difflib.get_close_matches(room, names, n=3, cutoff=0.5))
        what = f"{events:,} events of room {room!r} from stream {settings.stream}"
        if rows:
            what += " and " + ", ".join(f"{n:,} {table}" for table, n in rows.items() if n) + " projection rows"
        if not yes and not await asyncio.to_thread(typer.confirm, f"Remove {what}? This cannot be undone"):
            raise CliError("nothing removed")
        purged = await ledger.rooms.purge(room)
        # After the events: an object is never left referenced by a remaining event.
        objects = await ledger.payloads.purge_room(room)
        removed = await projection_rows(settings, room, delete=True)
    result = {"room": room, "events_removed": purged, "payload_objects_removed": objects,
              "projection_rows_removed": removed or {}}
    if as_json:
        write_json(result)
    else:
        extra = f" and {sum((removed or {}).values()):,} projection rows" if removed else ""
        objs = f", {objects:,} payload objects" if objects else ""
        console.print(f"removed {purged:,} events{objs}{extra} of room {room!r}")


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


# --- doctor, up, migrate ------------------------------------------------------------------------


async def doctor(settings: Settings, *, as_json: bool, monitor_url: str | None) -> None:
    from room_ledger.cli.doctor import diagnose, render_report  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it

    report = await diagnose(settings, monitor_url=monitor_url)
    if as_json:
        write_json(report.to_builtins())
    else:
        render_report(console, report)
    if not report.ok:
        raise typer.Exit(1)


async def down(settings: Settings, *, as_json: bool) -> None:
    from room_ledger import embedded  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it

    home = settings.home
    before = embedded.status(home)
    stopped = {
        "nats": await asyncio.to_thread(embedded.stop_nats, home),
        "postgres": await asyncio.to_thread(embedded.stop_postgres, home),
    }
    if as_json:
        write_json({"home": str(home), "stopped": stopped,
                    "pids": {name: info.pid if info else None for name, info in before.items()}})
        return
    for name, was in stopped.items():
        info = before[name]
        if was:
            console.print(Text(name, style="bold") + Text(f" stopped (pid {info.pid if info else '?'})"))
        else:
            console.print(Text(name, style="bold") + Text(" was not running", style="bright_black"))
    console.print(f"embedded servers of {home} are down; data kept in {home}")


async def up(settings: Settings, *, as_json: bool, leave_running: bool) -> None:
    from room_ledger.cli.up import up as run_up  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it

    def ready(info: dict[str, Any]) -> None:
        if as_json:
            write_json({"event": "ready", **info})
            return
        for name in ("nats", "postgres"):
            if name in info:
                server = info[name]
                note = " (was already running)" if server["adopted"] else ""
                console.print(Text(name, style="bold green") + Text(f" {server['url']}  pid {server['pid']}{note}"))
        console.print(f"embedded servers of {info['home']} are up; Ctrl-C stops them")

    def event(message: str) -> None:
        if as_json:
            write_json({"event": "log", "message": message})
        else:
            console.print(message)

    result = await run_up(settings, on_ready=ready, on_event=event, leave_running=leave_running)
    if as_json:
        write_json({"event": "stopped", "restarts": result.get("restarts", 0)})
    else:
        console.print("stopped" if not leave_running else "left running")


async def migrate(settings: Settings, *, as_json: bool) -> None:
    from room_ledger.projections import migrate as migrate_module  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it
    before = await migrate_module.current_revision(settings)
    await migrate_module.upgrade(settings)
    after = await migrate_module.current_revision(settings)
    if as_json:
        write_json({"from": before, "to": after, "changed": before != after})
    elif before == after:
        console.print(f"projection tables are up to date (revision {after})")
    else:
        console.print(f"migrated projection tables from {before or 'nothing'} to {after}")


# --- demo, bridge, dispatch, projector ----------------------------------------------------------


async def demo(settings: Settings, *, keep: bool, as_json: bool) -> None:
    from room_ledger.cli.demo import run_demo  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it

    summary = await run_demo(settings, keep=keep, console=None if as_json else console)
    if as_json:
        write_json(summary)


async def bridge(settings: Settings, *, room: str | None, as_json: bool = False) -> None:
    from room_ledger.bridge import worker  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it
    stop = asyncio.Event()
    _stop_on_signals(stop)
    err_console.print(f"bridge running{' in room ' + repr(room) if room else ' (taking dispatches)'}; Ctrl-C stops it")
    agent_name = settings.bridge_agent_name

    def registered(worker_id: str) -> None:
        # The line people and scripts wait for before dispatching (no logging setup needed).
        err_console.print(f"bridge: registered as {agent_name!r} (worker {worker_id}); rooms can dispatch it now",
                          markup=False, highlight=False)
        if as_json:
            write_json({"event": "registered", "agent_name": agent_name, "worker_id": worker_id,
                             "at": datetime.now(UTC).isoformat()})

    counters = await worker.run_bridge(settings, room=room, stop=stop, on_registered=registered)
    err_console.print(f"bridge stopped: {counters.written:,} events written, {counters.duplicates:,} duplicates, "
                      f"{counters.gaps} gap(s)")
    if as_json:
        write_json({"event": "stopped", "written": counters.written, "duplicates": counters.duplicates,
                         "gaps": counters.gaps})


def _stop_on_signals(stop: asyncio.Event) -> None:
    import signal  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def dispatch(settings: Settings, room: str, *, agent_name: str | None, as_json: bool) -> None:
    from room_ledger.bridge import tokens  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it
    name = agent_name or settings.bridge_agent_name
    result = await tokens.create_dispatch(settings, room, agent_name=name)
    data = {"room": room, "agent_name": name, "dispatch_id": getattr(result, "id", "")}
    from room_ledger.cli.dispatches import record  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it

    # In the log too, so `ledger dispatches` can say who joined for it and how long it took.
    if warning := await record(settings, room, result, by="ledger dispatch"):
        err_console.print(f"warning: {warning}")
    if as_json:
        write_json(data)
    else:
        console.print(f"dispatched {name!r} into room {room!r} (dispatch {data['dispatch_id']})")


async def project(
    settings: Settings, *, once: bool, as_json: bool, partition: int = 0, partitions: int = 1
) -> None:
    from room_ledger.projections import projector as module  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it
    started = asyncio.get_running_loop().time()
    projector = module.Projector(settings, partition=partition, partitions=partitions, tune_gc=True)
    try:
        if once:
            seq = await projector.catch_up(until=await _last_stored_seq(settings))
        else:
            stop = asyncio.Event()
            _stop_on_signals(stop)
            err_console.print("projector running; Ctrl-C stops it")
            await projector.run(stop)
            seq = projector.checkpoint
    finally:
        await projector.close()
    took = asyncio.get_running_loop().time() - started
    if as_json:
        write_json({"checkpoint": seq, "events": projector.events_done, "seconds": round(took, 3)})
    else:
        console.print(f"projected to sequence {seq} ({projector.events_done:,} events in {format_duration(took)})")


async def _last_stored_seq(settings: Settings) -> int:
    """The sequence of the newest message still in the stream (0: none).

    After a purge of the newest room the stream's last sequence points past every stored
    message; catching up to it would wait for a message that will never come.
    """
    async with Ledger(settings, name="ledger-project") as ledger:
        return await ledger.head()


async def rebuild(settings: Settings, *, yes: bool, as_json: bool, projection: str = "rooms") -> None:
    from room_ledger.projections import rebuild as module  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it
    known = tuple(module.PROJECTIONS)
    if projection not in known:
        raise CliError(f"no projection {projection!r}: expected one of {', '.join(known)}")
    if not yes and not await asyncio.to_thread(
        typer.confirm, f"Rebuild projection {projection!r} from the start of the log (swapped in when done)?"
    ):
        raise CliError("nothing rebuilt")
    started = asyncio.get_running_loop().time()
    if as_json:
        seq = await module.rebuild(settings, projection=projection)
    else:
        from rich.progress import (  # noqa: PLC0415 - loaded when this command runs: `ledger` starts without it
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("[bold]rebuild[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=err_console, transient=False) as bar:
            task = bar.add_task(projection, total=None, rate="")

            def progress(done: int, total: int) -> None:
                elapsed = asyncio.get_running_loop().time() - started
                rate = f"{done / elapsed:,.0f} events/s" if elapsed > 0 and done else ""
                bar.update(task, completed=done, total=max(total, done) or None, rate=rate)

            seq = await module.rebuild(settings, projection=projection, progress=progress)
    took = asyncio.get_running_loop().time() - started
    if as_json:
        write_json({"projection": projection, "seq": seq, "seconds": round(took, 3)})
    else:
        console.print(f"rebuilt projection {projection!r} up to sequence {seq} in {format_duration(took)}")
