"""Decode LiveKit Agents' ``lk.agent.session`` feed (protobuf ``AgentSessionMessage``).

The primary AgentSession of a job broadcasts its events as byte streams (marked experimental
upstream). We keep: conversation items (messages, function calls and outputs, handoffs, config
updates) with their ids and timestamps, and agent state changes. Other session events (user
state, usage, metrics …) are returned as :class:`Other` and recorded as untyped ``data``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError
from livekit.protocol.agent_pb import agent_session as pb

from room_ledger import events as ev

_ROLES = {pb.DEVELOPER: "developer", pb.SYSTEM: "system", pb.USER: "user", pb.ASSISTANT: "assistant"}
_STATES = {
    pb.AS_INITIALIZING: "initializing",
    pb.AS_IDLE: "idle",
    pb.AS_LISTENING: "listening",
    pb.AS_THINKING: "thinking",
    pb.AS_SPEAKING: "speaking",
}


@dataclass(frozen=True)
class FeedItem:
    body: ev.Body
    #: Time at the source, from the session event's ``created_at``.
    at: datetime | None
    #: A stable key for events without an id of their own (state changes).
    key: str


def _ts(value: Any) -> float | None:
    if value is None or (value.seconds == 0 and value.nanos == 0):
        return None
    return float(value.seconds) + float(value.nanos) / 1e9


def _dt(seconds: float | None) -> datetime | None:
    if seconds is None:
        return None
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (ValueError, OverflowError, OSError):
        return None


def _item(chat_item: pb.ChatContext.ChatItem) -> ev.ConversationItem | None:
    which = chat_item.WhichOneof("item")
    if which == "message":
        m = chat_item.message
        return ev.ConversationItem(
            item_id=m.id, item_type="message", role=_ROLES.get(m.role, "user"),
            text="\n".join(c.text for c in m.content if c.text), interrupted=m.interrupted,
            created_at=_ts(m.created_at),
        )
    if which == "function_call":
        f = chat_item.function_call
        return ev.ConversationItem(item_id=f.id or f"call:{f.call_id}", item_type="function_call", name=f.name,
                                   call_id=f.call_id, arguments=f.arguments, created_at=_ts(f.created_at))
    if which == "function_call_output":
        o = chat_item.function_call_output
        return ev.ConversationItem(item_id=o.id or f"output:{o.call_id}", item_type="function_call_output",
                                   name=o.name, call_id=o.call_id, output=o.output, is_error=o.is_error,
                                   created_at=_ts(o.created_at))
    if which == "agent_handoff":
        h = chat_item.agent_handoff
        return ev.ConversationItem(item_id=h.id, item_type="agent_handoff", old_agent_id=h.old_agent_id or None,
                                   new_agent_id=h.new_agent_id or None, created_at=_ts(h.created_at))
    if which == "agent_config_update":
        c = chat_item.agent_config_update
        return ev.ConversationItem(item_id=c.id, item_type="agent_config_update", text=c.instructions,
                                   created_at=_ts(c.created_at))
    return None


@dataclass(frozen=True)
class Other:
    """A session event we keep untyped: its kind and its JSON form."""

    kind: str
    json: dict[str, Any]
    at: datetime | None


def decode(raw: bytes) -> list[FeedItem | Other] | None:
    """The items of one message; None when it is not an ``AgentSessionMessage`` event."""
    msg = pb.AgentSessionMessage()
    try:
        msg.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError):
        return None
    if msg.WhichOneof("message") != "event":
        return None
    event = msg.event
    which = event.WhichOneof("event")
    if which is None:
        return None
    created = _ts(event.created_at)
    at = _dt(created)
    stamp = f"{event.created_at.seconds}.{event.created_at.nanos:09d}"
    if which == "conversation_item_added":
        item = _item(event.conversation_item_added.item)
        if item is None:
            return None
        return [FeedItem(item, _dt(item.created_at) or at, f"item:{item.item_id}")]
    if which == "agent_state_changed":
        change = event.agent_state_changed
        state = _STATES.get(change.new_state, "unknown")
        old = _STATES.get(change.old_state)
        return [FeedItem(ev.AgentState(identity="", state=state, old_state=old), at, f"state:{stamp}:{state}")]
    if which == "function_tools_executed":
        executed = event.function_tools_executed
        items: list[FeedItem | Other] = []
        for f in executed.function_calls:
            body = ev.ConversationItem(item_id=f.id or f"call:{f.call_id}", item_type="function_call", name=f.name,
                                       call_id=f.call_id, arguments=f.arguments, created_at=_ts(f.created_at) or created)
            items.append(FeedItem(body, at, f"item:{body.item_id}"))
        for o in executed.function_call_outputs:
            body = ev.ConversationItem(item_id=o.id or f"output:{o.call_id}", item_type="function_call_output",
                                       name=o.name, call_id=o.call_id, output=o.output, is_error=o.is_error,
                                       created_at=_ts(o.created_at) or created)
            items.append(FeedItem(body, at, f"item:{body.item_id}"))
        return items
    # Fields at their default printed too: an enum's first value (US_SPEAKING, AS_INITIALIZING) is its
    # default, which a plain MessageToDict leaves out, so {"old_state": "US_LISTENING"} meant
    # "now speaking" without saying so.
    return [Other(which, MessageToDict(getattr(event, which), preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True), at)]
