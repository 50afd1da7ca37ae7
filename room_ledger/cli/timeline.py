"""One readable line per event: time, sequence, sender, type, and what happened.

``summary(event)`` says in a few words what an event means (a transcript shows its speaker and
text; floor and status changes say who and what). ``TimelinePrinter`` prints records as they come,
colours them by type, and makes gaps stand out: a ``bridge.gap`` event in red, and a quiet spell
longer than a minute as a separator line.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from typing import Any, Final

from rich.cells import cell_len, set_cell_size
from rich.console import Console
from rich.style import Style
from rich.text import Text

from room_ledger import events as ev
from room_ledger.cli.common import format_duration
from room_ledger.client import Record
from room_ledger.state import pointer_keys

#: Style of each event category (the first segment of its type).
CATEGORY_STYLES: Final[dict[str, str]] = {
    "participant": "cyan",
    "room": "cyan",
    "agent": "magenta",
    "floor": "bold yellow",
    "transcript": "green",
    "chat": "bright_green",
    "conversation": "blue",
    "handoff": "bold bright_magenta",
    "session": "bright_blue",
    "context": "bright_black",
    "data": "bright_black",
    "bridge": "red",
}
GAP_STYLE: Final = "bold white on red"
#: A quiet spell longer than this between two shown events gets a separator line.
QUIET_GAP_S: Final = 60.0
_MAX_TEXT: Final = 240


def category_style(event_type: str) -> str:
    if event_type == "bridge.gap":
        return GAP_STYLE
    return CATEGORY_STYLES.get(event_type.split(".", 1)[0], "white")


def event_time(record: Record) -> datetime:
    """When it happened: at the source if known, else when observed, else when stored."""
    event = record.event
    when = event.at or event.observed_at or record.time
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


#: Control characters (C0, DEL, C1) from room data would drive the terminal: shown as U+FFFD instead.
_CONTROLS: Final = {c: "\ufffd" for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in "\t\n\r"}


def _clip(text: str, limit: int = _MAX_TEXT) -> str:
    text = " ".join(text.split()).translate(_CONTROLS)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _compact(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return _clip(text, limit)


def _patch_summary(patch: dict[str, Any], exact: dict[str, Any] | None = None) -> str:
    removed = [k for k, v in patch.items() if v is None]
    changed = [(k, v) for k, v in patch.items() if v is not None]
    # Exact values by JSON Pointer ("/a/b"), shown by their path: "a.b=null".
    changed += [(".".join(pointer_keys(p)), v) for p, v in (exact or {}).items()]
    parts: list[str] = []
    shown = changed[:4]
    if shown:
        parts.append("set " + ", ".join(f"{k}={_compact(v, 40)}" for k, v in shown))
        if len(changed) > len(shown):
            parts[-1] += f" (+{len(changed) - len(shown)} more)"
    if removed:
        parts.append("removed " + ", ".join(removed[:6]) + (" …" if len(removed) > 6 else ""))
    return "; ".join(parts) or "empty patch"


def summary(event: ev.Event) -> str:
    """What the event says, in one line (control characters neutralised), with the fields the
    sender sent beyond the type's own and where a large payload is stored."""
    text = _summary(event)
    if not isinstance(event, ev.OpaqueEvent):
        if event.sent:
            extra = ev.extra_fields(event)
            extra.pop("id", None)  # the payload id: the event id derives from it
            if extra:
                text += " {" + ", ".join(f"{k}={_compact(v, 30)}" for k, v in list(extra.items())[:8]) + "}"
        if event.payload is not None:
            text += f" [payload {event.payload.size} bytes in object {event.payload.name}]"
    return text.translate(_CONTROLS)


def clean(text: str) -> str:
    """Text from a room, safe to print on a terminal."""
    return text.translate(_CONTROLS)


def _summary(event: ev.Event) -> str:
    match event:
        case ev.ParticipantJoinedEvent(body=b):
            extra = " (already there when the bridge joined)" if b.snapshot else ""
            name = f" “{b.name}”" if b.name and b.name != b.identity else ""
            return f"{b.identity}{name} joined as {b.kind}{extra}"
        case ev.ParticipantLeftEvent(body=b):
            return f"{b.identity} left" + (f" ({b.reason})" if b.reason else "")
        case ev.ParticipantAttributesEvent(body=b):
            changes = [f"{k}={_compact(v, 30)}" if v else f"{k} deleted" for k, v in b.changed.items()]
            return f"{b.identity}: " + (", ".join(changes[:5]) or "attributes updated")
        case ev.RoomMetadataEvent(body=b):
            return f"room metadata: {_compact(b.metadata, 120)}"
        case ev.AgentStateEvent(body=b):
            before = f"{b.old_state} → " if b.old_state else ""
            return f"{b.identity} {before}{b.state}"
        case ev.AgentStatusEvent(body=b):
            lock = ", holds the action lock" if b.action_lock else ""
            task = f" on {b.task}" if b.task else ""
            return f"{b.agent_id} is {b.status}{task}{lock}"
        case ev.FloorRequestEvent(body=b):
            return f"{b.agent_id} asks for the floor" + (f" to {b.task}" if b.task else "")
        case ev.FloorReleaseEvent(body=b):
            return f"{b.agent_id} releases the floor" + (f" ({b.reason})" if b.reason else "")
        case ev.TranscriptEvent(body=b):
            partial = "" if b.final else " (partial)"
            return f"{b.speaker}: “{_clip(b.text)}”{partial}"
        case ev.ChatMessageEvent(body=b):
            who = b.identity or event.sender.identity or "?"
            return f"{who} (chat): “{_clip(b.text)}”"
        case ev.ConversationItemEvent(body=b):
            return _conversation_summary(b)
        case ev.HandoffEvent(body=b):
            reason = f": {b.reason}" if b.reason else ""
            return f"{b.from_agent} hands the caller to {b.to_agent}{reason}"
        case ev.SessionPatchEvent(body=b):
            return _patch_summary(b.patch, b.set_values)
        case ev.ContextSummaryEvent(body=b):
            return f"summary up to #{b.covers_seq}: {_clip(b.text, 160)}"
        case ev.DataEvent(body=b):
            payload = (
                _compact(b.json, 100)
                if b.json is not None
                else _clip(b.text, 100)
                if b.text is not None
                else f"{b.size} bytes"
            )
            why = f" [not recorded as typed: {b.reason}]" if b.reason else ""
            return f"topic {b.topic or '(none)'} {b.transport}: {payload}{why}"
        case ev.BridgeJoinedEvent(body=b):
            return f"bridge {b.bridge_id} joined"
        case ev.BridgeGapEvent(body=b):
            span = format_duration((b.ended_at - b.started_at).total_seconds())
            reason = f" ({b.reason})" if b.reason else ""
            return (
                f"GAP of {span}: {b.started_at:%H:%M:%S} → {b.ended_at:%H:%M:%S}{reason}; "
                "events in it may be missing"
            )
        case ev.BridgeLeftEvent(body=b):
            return f"bridge {b.bridge_id} left" + (f" ({b.reason})" if b.reason else "")
        case ev.OpaqueEvent():
            return f"(type not known to this version, {len(event.raw)} bytes)"
    body = getattr(event, "body", None)
    if isinstance(body, ev.ServerEvent):
        return _server_summary(body)
    if isinstance(body, ev.RoleClaim):
        return f"{body.agent_id} claims a role: {'/'.join(body.roles)}"
    if isinstance(body, ev.RoleRelease):
        return f"{body.agent_id} releases " + (f"role {body.role}" if body.role else "its role")
    if isinstance(body, ev.DispatchCreated):
        return f"dispatch {body.dispatch_id} of agent {body.agent_name!r}" + (f" by {body.by}" if body.by else "")
    return ""


def _server_summary(b: ev.ServerEvent) -> str:
    """livekit-server's own report (``ledger webhooks``)."""
    text = "server: " + b.event.replace("_", " ")
    if b.identity:
        text += f" {b.identity} ({b.kind})"
    for label, value in (("track", b.track_sid), ("egress", b.egress_id), ("ingress", b.ingress_id)):
        if value:
            text += f" {label} {value}"
    return text


def _conversation_summary(b: ev.ConversationItem) -> str:
    who = b.speaker or b.role or "?"
    match b.item_type:
        case "message":
            cut = " (interrupted)" if b.interrupted else ""
            return f"{b.role or 'message'} {who}: “{_clip(b.text)}”{cut}"
        case "function_call":
            return f"{who} calls {b.name or '?'}({_clip(b.arguments or '', 80)})"
        case "function_call_output":
            failed = " failed" if b.is_error else ""
            return f"{b.name or 'tool'}{failed} → {_clip(b.output or '', 100)}"
        case "agent_handoff":
            return f"agent {b.old_agent_id or '?'} → {b.new_agent_id or '?'}"
        case "agent_config_update":
            return f"agent config update{': ' + _clip(b.text, 80) if b.text else ''}"
    return b.item_type


def sender_label(event: ev.Event) -> str:
    sender = event.sender
    if not sender.identity:
        return "-"
    identity = sender.identity.translate(_CONTROLS)
    return identity if sender.kind == "unknown" else f"{identity} ({sender.kind})"


class TimelinePrinter:
    """Print records as they come; keeps only the previous time (streams any number of events).

    Lines are composed directly (styles pre-rendered to ANSI once, cropped to the terminal's
    width), not laid out by rich one by one: a 100k-event room prints in seconds, not minutes.
    """

    def __init__(self, console: Console, *, quiet_gap_s: float = QUIET_GAP_S) -> None:
        self.console = console
        self.quiet_gap_s = quiet_gap_s
        self.count = 0
        self.gaps = 0
        self._last_time: datetime | None = None
        self._last_date: date | None = None
        self._styles: dict[str, tuple[str, str]] = {}
        self._color = console.color_system is not None and not console.no_color
        self._crop = console.is_terminal

    def _paint(self, text: str, style: str) -> str:
        if not self._color or not style:
            return text
        codes = self._styles.get(style)
        if codes is None:
            rendered = Style.parse(style).render("\0", color_system=self.console._color_system)
            before, _, after = rendered.partition("\0")
            codes = self._styles[style] = (before, after)
        return f"{codes[0]}{text}{codes[1]}"

    def compose(self, record: Record) -> str:
        """The record's line, with ANSI styles when the console has colour."""
        event = record.event
        name = ev.event_type(event)
        when = event_time(record)
        style = category_style(name)
        head = f"{when:%H:%M:%S.%f}"[:12] + f" {record.seq:>7} "
        sender = f"{_clip(sender_label(event), 28):<28} "
        kind = f"{clean(name):<22} "
        text = summary(event)
        if self._crop:
            room = self.console.width - len(head) - cell_len(sender) - len(kind)
            if cell_len(text) > room:
                text = set_cell_size(text, max(room - 1, 0)) + "…"
        return (
            self._paint(head, "bright_black")
            + self._paint(sender, "bold" if event.sender.kind == "agent" else "")
            + self._paint(kind, style)
            + self._paint(text, GAP_STYLE if name == "bridge.gap" else "")
        )

    def print(self, record: Record) -> None:
        when = event_time(record)
        local_date = when.date()
        if self._last_date != local_date:
            self.console.print(Text(f"── {local_date.isoformat()} (UTC) ──", style="bold bright_black"))
            self._last_date = local_date
        elif self._last_time is not None:
            quiet = (when - self._last_time).total_seconds()
            if quiet >= self.quiet_gap_s:
                self.console.print(
                    Text(f"   ┄┄ {format_duration(quiet)} with no events ┄┄", style="italic yellow")
                )
        self._last_time = when
        if ev.event_type(record.event) == "bridge.gap":
            self.gaps += 1
        self.console.file.write(self.compose(record) + "\n")
        self.count += 1
