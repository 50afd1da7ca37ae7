"""``ledger replay --html FILE``: a self-contained page to attach to a bug report.

One pass over the room's log folds the state (with the projections' reducers) and collects the
floor timeline, the handoffs and the session changes. The page has its CSS inline and draws the
floor as inline SVG: nothing is fetched when it is viewed.
"""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from room_ledger.client import Ledger
from room_ledger.settings import format_duration
from room_ledger.timeline import FloorTimeline, SpeechSpan
from room_ledger.web.roomview import PageData, collect, participant_views
from room_ledger.web.roomview import item_text as _item_text
from room_ledger.window import Point

_COLORS: Final = ["#e6a700", "#3b82f6", "#10b981", "#ef4444", "#8b5cf6", "#ec4899", "#14b8a6", "#f97316"]


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _t(when: datetime | None) -> str:
    return f"{when.astimezone(UTC):%H:%M:%S.%f}"[:12] if when else "–"


def floor_svg(timeline: FloorTimeline) -> str:
    agents = timeline.agents()
    if not agents or timeline.start is None or timeline.end is None:
        return '<p class="muted">No floor activity: nobody claimed the floor.</p>'
    start, end = timeline.start, timeline.end
    total = max((end - start).total_seconds(), 1e-3)
    label_w, lane_h, width = 160, 28, 1000
    plot_w = width - label_w - 20
    height = lane_h * len(agents) + 40

    def x(when: datetime) -> float:
        return label_w + plot_w * max(0.0, min(1.0, (when - start).total_seconds() / total))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="floor timeline" class="floor-svg">']
    queued = timeline.queued_spans()
    for i, agent in enumerate(agents):
        y = 10 + i * lane_h
        color = _COLORS[i % len(_COLORS)]
        parts.append(f'<text x="{label_w - 8}" y="{y + 18}" text-anchor="end" class="lane-label">{_e(agent)}</text>')
        parts.append(f'<line x1="{label_w}" y1="{y + lane_h - 2}" x2="{label_w + plot_w}" y2="{y + lane_h - 2}" '
                     'class="lane-line"/>')
        for since, until in queued.get(agent, []):
            x0, x1 = x(since), x(until or end)
            parts.append(f'<rect x="{x0:.1f}" y="{y + 8}" width="{max(x1 - x0, 1.5):.1f}" height="10" '
                         f'fill="{color}" opacity="0.25" class="queued"><title>{_e(agent)} waits in the queue '
                         f'{_t(since)} → {_t(until)}</title></rect>')
        for tenure in timeline.tenures:
            if tenure.holder != agent:
                continue
            x0, x1 = x(tenure.start_time), x(tenure.end_time or end)
            held = format_duration(((tenure.end_time or end) - tenure.start_time).total_seconds())
            parts.append(
                f'<rect x="{x0:.1f}" y="{y + 3}" width="{max(x1 - x0, 2):.1f}" height="20" rx="3" fill="{color}" '
                f'class="tenure" data-agent="{_e(agent)}"><title>{_e(agent)} holds the floor'
                f'{" (" + _e(tenure.task) + ")" if tenure.task else ""}: #{tenure.start_seq} {_t(tenure.start_time)}'
                f' for {held}{", ended by " + _e(tenure.end_reason) if tenure.end_reason else ""}</title></rect>'
            )
    axis_y = 10 + len(agents) * lane_h + 14
    for k in range(6):
        when_s = total * k / 5
        tx = label_w + plot_w * k / 5
        stamp = datetime.fromtimestamp(start.timestamp() + when_s, UTC)
        anchor = "start" if k == 0 else "end" if k == 5 else "middle"
        parts.append(f'<text x="{tx:.1f}" y="{axis_y}" text-anchor="{anchor}" class="tick">{_t(stamp)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def speech_svg(spans: list[SpeechSpan]) -> str:
    """Who spoke when: one lane per speaker, a bar per span of speech."""
    if not spans:
        return '<p class="muted">Nobody spoke (no agent speech, no caller speech in the log).</p>'
    speakers = list(dict.fromkeys(s.speaker for s in spans))
    start = min(s.start for s in spans)
    end = max(s.end for s in spans)
    total = max((end - start).total_seconds(), 1e-3)
    label_w, lane_h, width = 160, 24, 1000
    plot_w = width - label_w - 20
    height = lane_h * len(speakers) + 40

    def x(when: datetime) -> float:
        return label_w + plot_w * max(0.0, min(1.0, (when - start).total_seconds() / total))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="who spoke when" class="speech-svg">']
    for i, speaker in enumerate(speakers):
        y = 10 + i * lane_h
        color = _COLORS[i % len(_COLORS)]
        parts.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end" class="lane-label">{_e(speaker)}</text>')
        for span in spans:
            if span.speaker != speaker:
                continue
            x0, x1 = x(span.start), x(span.end)
            said = f": {_e(span.text)}" if span.text else ""
            parts.append(f'<rect x="{x0:.1f}" y="{y + 3}" width="{max(x1 - x0, 1.5):.1f}" height="16" rx="2" '
                         f'fill="{color}" class="speech" data-speaker="{_e(speaker)}"><title>{_e(speaker)} '
                         f'{_t(span.start)} → {_t(span.end)}{said}</title></rect>')
    axis_y = 10 + len(speakers) * lane_h + 14
    for k in range(6):
        tx = label_w + plot_w * k / 5
        stamp = datetime.fromtimestamp(start.timestamp() + total * k / 5, UTC)
        anchor = "start" if k == 0 else "end" if k == 5 else "middle"
        parts.append(f'<text x="{tx:.1f}" y="{axis_y}" text-anchor="{anchor}" class="tick">{_t(stamp)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(headers: list[str], rows: list[list[str]], *, id_: str, empty: str) -> str:
    if not rows:
        return f'<p class="muted" id="{id_}-empty">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table id="{id_}-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


_CSS: Final = """
:root { color-scheme: light dark; --muted: #6b7280; --line: #d1d5db; }
body { font: 14px/1.45 system-ui, -apple-system, Segoe UI, sans-serif; margin: 24px auto; max-width: 1100px;
       padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 32px; border-bottom: 1px solid
var(--line); padding-bottom: 4px; }
.muted { color: var(--muted); } table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-weight: 600; } td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
.floor-svg, .speech-svg { width: 100%; height: auto; } .lane-label { font-size: 13px; fill: currentColor; }
.tick { font-size: 11px; fill: #6b7280; } .lane-line { stroke: var(--line); stroke-width: 1; }
.pill { display: inline-block; padding: 0 6px; border-radius: 9px; font-size: 12px; background: #e5e7eb;
        color: #111; } .pill.yes { background: #bbf7d0; } .pill.hold { background: #fde68a; }
.gap { color: #b91c1c; font-weight: 600; } .dead-bad { color: #b91c1c; font-weight: 600; }
.role-user { color: #2563eb; } .role-assistant { color: #047857; } pre { white-space: pre-wrap;
font-size: 12px; background: rgba(127,127,127,.08); padding: 8px; border-radius: 6px; }
"""


def render(data: PageData, *, generated_at: datetime | None = None) -> str:
    state = data.state
    timeline = data.floor
    generated = (generated_at or datetime.now(UTC)).astimezone(UTC)
    index = state.index
    span = ""
    if timeline.start and timeline.end:
        span = (f"{timeline.start.astimezone(UTC):%Y-%m-%d %H:%M:%S} → {timeline.end.astimezone(UTC):%H:%M:%S} UTC "
                f"({format_duration((timeline.end - timeline.start).total_seconds())})")
    floor_now = (f'<span class="pill hold">{_e(state.floor.holder)}</span>'
                 + (f" ({_e(state.floor.task)})" if state.floor.task else "")) if state.floor.holder else "free"
    queue = ", ".join(_e(c.agent_id) for c in state.floor.queue) or "empty"

    tenures = [
        [f"#{t.start_seq}", _t(t.start_time), _t(t.end_time) if t.end_time else "holding",
         format_duration(((t.end_time or timeline.end or t.start_time) - t.start_time).total_seconds()),
         f"<b>{_e(t.holder)}</b>", _e(t.task), _e(t.end_reason)]
        for t in timeline.tenures
    ]
    handoff_rows = []
    for h in data.handoffs:
        dead = h.dead_air_s
        dead_cell = "unknown" if dead is None else (
            f'<span class="{"dead-bad" if dead >= 2 else ""}">{format_duration(dead)}</span>')
        handoff_rows.append([f"#{h.seq}", _t(h.time), _e(h.from_agent), _e(h.to_agent), _e(h.outcome),
                             _e(h.reason if h.outcome != "failed" else h.error), _t(h.last_speech),
                             _t(h.first_speech), dead_cell])
    people = [
        [_e(p.identity), _e(p.kind),
         '<span class="pill yes">present</span>' if p.present else '<span class="pill">left</span>',
         _e(p.agent_state), _e(p.status), _e(p.task),
         "🔒" if p.lock == "holds" else "queued" if p.lock == "queued" else f'<span class="muted">{_e(p.note)}</span>',
         _e(json.dumps(p.extra, ensure_ascii=False, default=str)) if p.extra else ""]
        for p in participant_views(state)
    ]
    convo = [
        [f"#{item.seq}", _t(item.time), f'<span class="role-{_e(item.role)}">{_e(item.role or item.type)}</span>',
         _e(item.speaker), _e(_item_text(item))]
        for item in state.conversation
    ]
    changes = [
        [f"#{c.seq}", _t(c.time), _e(c.sender),
         _e(", ".join(c.changed)), _e(", ".join(c.removed))]
        for c in data.session_changes
    ]
    gaps = [
        [f"#{g.seq}", _e(g.bridge_id), _t(g.started_at), _t(g.ended_at),
         format_duration((g.ended_at - g.started_at).total_seconds()), _e(g.reason)]
        for g in index.gaps
    ]
    omitted_items = data.conversation_total - len(state.conversation)
    omitted_changes = data.session_changes_total - len(data.session_changes)
    session_json = json.dumps(state.session, indent=2, ensure_ascii=False, sort_keys=True, default=str)

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="room-ledger">
<title>room {_e(data.room)} · ledger replay</title>
<style>{_CSS}</style></head>
<body>
<h1>Room <code id="room-name">{_e(data.room)}</code></h1>
<p class="muted" id="summary">{index.events} events, #{index.first_seq or 0}–#{index.last_seq} · {_e(span)} ·
generated {generated:%Y-%m-%d %H:%M:%S} UTC by <code>ledger replay --html</code></p>
<p>Floor now: <span id="floor-holder">{floor_now}</span> · queue: <span id="floor-queue">{queue}</span>
{f' · <span class="gap">{len(index.gaps)} bridge gap(s): events may be missing</span>' if index.gaps else ''}</p>

<section id="floor"><h2>Floor timeline</h2>
{floor_svg(timeline)}
{_table(["from", "start", "end", "held", "holder", "task", "ended by"], tenures, id_="tenures",
        empty="Nobody held the floor.")}
</section>

<section id="speech"><h2>Who spoke when</h2>
{speech_svg(data.speech)}
</section>

<section id="handoffs"><h2>Handoffs</h2>
{_table(["#", "time", "from", "to", "outcome", "reason", "last speech ended", "first speech", "dead air"], handoff_rows,
        id_="handoffs", empty="No handoffs.")}
</section>

<section id="participants"><h2>Participants</h2>
{_table(["identity", "kind", "present", "agent state", "status", "task", "lock", "also sent"], people, id_="participants",
        empty="No participants.")}
</section>

<section id="conversation"><h2>Conversation ({data.conversation_total} items)</h2>
{f'<p class="muted">The first {omitted_items} items are not shown.</p>' if omitted_items > 0 else ''}
{_table(["#", "time", "role", "speaker", "text"], convo, id_="conversation", empty="No conversation.")}
</section>

<section id="session"><h2>Session (version #{state.session_version}, {len(state.session)} fields)</h2>
<details><summary>Current session document</summary><pre id="session-doc">{_e(session_json)}</pre></details>
<h3>Changes ({data.session_changes_total})</h3>
{f'<p class="muted">The first {omitted_changes} changes are not shown.</p>' if omitted_changes > 0 else ''}
{_table(["#", "time", "by", "set", "removed"], changes, id_="session-changes", empty="No session changes.")}
</section>

<section id="gaps"><h2>Bridge gaps</h2>
{_table(["#", "bridge", "from", "to", "length", "reason"], gaps, id_="gaps", empty="No gaps.")}
</section>
</body></html>
"""


async def write_page(ledger: Ledger, room: str, path: Path, until: Point | None = None) -> dict[str, Any]:
    data = await collect(ledger, room, until)
    page = render(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return {
        "room": room,
        "file": str(path),
        "bytes": len(page.encode()),
        "events": data.state.index.events,
        "floor_holder": data.state.floor.holder,
        "handoffs": len(data.handoffs),
    }
