"""``ledger export``: conversations as JSON Lines (see :mod:`room_ledger.export` for the shapes)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import msgspec
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from room_ledger.cli.common import (
    CliError,
    Point,
    console,
    err_console,
    format_duration,
    parse_point,
    write_json,
)
from room_ledger.client import Ledger
from room_ledger.export import ExportStats, RoomSelection, Shape, export_conversations, select_rooms
from room_ledger.settings import Settings

_encoder = msgspec.json.Encoder()


def _time_of(point: Point | None, option: str) -> Any:
    if point is None:
        return None
    if point.time is None:
        raise CliError(f"{option} takes a time here (an ISO time or 5m, 2h), not a sequence")
    return point.time


def selection(room: str | None, prefix: str | None, since: str | None, until: str | None) -> RoomSelection:
    if room is not None and prefix is not None:
        raise CliError("give a room or --prefix, not both")
    return RoomSelection(
        room=room, prefix=prefix,
        since=_time_of(parse_point(since, "--since") if since else None, "--since"),
        until=_time_of(parse_point(until, "--until") if until else None, "--until"),
    )


@contextlib.contextmanager
def _output(out: Path | None) -> Iterator[IO[bytes]]:
    if out is None:
        yield sys.stdout.buffer
        return
    partial = out.with_name(out.name + ".partial")
    with partial.open("wb") as handle:
        yield handle
    # Only a finished export takes the name: an interrupted one leaves FILE.partial.
    partial.replace(out)


async def export(
    settings: Settings, chosen: RoomSelection, *, shape: Shape, bare: bool, out: Path | None, as_json: bool,
) -> None:
    if as_json and out is None:
        raise CliError("--json prints the summary on stdout: write the conversations with --out FILE")
    started = time.perf_counter()
    stats = ExportStats()
    show_progress = err_console.is_terminal and (out is not None or not sys.stdout.isatty())
    async with Ledger(settings, name="ledger-export") as ledger:
        rooms = await select_rooms(ledger, chosen)
        if chosen.room is not None and not rooms:
            await ledger.require_room(chosen.room)
        with _output(out) as sink, _progress(show_progress, len(rooms)) as advance:
            async for conversation in export_conversations(ledger, rooms, stats=stats):
                sink.write(_encoder.encode(conversation.to_builtins(shape=shape, bare=bare)))
                sink.write(b"\n")
                advance(stats.rooms_seen)
            advance(stats.rooms_seen)
            sink.flush()
    took = time.perf_counter() - started
    summary = {
        "rooms": len(rooms),
        "rooms_exported": stats.rooms_exported,
        "rooms_without_conversation": stats.rooms_without_conversation,
        "agent_to_agent_rooms": stats.agent_to_agent_rooms,
        "conversations": stats.conversations,
        "turns": stats.turns,
        "failed": stats.failed,
        "shape": shape,
        "out": str(out) if out is not None else None,
        "seconds": round(took, 3),
    }
    if as_json:
        write_json(summary)
        return
    if out is not None:
        console.print(
            f"{stats.conversations:,} conversation(s), {stats.turns:,} turns from {stats.rooms_exported:,} of "
            f"{len(rooms):,} room(s) -> {out} ({shape}) in {format_duration(took)}"
        )
    for room, why in stats.failed.items():
        err_console.print(f"room {room!r} not exported: {why}")


@contextlib.contextmanager
def _progress(show: bool, total: int) -> Iterator[Any]:
    if not show:
        yield lambda done: None
        return

    with Progress(TextColumn("[bold]export[/] rooms"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
                  TimeRemainingColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task("rooms", total=total)
        yield lambda done: bar.update(task, completed=done)
