"""``ledger dispatches <room>``: the room's agent dispatches beside what the log shows (see :mod:`room_ledger.dispatches`)."""

from __future__ import annotations

from typing import Any

from livekit import api
from rich import box
from rich.table import Table
from rich.text import Text

from room_ledger.bridge.tokens import livekit_api
from room_ledger.cli.common import console, format_duration, write_json
from room_ledger.client import Ledger
from room_ledger.dispatches import DispatchView, dispatch_view, record_dispatch
from room_ledger.settings import Settings


async def server_dispatches(settings: Settings, room: str) -> tuple[list[Any] | None, str]:
    """The server's list for the room, or None and why it could not be read."""
    if not settings.livekit_url or not settings.livekit_api_key or not settings.livekit_api_secret:
        return None, "LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET unset: the log's view only"


    lkapi = livekit_api(settings)
    try:
        return list(await lkapi.agent_dispatch.list_dispatch(room)), ""
    except api.TwirpError as exc:
        if exc.code == api.TwirpErrorCode.NOT_FOUND:
            return [], "the server does not know the room (finished, never created, or the server restarted)"
        return None, f"the server refused ListDispatch: {exc.message} ({exc.code})"
    except OSError as exc:
        return None, f"cannot reach LiveKit at {settings.livekit_url}: {exc}"
    finally:
        await lkapi.aclose()


async def dispatches(settings: Settings, room: str, *, as_json: bool) -> None:
    listed, note = await server_dispatches(settings, room)
    async with Ledger(settings, name="ledger-dispatches") as ledger:
        view = await dispatch_view(ledger, room, listed, bridge_agent_name=settings.bridge_agent_name,
                                   server_note=note)
        if not view.dispatches and not view.unexplained and listed is None:
            await ledger.require_room(room)
    if as_json:
        write_json(view.to_builtins())
        return
    show(view)


def show(view: DispatchView) -> None:
    if view.server_note:
        console.print(Text(view.server_note, style="yellow"))
    if not view.dispatches and not view.unexplained:
        console.print(f"No dispatches and no agents in room {view.room!r}.")
        return
    table = Table(box=box.SIMPLE_HEAD, title=f"dispatches of room {view.room}", title_justify="left")
    for col in ("dispatch", "agent name", "created", "server", "log", "joined", "after"):
        table.add_column(col, justify="right" if col == "after" else "left", overflow="fold")
    for row in view.dispatches:
        joined = row.joined
        table.add_row(
            row.dispatch_id,
            Text("(automatic dispatch)", style="bright_black") if row.automatic else Text(row.agent_name),
            f"{row.created_at:%H:%M:%S.%f}"[:-3] if row.created_at else "",
            "listed" if row.on_server else Text("gone", style="bright_black"),
            f"#{row.logged_seq} {row.created_by}" if row.logged_seq is not None else "",
            Text(f"{joined.identity} #{joined.seq}") if joined is not None else (
                Text("") if row.automatic else Text("nobody joined", style="bold red")),
            format_duration(row.after_s) if row.after_s is not None else "",
        )
    console.print(table)
    for join in view.unexplained:
        console.print(f"joined with no dispatch listed or logged: {join.identity} (agent name {join.agent_name!r}) "
                      f"#{join.seq} at {join.at:%H:%M:%S}")


async def record(settings: Settings, room: str, dispatch: Any, *, by: str) -> str:
    """Record a dispatch just created; returns a warning ("" when recorded)."""
    try:
        async with Ledger(settings, name="ledger-dispatch") as ledger:
            await record_dispatch(ledger, room, dispatch, by=by)
    except Exception as exc:  # the dispatch exists either way: say so, do not fail the command
        return f"dispatch {dispatch.id} created but not recorded in the log: {exc}"
    return ""
