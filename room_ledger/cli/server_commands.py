"""The commands that run or check servers, or change what they hold: doctor, up, down, migrate,
project, rebuild, purge (``ledger <command>``'s work, loaded when one of them runs)."""

from __future__ import annotations

import asyncio
import difflib
from typing import Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

import room_ledger.cli._nats_first  # noqa: F401 - first: nats-py without aiohttp (room_ledger/cli/_nats_first.py)
from room_ledger import embedded
from room_ledger.cli.common import (
    CliError,
    console,
    err_console,
    format_duration,
    stop_on_signals,
    write_json,
)
from room_ledger.cli.doctor import diagnose, render_report
from room_ledger.cli.ops import projection_rows, room_event_count
from room_ledger.cli.up import up as run_up
from room_ledger.client import Ledger
from room_ledger.errors import UnknownRoom
from room_ledger.projections import migrate as migrate_module
from room_ledger.projections import projector as projector_module
from room_ledger.projections import rebuild as rebuild_module
from room_ledger.settings import Settings

# --- doctor, up, migrate ------------------------------------------------------------------------


async def doctor(settings: Settings, *, as_json: bool, monitor_url: str | None) -> None:
    report = await diagnose(settings, monitor_url=monitor_url)
    if as_json:
        write_json(report.to_builtins())
    else:
        render_report(console, report)
    if not report.ok:
        raise typer.Exit(1)


async def down(settings: Settings, *, as_json: bool) -> None:
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
    before = await migrate_module.current_revision(settings)
    await migrate_module.upgrade(settings)
    after = await migrate_module.current_revision(settings)
    if as_json:
        write_json({"from": before, "to": after, "changed": before != after})
    elif before == after:
        console.print(f"projection tables are up to date (revision {after})")
    else:
        console.print(f"migrated projection tables from {before or 'nothing'} to {after}")




async def project(
    settings: Settings, *, once: bool, as_json: bool, partition: int = 0, partitions: int = 1
) -> None:
    started = asyncio.get_running_loop().time()
    projector = projector_module.Projector(settings, partition=partition, partitions=partitions, tune_gc=True)
    try:
        if once:
            seq = await projector.catch_up(until=await _last_stored_seq(settings))
        else:
            stop = asyncio.Event()
            stop_on_signals(asyncio.get_running_loop(), stop)
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
    known = tuple(rebuild_module.PROJECTIONS)
    if projection not in known:
        raise CliError(f"no projection {projection!r}: expected one of {', '.join(known)}")
    if not yes and not await asyncio.to_thread(
        typer.confirm, f"Rebuild projection {projection!r} from the start of the log (swapped in when done)?"
    ):
        raise CliError("nothing rebuilt")
    started = asyncio.get_running_loop().time()
    if as_json:
        seq = await rebuild_module.rebuild(settings, projection=projection)
    else:
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

            seq = await rebuild_module.rebuild(settings, projection=projection, progress=progress)
    took = asyncio.get_running_loop().time() - started
    if as_json:
        write_json({"projection": projection, "seq": seq, "seconds": round(took, 3)})
    else:
        console.print(f"rebuilt projection {projection!r} up to sequence {seq} in {format_duration(took)}")


async def purge(settings: Settings, room: str, *, yes: bool, as_json: bool) -> None:
    async with Ledger(settings, name="ledger-purge") as ledger:
        events = await room_event_count(ledger, room)
        rows = await projection_rows(settings, room, delete=False)
        if not events and not any((rows or {}).values()):
            names = await ledger.rooms.names()

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
