"""Terminal views of folded state: a room's state, the floor lanes, the handoff table, the room list."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from room_ledger.settings import format_duration
from room_ledger.timeline import FloorTimeline, HandoffRow
from room_ledger.web.roomview import participant_views
from room_ledger.words import clean

HOLD = "█"
QUEUED = "░"


def _t(when: datetime | None) -> str:
    return f"{when:%H:%M:%S.%f}"[:12] if when else "-"


def _value(value: Any, limit: int = 70) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = clean(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _s(value: Any) -> str:
    return clean(str(value)) if value is not None else ""


def render_state(console: Console, state: Any, *, title: str, last_items: int = 10) -> None:
    """Floor, participants, session, summary and the latest conversation items of a RoomState."""
    floor = state.floor
    head = Text()
    if floor.holder:
        head.append("floor: ", style="bold")
        head.append(_s(floor.holder), style="bold yellow")
        if floor.task:
            head.append(f" ({_s(floor.task)})")
        head.append(f" since #{floor.since_seq} {_t(floor.since_time)}", style="bright_black")
    else:
        head.append("floor: ", style="bold")
        head.append("free", style="green")
    if floor.queue:
        head.append("   queue: ", style="bold")
        head.append(", ".join(_s(c.agent_id) + (f" ({_s(c.task)})" if c.task else "") for c in floor.queue))
    roles = getattr(getattr(state, "state", state), "roles", None)  # a Snapshot or a RoomState
    if roles is not None and (roles.holders or roles.waiting):
        head.append("\nroles: ", style="bold")
        head.append(", ".join(f"{_s(role)} = {_s(h.agent_id)}" for role, h in sorted(roles.holders.items())))
        if roles.waiting:
            head.append("   waiting: ", style="bold")
            head.append(", ".join(f"{_s(w.agent_id)} ({'/'.join(_s(r) for r in w.roles)})" for w in roles.waiting))
    head.append(f"\nlast sequence #{state.seq}, {state.index.events} events", style="bright_black")
    if state.index.gaps:
        head.append(f", {len(state.index.gaps)} bridge gap(s)", style="bold red")
    if state.index.rejected:
        head.append(f", {state.index.rejected} write(s) rejected (superseded epoch; `ledger replay` marks them)",
                    style="bold red")

    people = Table(box=box.SIMPLE_HEAD, title="participants", title_justify="left", expand=False)
    for column in ("identity", "kind", "present", "agent state", "status", "task", "lock", "also sent"):
        people.add_column(column)

    for p in participant_views(state):
        people.add_row(
            _s(p.identity),
            _s(p.kind),
            Text("yes", style="green") if p.present else Text("no", style="bright_black"),
            _s(p.agent_state),
            _s(p.status),
            _s(p.task),
            Text("lock", style="yellow") if p.lock == "holds" else Text(p.lock or _s(p.note), style="bright_black"),
            # fields of the agent's last status packet beyond agent_id/status/action_lock/task
            _value(p.extra) if p.extra else "",
        )

    session = Table(box=box.SIMPLE_HEAD, title=f"session (version #{state.session_version}, "
                    f"{len(state.session)} fields)", title_justify="left")
    session.add_column("field")
    session.add_column("value", overflow="ellipsis", no_wrap=True)
    keys = sorted(state.session)
    for key in keys[:25]:
        session.add_row(_s(key), _value(state.session[key]))
    if len(keys) > 25:
        session.add_row(f"… {len(keys) - 25} more", "", style="bright_black")

    parts: list[Any] = [head, people, session]
    if state.summary is not None:
        parts.append(Text(f"summary (covers up to #{state.summary.covers_seq}): {_value(state.summary.text, 300)}"))
    convo = Table(box=box.SIMPLE_HEAD, title=f"latest conversation items ({len(state.conversation)} in view)",
                  title_justify="left")
    for column in ("#", "time", "who", "what"):
        convo.add_column(column, no_wrap=column != "what", overflow="ellipsis")
    for item in state.conversation[-last_items:]:
        who = item.speaker or item.role or ""
        if item.type == "message":
            what = item.text
        elif item.type == "function_call":
            what = f"calls {item.name}({item.arguments or ''})"
            if item.source == "tool.execution":  # only its start is in the log: running, or cut off
                what += " (started, no output yet)"
        elif item.type == "function_call_output":
            what = f"{item.name or 'tool'} → {item.output or ''}"
        elif item.type == "agent_handoff":
            what = f"agent {item.old_agent_id} → {item.new_agent_id}"
        else:
            what = item.type
        convo.add_row(str(item.seq), _t(item.time), _s(who), _value(what, 200))
    parts.append(convo)
    console.print(Panel(Group(*parts), title=Text(clean(title)), title_align="left", border_style="bright_black"))


def render_floor(console: Console, timeline: FloorTimeline) -> None:
    """A lane per agent over time: █ while it holds the floor, ░ while it waits in the queue."""
    agents = timeline.agents()
    if not agents or timeline.start is None or timeline.end is None:
        console.print(f"No floor activity in room {timeline.room!r} (no claims, no holders).")
        return
    label_width = min(24, max(len(a) for a in agents) + 1)
    width = max(20, min(console.width, 160) - label_width - 2)
    start, end = timeline.start, timeline.end
    total = max((end - start).total_seconds(), 1e-3)
    step = total / width

    def column(when: datetime) -> int:
        return min(width - 1, max(0, int((when - start).total_seconds() / step)))

    queued = timeline.queued_spans()
    console.print(Text(f"floor of room {timeline.room!r}: {_t(start)} → {_t(end)} "
                       f"({format_duration(total)}, #{timeline.first_seq}–#{timeline.last_seq})", style="bold"))
    for agent in agents:
        cells = [" "] * width
        for since, until in queued.get(agent, []):
            for i in range(column(since), column(until or end) + 1):
                cells[i] = QUEUED
        for tenure in timeline.tenures:
            if tenure.holder != agent:
                continue
            for i in range(column(tenure.start_time), column(tenure.end_time or end) + 1):
                cells[i] = HOLD
        line = Text(f"{_s(agent)[:label_width - 1]:<{label_width}}", style="bold")
        line.append("│")
        line.append("".join(cells), style="yellow")
        console.print(line, no_wrap=True, crop=True)
    axis = Text(" " * label_width + "└" + "─" * width, style="bright_black")
    console.print(axis, no_wrap=True, crop=True)
    labels = _t(start)
    right = _t(end)
    pad = max(1, width - len(labels) - len(right))
    console.print(Text(" " * (label_width + 1) + labels + " " * pad + right, style="bright_black"),
                  no_wrap=True, crop=True)
    console.print(Text(f"{HOLD} holds the floor   {QUEUED} waits in the queue", style="bright_black"))

    table = Table(box=box.SIMPLE_HEAD, title="who held the floor when", title_justify="left")
    for col in ("from #", "from", "to", "held", "holder", "task", "ended by"):
        table.add_column(col, no_wrap=True)
    for tenure in timeline.tenures:
        held = format_duration(((tenure.end_time or end) - tenure.start_time).total_seconds())
        table.add_row(
            str(tenure.start_seq),
            _t(tenure.start_time),
            _t(tenure.end_time) if tenure.end_time else "(holding)",
            held,
            Text(_s(tenure.holder), style="bold yellow"),
            _s(tenure.task),
            _s(tenure.end_reason),
        )
    console.print(table)
    now = Text("now: ", style="bold")
    now.append(_s(timeline.holder or "free"), style="bold yellow" if timeline.holder else "green")
    if timeline.queue:
        now.append("   queue: " + ", ".join(_s(a) for a in timeline.queue))
    console.print(now)


def render_handoffs(console: Console, rows: list[HandoffRow], room: str) -> None:
    if not rows:
        console.print(f"No handoffs in room {room!r}.")
        return
    table = Table(box=box.SIMPLE_HEAD, title=Text(f"handoffs in room {room!r}"), title_justify="left")
    for col in ("#", "time", "from", "to", "outcome", "reason", "last speech ended", "first speech", "dead air",
                "caller waited"):
        table.add_column(col, no_wrap=col not in ("reason",), overflow="ellipsis")
    for row in rows:
        outcome = Text(row.outcome, style={"ok": "green", "failed": "bold red"}.get(row.outcome, "bright_black"))
        reason = row.reason if row.outcome != "failed" else f"{row.reason or ''} — failed: {row.error}"
        table.add_row(
            str(row.seq),
            _t(row.time),
            _s(row.from_agent),
            _s(row.to_agent),
            outcome,
            _s(reason),
            _t(row.last_speech) + (f" #{row.last_speech_seq}" if row.last_speech_seq else ""),
            _t(row.first_speech) + (f" #{row.first_speech_seq}" if row.first_speech_seq else ""),
            _silence(row.dead_air_s),
            _silence(row.waited_s),
        )
    console.print(table)
    console.print(Text("dead air: from the end of the source's last speech to the start of the target's first; "
                       "caller waited: until anyone spoke (the target, a progress line or a failure notice)",
                       style="bright_black"))


def _silence(seconds: float | None) -> Text:
    if seconds is None:
        return Text("unknown", style="bright_black")
    style = "green" if seconds < 0.5 else "yellow" if seconds < 2 else "bold red"
    return Text(format_duration(seconds), style=style)
