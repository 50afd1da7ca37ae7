"""An event in words: what it says in one line, when it happened, who sent it.

What every view of a room shows for an event (``ledger replay``'s timeline, the web view's
timeline and search), said once. Text from a room has its control characters neutralised here:
it reaches terminals and pages alike.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from room_ledger import events as ev
from room_ledger.settings import format_duration
from room_ledger.state import pointer_keys

if TYPE_CHECKING:
    from room_ledger.client import Record

_MAX_TEXT: Final = 240


def event_time(record: Record) -> datetime:
    """When it happened: at the source if known, else when observed, else when stored."""
    event = record.event
    when = event.at or event.observed_at or record.time
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


#: Control characters (C0, DEL, C1) from room data would drive the terminal: shown as U+FFFD instead.
_CONTROLS: Final = {c: "\ufffd" for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in "\t\n\r"}


def clip(text: str, limit: int = _MAX_TEXT) -> str:
    text = " ".join(text.split()).translate(_CONTROLS)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _compact(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return clip(text, limit)


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
            return f"{b.speaker}: “{clip(b.text)}”{partial}"
        case ev.ChatMessageEvent(body=b):
            who = b.identity or event.sender.identity or "?"
            return f"{who} (chat): “{clip(b.text)}”"
        case ev.ConversationItemEvent(body=b):
            return _conversation_summary(b)
        case ev.ToolExecutionEvent(body=b):
            return _tool_summary(b, event.sender.identity)
        case ev.HandoffEvent(body=b):
            reason = f": {b.reason}" if b.reason else ""
            return f"{b.from_agent} hands the caller to {b.to_agent}{reason}"
        case ev.SessionPatchEvent(body=b):
            return _patch_summary(b.patch, b.set_values)
        case ev.ContextSummaryEvent(body=b):
            return f"summary up to #{b.covers_seq}: {clip(b.text, 160)}"
        case ev.DataEvent(body=b):
            payload = (
                _compact(b.json, 100)
                if b.json is not None
                else clip(b.text, 100)
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


def _tool_summary(b: ev.ToolExecution, owner: str) -> str:
    """A step of a tool's run (``tool.execution``): its call id, so the call's items can be found."""
    call = f" [{b.call_id}]" if b.call_id else ""
    match b.stage:
        case "started":
            return f"{owner or '?'} starts {b.name or '?'}({clip(b.arguments or '', 80)}){call}"
        case "updated":
            return f"tool{call} reports: {clip(b.message or '', 100)}"
        case "ended":
            said = f" → {clip(b.message, 100)}" if b.message else ""
            return f"tool{call} ended: {b.status or '?'}{said}"
        case "reply":
            covers = ", ".join(b.update_ids[:4]) + (" …" if len(b.update_ids) > 4 else "")
            return f"tool reply {b.status or '?'} (speech {b.speech_id or '?'}; updates {covers or 'none'})"
    return f"tool{call} {b.stage or 'step'}"


def _conversation_summary(b: ev.ConversationItem) -> str:
    who = b.speaker or b.role or "?"
    match b.item_type:
        case "message":
            cut = " (interrupted)" if b.interrupted else ""
            return f"{b.role or 'message'} {who}: “{clip(b.text)}”{cut}"
        case "function_call":
            return f"{who} calls {b.name or '?'}({clip(b.arguments or '', 80)})"
        case "function_call_output":
            failed = " failed" if b.is_error else ""
            return f"{b.name or 'tool'}{failed} → {clip(b.output or '', 100)}"
        case "agent_handoff":
            return f"agent {b.old_agent_id or '?'} → {b.new_agent_id or '?'}"
        case "agent_config_update":
            return f"agent config update{': ' + clip(b.text, 80) if b.text else ''}"
    return b.item_type


def sender_label(event: ev.Event) -> str:
    sender = event.sender
    if not sender.identity:
        return "-"
    identity = sender.identity.translate(_CONTROLS)
    return identity if sender.kind == "unknown" else f"{identity} ({sender.kind})"
