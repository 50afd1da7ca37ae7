"""What a room looks like to a person: one derivation shared by every view of a room.

``ledger replay --html`` (room_ledger/web/html.py), ``ledger state`` (room_ledger/cli/views.py) and ``ledger serve``
(room_ledger/web/serve.py) all show a room through this module, so they cannot disagree:

- :class:`RoomCollector` folds records in log order (the projections' reducers, as
  ``ledger replay --at`` does) and gathers the floor timeline, the handoffs with their dead
  air and the history of session patches; fed live, it is the web view's running state.
- :func:`participant_views` says what each participant is doing *now*. A status packet's
  ``action_lock`` is what the agent last claimed, not what it holds: after a handoff, or once the
  holder has left, the floor has passed on while the agent's last packet still says
  ``processing`` with the lock. A view shows a lock only when the floor says the agent holds it
  (or waits for it) and says why a claimed lock is no longer held.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from room_ledger import events as ev
from room_ledger.client import Ledger, Record
from room_ledger.state import pointer_keys
from room_ledger.timeline import (
    FloorTimeline,
    FloorTracker,
    HandoffRow,
    HandoffTracker,
    SpeechSpan,
    SpeechTracker,
    trim_conversation,
)
from room_ledger.window import Point, Window, records

#: Conversation items and session changes kept for a view (the latest ones).
MAX_ITEMS: Final = 2000
MAX_SESSION_CHANGES: Final = 1000

#: Why a tenure ended, in words (FloorTenure.end_reason).
_ENDED_BY: Final = {
    "handoff": "handed the caller off",
    "left": "left the room",
    "release": "released the floor",
    "resolved": "resolved",
    "idle": "went idle",
    "unlocked": "released the lock",
}


@dataclass
class SessionChange:
    seq: int
    time: datetime
    sender: str
    patch: dict[str, Any]
    #: JSON Pointer -> value set exactly (null included), after the patch.
    set_values: dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> list[str]:
        """The fields given a value (a null set exactly is a value), as dotted paths."""
        return [k for k, v in self.patch.items() if v is not None] + [
            ".".join(pointer_keys(p)) for p in self.set_values]

    @property
    def removed(self) -> list[str]:
        return [k for k, v in self.patch.items() if v is None]


@dataclass
class PageData:
    room: str
    floor: FloorTimeline
    handoffs: list[HandoffRow]
    state: Any
    session_changes: list[SessionChange] = field(default_factory=list)
    session_changes_total: int = 0
    conversation_total: int = 0
    #: Who spoke when (agents' playout, the caller's speech).
    speech: list[SpeechSpan] = field(default_factory=list)


class RoomCollector:
    """Feed a room's records in log order; :meth:`page` gives what the views show at that point.

    Memory is bounded whatever the room's length: the latest conversation items and session
    changes are kept (with their totals), one entry per tenure, handoff and speaker.
    """

    def __init__(self, room: str) -> None:
        self.room = room
        self.floor = FloorTracker(room)
        self.handoffs = HandoffTracker()
        self.speech = SpeechTracker()
        self.changes: list[SessionChange] = []
        self.changes_total = 0
        self.dropped_items = 0

    @property
    def state(self) -> Any:
        return self.floor.state

    @property
    def seq(self) -> int:
        return int(self.floor.state.seq)

    def feed(self, record: Record) -> None:
        self.floor.feed(record)
        self.handoffs.feed(record)
        self.speech.feed(record)
        event = record.event
        if isinstance(event, ev.SessionPatchEvent):
            self.changes_total += 1
            self.changes.append(SessionChange(record.seq, record.time, event.sender.identity, event.body.patch,
                                              event.body.set_values))
            if len(self.changes) > MAX_SESSION_CHANGES * 2:
                del self.changes[: len(self.changes) - MAX_SESSION_CHANGES]
        self.dropped_items += trim_conversation(self.floor.state, MAX_ITEMS)

    def page(self) -> PageData:
        """The view now. Feeding may go on afterwards (the web view calls this as the room goes)."""
        timeline = self.floor.finish()
        self.dropped_items += trim_conversation(self.floor.state, MAX_ITEMS, slack=1)
        state = self.floor.state
        return PageData(self.room, timeline, list(self.handoffs.finish()), state,
                        self.changes[-MAX_SESSION_CHANGES:], self.changes_total,
                        self.dropped_items + len(state.conversation),
                        self.speech.finish(timeline.end))


async def collect(ledger: Ledger, room: str, until: Point | None = None) -> PageData:
    """The room folded up to ``until`` (inclusive; None: its last event), as the views show it."""
    collector = RoomCollector(room)
    async for record in records(ledger, room, Window(until=until)):
        collector.feed(record)
    return collector.page()


# --- participants -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ParticipantView:
    identity: str
    kind: str
    present: bool
    agent_state: str | None
    #: The status as the agent last sent it, qualified when what it claimed no longer holds.
    status: str | None
    #: What the agent last sent, unchanged (processing, idle, resolved).
    status_sent: str | None
    task: str | None
    #: ``holds`` (the floor is its), ``queued`` (waits for it), or "" (neither).
    lock: str
    #: Why a lock the agent's last packet claimed is not held (e.g. "handed the caller off at #12").
    note: str
    extra: dict[str, Any]

    def to_builtins(self) -> dict[str, Any]:
        return {
            "identity": self.identity, "kind": self.kind, "present": self.present,
            "agent_state": self.agent_state, "status": self.status, "status_sent": self.status_sent,
            "task": self.task, "lock": self.lock, "note": self.note, "extra": self.extra,
        }


def _holds(floor: Any, p: Any) -> bool:
    if floor.holder is None:
        return False
    if p.identity == floor.holder:
        return True
    # The participant that made the claim under another agent id (its status lives under that id).
    return p.status is None and bool(floor.holder_identity) and p.identity == floor.holder_identity


def _last_tenure_end(floor: Any, agent: str) -> Any:
    for tenure in reversed(floor.history):
        if tenure.holder == agent:
            return tenure
    return None


def participant_view(state: Any, p: Any) -> ParticipantView:
    floor = state.floor
    holds = _holds(floor, p)
    queued = not holds and any(p.identity in (c.agent_id, c.identity) for c in floor.queue)
    lock = "holds" if holds else "queued" if queued else ""
    status = p.status
    note = ""
    if p.lock and not lock:
        tenure = _last_tenure_end(floor, p.identity)
        if tenure is not None and tenure.end_seq is not None:
            why = _ENDED_BY.get(tenure.end_reason or "", tenure.end_reason or "lost it")
            note = f"floor passed on: {why} at #{tenure.end_seq}"
        elif not p.present and p.left_seq is not None:
            note = f"left the room at #{p.left_seq}"
        else:
            note = "claims the lock but does not hold the floor"
        if status == "processing":
            status = "processing (no lock)"
    return ParticipantView(
        identity=p.identity, kind=p.kind, present=p.present, agent_state=p.agent_state, status=status,
        status_sent=p.status, task=p.task, lock=lock, note=note, extra=dict(p.status_extra),
    )


def participant_views(state: Any) -> list[ParticipantView]:
    """Every participant of a folded room state, present ones first, as the views show them."""
    return [
        participant_view(state, p)
        for p in sorted(state.participants.values(), key=lambda p: (not p.present, p.identity))
    ]


# --- conversation -----------------------------------------------------------------------------


def item_text(item: Any) -> str:
    """A conversation item in words."""
    if item.type == "message":
        return str(item.text)
    if item.type == "function_call":
        return f"calls {item.name}({item.arguments or ''})"
    if item.type == "function_call_output":
        return f"{item.name or 'tool'} → {item.output or ''}"
    if item.type == "agent_handoff":
        return f"agent {item.old_agent_id} → {item.new_agent_id}"
    return str(item.type)
