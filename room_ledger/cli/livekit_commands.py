"""The commands that join LiveKit: demo, bridge, dispatch (``ledger <command>``'s work, loaded
when one of them runs)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from room_ledger.bridge import tokens, worker
from room_ledger.cli.common import console, err_console, stop_on_signals, write_json
from room_ledger.cli.demo import run_demo
from room_ledger.cli.dispatches import record
from room_ledger.settings import Settings

# --- demo, bridge, dispatch, projector ----------------------------------------------------------


async def demo(settings: Settings, *, keep: bool, as_json: bool) -> None:
    summary = await run_demo(settings, keep=keep, console=None if as_json else console)
    if as_json:
        write_json(summary)


async def bridge(settings: Settings, *, room: str | None, as_json: bool = False) -> None:
    stop = asyncio.Event()
    stop_on_signals(asyncio.get_running_loop(), stop)
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


async def dispatch(settings: Settings, room: str, *, agent_name: str | None, as_json: bool) -> None:
    name = agent_name or settings.bridge_agent_name
    result = await tokens.create_dispatch(settings, room, agent_name=name)
    data = {"room": room, "agent_name": name, "dispatch_id": getattr(result, "id", "")}

    # In the log too, so `ledger dispatches` can say who joined for it and how long it took.
    if warning := await record(settings, room, result, by="ledger dispatch"):
        err_console.print(f"warning: {warning}")
    if as_json:
        write_json(data)
    else:
        console.print(f"dispatched {name!r} into room {room!r} (dispatch {data['dispatch_id']})")


