"""Decode LiveKit Agents' ``lk.agent.session`` feed (protobuf ``AgentSessionMessage``).

The primary AgentSession of a job broadcasts its events as byte streams (marked experimental
upstream). We keep: conversation items (messages, function calls and outputs, handoffs, config
updates) with their ids and timestamps, agent state changes, and the steps of tool runs
(``tool_execution_updated``, and ``function_tools_started`` should a session send it) as
``tool.execution``: the feed puts a function call in the conversation only with its output, so
this is the only trace of a call cut off before it returned.

The other session events are returned as :class:`Other` and recorded as untyped ``data`` (their
JSON whole, the kind in ``attributes["event"]``); no reader folds them into state:

- ``user_state_changed``: the caller's VAD; ``room_ledger.timeline``'s speech lanes read it from
  ``data`` already (in logs of every age), so a new type would give it two shapes to read;
- ``user_input_transcribed``: interim and final transcripts of the caller, whose final words
  reach the log as the feed's user message (and as ``transcript`` without a feed);
- ``session_usage_updated``, ``eot_prediction``, ``overlapping_speech``,
  ``agent_false_interruption``, ``amd_prediction``, ``error``, ``debug_message``: metrics and
  diagnostics, shown by ``ledger replay`` as they came.

A ``tool_execution_updated`` that names no step, or no call, is one of them too, with the reason.
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
_CALL_STATUSES = {pb.TC_RUNNING: "running", pb.TC_DONE: "done", pb.TC_ERROR: "error", pb.TC_CANCELLED: "cancelled"}
_REPLY_STATUSES = {pb.TR_SCHEDULED: "scheduled", pb.TR_COMPLETED: "completed", pb.TR_INTERRUPTED: "interrupted",
                   pb.TR_SKIPPED: "skipped"}
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
    #: Why an event of a kind we type was not typed ("" for the kinds we keep untyped).
    reason: str = ""


def _as_json(message: Any) -> dict[str, Any]:
    # Fields at their default printed too: an enum's first value (US_SPEAKING, AS_INITIALIZING) is its
    # default, which a plain MessageToDict leaves out, so {"old_state": "US_LISTENING"} meant
    # "now speaking" without saying so.
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _tool_started(call: pb.FunctionCall, created: float | None, at: datetime | None) -> FeedItem:
    body = ev.ToolExecution(stage="started", call_id=call.call_id, item_id=call.id, name=call.name,
                            arguments=call.arguments, created_at=_ts(call.created_at) or created)
    return FeedItem(body, at, f"tool:started:{call.call_id}")


def _tool_execution(updated: pb.AgentSessionEvent.ToolExecutionUpdated, created: float | None,
                    at: datetime | None) -> FeedItem | Other:
    """One step of a tool's run; a step with no call to name it by stays untyped, with the reason."""
    step = updated.WhichOneof("update")
    if step == "started" and updated.started.function_call.call_id:
        return _tool_started(updated.started.function_call, created, at)
    if step == "call_updated" and updated.call_updated.call_id:
        u = updated.call_updated
        body = ev.ToolExecution(stage="updated", call_id=u.call_id, item_id=u.id, message=u.message,
                                created_at=created)
        return FeedItem(body, at, f"tool:updated:{u.call_id}:{u.id}")
    if step == "ended" and updated.ended.call_id:
        e = updated.ended
        body = ev.ToolExecution(stage="ended", call_id=e.call_id, item_id=e.id,
                                message=e.message if e.HasField("message") else None,
                                status=_CALL_STATUSES.get(e.status, "unknown"), created_at=created)
        return FeedItem(body, at, f"tool:ended:{e.call_id}")
    if step == "reply_updated" and updated.reply_updated.speech_id:
        r = updated.reply_updated
        status = _REPLY_STATUSES.get(r.status, "unknown")
        body = ev.ToolExecution(stage="reply", update_ids=list(r.update_ids), status=status, speech_id=r.speech_id,
                                created_at=created)
        return FeedItem(body, at, f"tool:reply:{r.speech_id}:{status}")
    missing = "speech" if step == "reply_updated" else "call"
    why = f"tool_execution_updated: {step} names no {missing}" if step else "tool_execution_updated: no step"
    return Other("tool_execution_updated", _as_json(updated), at, why)


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
    if which == "tool_execution_updated":
        return [_tool_execution(event.tool_execution_updated, created, at)]
    if which == "function_tools_started":
        # Not sent by LiveKit Agents 1.8's SessionHost (it sends tool_execution_updated), but in the
        # protocol: the same start, as a session that sends it means it.
        started: list[FeedItem | Other] = [_tool_started(call, created, at)
                                           for call in event.function_tools_started.function_calls if call.call_id]
        return started or [Other(which, _as_json(event.function_tools_started), at,
                                 "function_tools_started: no call with a call id")]
    return [Other(which, _as_json(getattr(event, which)), at)]
