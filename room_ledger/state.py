"""Pure reducers: fold a room's events into its state. No I/O, no clock, no randomness.

Every reader uses exactly these functions: the Postgres projector, ``ledger replay --at``
and hydration's catch-up. So every reader computes the same floor holder, the same session
document and the same conversation from the same log::

    state = fold(records)            # records: ledger.client.Record, in log order
    state.apply(next_record)         # or apply(state, next_record)

Rules (the log is the only input; ties are broken by stream sequence)
---------------------------------------------------------------------
Floor (DESIGN.md): the earliest claim in log order (``floor.request``, or ``agent.status`` with
``action_lock=true`` and a status other than ``resolved``) takes a free floor; later claims queue in
log order; a claim by the holder only updates its task; a claim already queued is not queued twice.
The floor is released by ``floor.release``, ``agent.status`` with ``action_lock=false``,
``status=resolved``, or ``status=idle`` without an ``action_lock`` (an absent lock is not false:
``processing`` without one changes neither the lock nor the floor), a ``handoff`` from the holder to another agent, or the holder leaving the room
(``participant.left`` of the agent id, or of the identity that made the claim). On release the head
of the queue takes the floor at the releasing event's sequence. A release by a queued agent
withdraws its claim.

Conversation: items are keyed by item id; the first appearance fixes the position and sequence,
a later event with the same item id updates the content in place.

- ``conversation.item`` (the ``lk.agent.session`` feed) is canonical. Its sender identity is the
  *feed owner*. User messages are heard by every agent's session, so only one feed's user
  messages are kept: the first feed in log order that produced one, until that agent leaves
  (then the next feed that produces one). The agents' own items are always kept.
- ``transcript``: skipped when the transcriber (the sender) or the speaker already has a feed
  (the feed carries the same words). Otherwise one canonical transcriber per transcribed track
  (``track_id``, else the speaker): the first in log order, until it leaves; the others'
  segments are duplicates and are skipped. Role: ``assistant`` when the speaker is an agent.
- ``chat.message``: kept (role from the sender's kind), keyed by message id.
- Function calls are one item per call id, from the moment the tool starts. LiveKit Agents'
  feed puts a call in its conversation only with its output, once the tool has returned; the
  ``tool.execution`` step ``started`` puts the call there first: a ``function_call`` item (name,
  arguments, the feed owner as speaker) keyed ``call:<call id>``, the key the feed's own item of
  the call takes. A ``conversation.item`` of type ``function_call`` whose call id is known goes to
  the item already kept for it, whatever its own item id: the feed's item completes the started
  one in place (its content, the first appearance's place). A start of a call already kept (a
  start after the feed's item, a second bridge's copy) changes nothing. Other steps (progress,
  end, the deferred reply) add nothing to the conversation: the output is the feed's
  ``function_call_output`` item (``output:<call id>``), so a call and its output are there once
  each, in any order their events reach the log. A call whose output never came (its process
  died) stays without one: :func:`room_ledger.chat.chat_items` can close it for a resumed LLM.
  Only the last ``MAX_CALLS`` call ids are remembered.
- Echoes: an agent session repeats in its feed what it heard or said — a typed ``lk.chat``
  message becomes the session's user item, and an agent's first reply can reach the log as a
  transcript before its feed is known. A feed message item whose role and text equal a chat or
  transcript item kept before it, and not yet matched, is that item's echo: it replaces that item
  in place (the feed's content and the session's own timestamps, at the first item's id and
  position; later updates of the feed item go there too), so a message is in the conversation
  once. The two can also cross (the caller's chat and the agent's feed are different senders'
  packets): a chat or transcript item repeating a feed message kept before it, and not yet
  matched, is dropped, the feed's item standing for it. Only the last ``MAX_ECHOES`` chat and
  transcript items, and feed messages, are remembered.

Roles (:mod:`room_ledger.roles`): the floor's rule for a set of roles. A ``role.claim`` gets the first
role of its list nobody holds, else waits in log order; a role is freed by ``role.release`` or its
holder leaving, and goes to the earliest waiting claim that lists it.

Session: ``session.patch`` events applied in log order (an RFC 7386 merge patch, then values set
exactly at JSON Pointers, so a field can be null); ``session_version`` is the sequence of
the last patch. Summary: the latest ``context.summary`` in log order.

Ownership and the fence (:mod:`room_ledger.ownership`, issue 23): each agent id that owns a call
has an epoch, the sequence of the event that made it the owner. A ``handoff`` from A to B that
passes the floor makes B the owner at its sequence and supersedes A; the record of a failed
handoff (B back to A, reason ``handoff failed: …``) gives A the call back and supersedes B, if B
is the one that superseded A and has not passed the call on; an agent id's first floor claim
makes it an owner (its later claims grant nothing). ``session.patch``, ``floor.request``,
``floor.release`` and ``agent.status`` may carry the writer's ``epoch`` (and its agent id: a
patch names it in ``agent_id``); one whose epoch is older than its agent id's latest grant, or
than the handoff that superseded that agent, is rejected: it changes nothing but the index
(``index.rejected`` counts it) and ``ownership.rejected`` (the latest ``REJECTIONS_KEPT``, with
sequence, agent, type and reason). Ownership is per agent id: agents sharing a room without
handing off to each other never fence one another. A write without an epoch is never rejected.

Unknown event types are counted (``skipped_unknown``) and skipped. A record at or below the
state's last sequence is ignored, so applying the same records twice changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Final, Protocol, TypeAlias, TypeVar

import msgspec

from room_ledger import events as ev
from room_ledger import floor as floor_rules
from room_ledger import ownership as ownership_rules
from room_ledger import protocol
from room_ledger import roles as role_rules
from room_ledger.floor import FLOOR_HISTORY_KEPT, Floor, FloorClaim, FloorTenure
from room_ledger.ownership import REJECTIONS_KEPT, Owner, Ownership, Rejection
from room_ledger.roles import Roles
from room_ledger.room_model import (
    FED_EARLIER_S,
    FED_WINDOW_S,
    MAX_CALLS,
    MAX_ECHOES,
    SAME_SPEECH_S,
    ConversationItem,
    Echo,
    Gap,
    Participant,
    RoomIndex,
    Summary,
    text_digest,
)
from room_ledger.session_doc import (
    apply_session_patch,
    json_pointer,
    merge_patch,
    pointer_keys,
    set_at,
)

__all__ = [
    "FED_EARLIER_S",
    "FED_WINDOW_S",
    "FLOOR_HISTORY_KEPT",
    "MAX_CALLS",
    "MAX_ECHOES",
    "REJECTIONS_KEPT",
    "SAME_SPEECH_S",
    "ConversationItem",
    "Floor",
    "FloorClaim",
    "FloorTenure",
    "Gap",
    "Owner",
    "Ownership",
    "Participant",
    "Rejection",
    "RoomIndex",
    "RoomState",
    "Summary",
    "apply",
    "apply_safely",
    "apply_session_patch",
    "fold",
    "json_pointer",
    "merge_patch",
    "pointer_keys",
    "set_at",
]


class RecordLike(Protocol):
    """What a reducer needs of a read record (``room_ledger.client.Record`` fits)."""

    @property
    def seq(self) -> int: ...

    @property
    def time(self) -> datetime: ...

    @property
    def event(self) -> ev.Event: ...


# --- state ----------------------------------------------------------------------------------


class RoomState(msgspec.Struct, kw_only=True):
    """Everything the reducers know about one room. Mutable; change it only through :func:`apply`."""

    room: str = ""
    floor: Floor = msgspec.field(default_factory=Floor)
    participants: dict[str, Participant] = msgspec.field(default_factory=dict)
    session: dict[str, Any] = msgspec.field(default_factory=dict)
    #: Sequence of the last ``session.patch`` (0: never patched).
    session_version: int = 0
    conversation: list[ConversationItem] = msgspec.field(default_factory=list)
    summary: Summary | None = None
    metadata: str = ""
    index: RoomIndex = msgspec.field(default_factory=RoomIndex)
    skipped_unknown: int = 0
    # Bookkeeping for the conversation rules (part of the state so a fold can resume from it).
    #: Identities that publish an ``lk.agent.session`` feed.
    feeds: list[str] = msgspec.field(default_factory=list)
    #: The feed whose user messages are kept.
    user_feed: str | None = None
    #: Transcribed track (or speaker) -> its canonical transcriber.
    transcribers: dict[str, str] = msgspec.field(default_factory=dict)
    #: item id -> position in :attr:`conversation` (derived; not stored, rebuilt when out of step).
    positions: dict[str, int] = msgspec.field(default_factory=dict)
    #: Roles claimed by agents, decided by log order (``role.claim``; see :mod:`room_ledger.roles`).
    roles: Roles = msgspec.field(default_factory=Roles)
    #: Who owns the room's calls, by epoch, and the writes the fence rejected (:mod:`room_ledger.ownership`).
    ownership: Ownership = msgspec.field(default_factory=Ownership)
    #: Item id -> the last MAX_ECHOES chat and transcript items (oldest first), matched or not.
    echoes: dict[str, Echo] = msgspec.field(default_factory=dict)
    #: Feed item id -> the chat/transcript item it repeated (its later updates go there too).
    echoed: dict[str, Echo] = msgspec.field(default_factory=dict)
    #: Feed item id -> the last MAX_ECHOES feed messages that repeated no earlier item: a chat or
    #: transcript item reaching the log after the feed's copy of it matches one of these.
    fed: dict[str, Echo] = msgspec.field(default_factory=dict)
    #: track -> the last final transcript kept of it: several agents transcribing one caller
    #: publish on the caller's behalf, so their copies carry the same sender (see _on_transcript).
    last_heard: dict[str, Echo] = msgspec.field(default_factory=dict)
    #: Call id -> the item id its function call is kept under (the last MAX_CALLS calls).
    calls: dict[str, str] = msgspec.field(default_factory=dict)

    @property
    def seq(self) -> int:
        """The sequence of the last event folded in (0 when none)."""
        return self.index.last_seq

    def apply(self, record: RecordLike) -> None:
        apply(self, record)

    def agents(self) -> dict[str, Participant]:
        return {k: p for k, p in self.participants.items() if p.is_agent}

    def item_position(self, item_id: str) -> int | None:
        """Index of an item in :attr:`conversation`, or None."""
        if len(self.positions) != len(self.conversation):
            self.positions = {item.item_id: i for i, item in enumerate(self.conversation)}
        return self.positions.get(item_id)

    def forget_conversation(self) -> None:
        """Drop the in-memory items (the projector does so once they are written)."""
        self.conversation = []
        self.positions = {}


def fold(records: Iterable[RecordLike], state: RoomState | None = None) -> RoomState:
    """Fold records (one room's, in log order) into a state (a new one unless given).

    An event that makes a reducer raise is skipped (see :func:`apply_safely`), never fatal.
    """
    result = state if state is not None else RoomState()
    for record in records:
        apply_safely(result, record)
    return result


def apply_safely(state: RoomState, record: RecordLike) -> Exception | None:
    """:func:`apply`, but an exception is returned (and its sequence noted) instead of raised.

    Every reader skips a failing event the same way, so their states stay equal.
    """
    try:
        apply(state, record)
    except Exception as exc:
        if record.seq not in state.index.failed:
            state.index.failed.append(record.seq)
        return exc
    return None


# --- apply ----------------------------------------------------------------------------------

#: Status values that mean "not holding the floor any more".
_RELEASING_STATUS: Final = frozenset({"resolved"})


def apply(state: RoomState, record: RecordLike) -> None:
    """Fold one record into ``state``. Records at or below the state's sequence are ignored."""
    seq = record.seq
    index = state.index
    if seq <= index.last_seq:
        return
    event = record.event
    if not state.room:
        state.room = event.room
    name = ev.event_type(event)
    time = record.time
    if index.first_seq is None:
        index.first_seq = seq
    index.last_seq = seq
    index.last_activity = time
    index.events += 1
    index.counts[name] = index.counts.get(name, 0) + 1

    handler = _HANDLERS.get(type(event))
    if handler is None:
        state.skipped_unknown += 1
        return
    if type(event) in _OWNERSHIP_TYPES:
        _apply_owned(state, event, handler, seq, time)
        return
    handler(state, event, seq, time)


#: Types the fence checks or that may grant ownership (a set lookup keeps the hot path cheap).
_OWNERSHIP_TYPES: Final = ownership_rules.FENCED_TYPES | ownership_rules.GRANTING_TYPES


def _apply_owned(state: RoomState, event: Any, handler: _Handler, seq: int, time: datetime) -> None:
    """A write the fence may reject, or an event that may grant ownership (decided on the state
    before it: a handoff grants only if it passes the floor)."""
    ownership = state.ownership
    agent_id, epoch = ownership_rules.writer(event)
    reason = ownership_rules.stale_reason(ownership, agent_id, epoch)
    if reason is not None:
        assert agent_id is not None and epoch is not None
        state.index.rejected += 1
        ownership_rules.reject(ownership, Rejection(seq=seq, time=time, agent_id=agent_id,
                                                    kind=ev.event_type(event), epoch=epoch, reason=reason))
        return
    grant = ownership_rules.grant_of(ownership, state.floor.holder, event)
    handler(state, event, seq, time)
    if grant is not None:
        ownership_rules.take(ownership, grant, seq)


# --- participants ---------------------------------------------------------------------------


def _participant(state: RoomState, identity: str, kind: str | None = None) -> Participant:
    p = state.participants.get(identity)
    if p is None:
        p = Participant(identity=identity, kind=kind or "unknown")
        state.participants[identity] = p
    elif kind and kind != "unknown" and p.kind == "unknown":
        p.kind = kind
    return p


def _on_joined(state: RoomState, event: ev.ParticipantJoinedEvent, seq: int, time: datetime) -> None:
    body: ev.ParticipantJoined = event.body
    p = _participant(state, body.identity, body.kind)
    if body.kind != "unknown":
        p.kind = body.kind
    p.present = True
    p.sid = body.sid or p.sid
    p.name = body.name or p.name
    p.metadata = body.metadata or p.metadata
    if body.attributes:
        p.attributes = dict(body.attributes)
    if protocol.ATTR_AGENT_STATE in p.attributes:
        p.agent_state = p.attributes[protocol.ATTR_AGENT_STATE]
    if p.joined_seq is None or not body.snapshot or p.left_seq is not None:
        p.joined_seq = seq
    p.left_seq = None
    p.last_seq = seq


def _on_left(state: RoomState, event: ev.ParticipantLeftEvent, seq: int, time: datetime) -> None:
    body: ev.ParticipantLeft = event.body
    identity = body.identity
    p = _participant(state, identity)
    p.present = False
    p.left_seq = seq
    p.last_seq = seq
    floor = state.floor
    if floor.holder is not None and identity in (floor.holder, floor.holder_identity):
        floor_rules.release(state.floor, seq, time, "left")
    floor.queue = [c for c in floor.queue if identity not in (c.agent_id, c.identity)]
    if state.user_feed == identity:
        state.user_feed = None
    for track, transcriber in list(state.transcribers.items()):
        if transcriber == identity:
            del state.transcribers[track]
    role_rules.left(state.roles, identity, seq, time)


def _on_attributes(state: RoomState, event: ev.ParticipantAttributesEvent, seq: int, time: datetime) -> None:
    body: ev.ParticipantAttributes = event.body
    p = _participant(state, body.identity)
    if body.attributes:
        p.attributes = dict(body.attributes)
    else:
        for key, value in body.changed.items():
            if value == "":
                p.attributes.pop(key, None)
            else:
                p.attributes[key] = value
    if body.name is not None:
        p.name = body.name
    if body.metadata is not None:
        p.metadata = body.metadata
    if protocol.ATTR_AGENT_STATE in body.changed or protocol.ATTR_AGENT_STATE in body.attributes:
        p.agent_state = p.attributes.get(protocol.ATTR_AGENT_STATE) or None
    p.last_seq = seq


def _on_room_metadata(state: RoomState, event: ev.RoomMetadataEvent, seq: int, time: datetime) -> None:
    state.metadata = event.body.metadata


def _on_agent_state(state: RoomState, event: ev.AgentStateEvent, seq: int, time: datetime) -> None:
    body: ev.AgentState = event.body
    p = _participant(state, body.identity, "agent")
    p.agent_state = body.state
    p.last_seq = seq


# --- floor ----------------------------------------------------------------------------------


def _on_floor_request(state: RoomState, event: ev.FloorRequestEvent, seq: int, time: datetime) -> None:
    body: ev.FloorRequest = event.body
    floor_rules.claim(state.floor, body.agent_id, body.task, event.sender.identity, seq, time)


def _on_floor_release(state: RoomState, event: ev.FloorReleaseEvent, seq: int, time: datetime) -> None:
    body: ev.FloorRelease = event.body
    floor_rules.withdraw(state.floor, body.agent_id, seq, time, "release")


def _on_agent_status(state: RoomState, event: ev.AgentStatusEvent, seq: int, time: datetime) -> None:
    body: ev.AgentStatus = event.body
    p = _participant(state, body.agent_id, "agent")
    p.status = body.status
    p.task = body.task
    p.last_seq = seq
    # Fields the sender sent beyond the type's own (intent, confidence …), shown by state.
    p.status_extra = ev.extra_fields(event) if event.sent else {}
    lock = ev.status_lock(event)
    if body.status in _RELEASING_STATUS:
        p.lock = False
        floor_rules.withdraw(state.floor, body.agent_id, seq, time, "resolved")
    elif lock is None:
        # No action_lock in the packet: "processing" says nothing about the floor (the lock
        # and any claim stay as they were); "idle" means the agent is not acting: it releases.
        if body.status == "idle":
            p.lock = False
            floor_rules.withdraw(state.floor, body.agent_id, seq, time, "idle")
    elif lock:
        p.lock = True
        floor_rules.claim(state.floor, body.agent_id, body.task, event.sender.identity, seq, time)
    else:
        p.lock = False
        floor_rules.withdraw(state.floor, body.agent_id, seq, time, "unlocked")


def _on_handoff(state: RoomState, event: ev.HandoffEvent, seq: int, time: datetime) -> None:
    body: ev.Handoff = event.body
    if body.to_agent != body.from_agent and state.floor.holder == body.from_agent:
        floor_rules.release(state.floor, seq, time, "handoff")


# --- session, summary, gaps -----------------------------------------------------------------


def _on_session_patch(state: RoomState, event: ev.SessionPatchEvent, seq: int, time: datetime) -> None:
    state.session = apply_session_patch(state.session, event.body)
    state.session_version = seq


def _on_summary(state: RoomState, event: ev.ContextSummaryEvent, seq: int, time: datetime) -> None:
    body: ev.ContextSummary = event.body
    state.summary = Summary(
        text=body.text, covers_seq=body.covers_seq, seq=seq, time=time, author=event.sender.identity
    )


def _on_gap(state: RoomState, event: ev.BridgeGapEvent, seq: int, time: datetime) -> None:
    body: ev.BridgeGap = event.body
    state.index.gaps.append(
        Gap(seq=seq, bridge_id=body.bridge_id, started_at=body.started_at, ended_at=body.ended_at,
            reason=body.reason)
    )


def _on_role(state: RoomState, event: ev.RoleClaimEvent | ev.RoleReleaseEvent, seq: int, time: datetime) -> None:
    role_rules.apply_event(state.roles, event, seq, time)


def _ignore(state: RoomState, event: object, seq: int, time: datetime) -> None:
    """Known types with no state of their own (counted in the index only)."""


# --- conversation ---------------------------------------------------------------------------


def _remember_echo(state: RoomState, item: ConversationItem) -> None:
    """Remember a chat/transcript item a feed may repeat (by item id: the projector, which keeps
    no items in memory, cannot tell a new item from an update, so neither may this)."""
    old = state.echoes.get(item.item_id)
    if not item.text or not item.role or (old is not None and old.matched):
        return
    state.echoes[item.item_id] = Echo(role=item.role, digest=text_digest(item.text), item_id=item.item_id,
                                      speaker=item.speaker)
    if old is None and len(state.echoes) > MAX_ECHOES:
        del state.echoes[next(iter(state.echoes))]


def _remember_fed(state: RoomState, item: ConversationItem, arrived: datetime) -> None:
    """Remember a user's feed message that repeated no earlier item: its chat copy may come later."""
    if item.role != "user" or not item.text or item.item_id in state.fed:
        return
    state.fed[item.item_id] = Echo(role=item.role, digest=text_digest(item.text), item_id=item.item_id,
                                   at=arrived)
    if len(state.fed) > MAX_ECHOES:
        del state.fed[next(iter(state.fed))]


def _repeats_feed(state: RoomState, item: ConversationItem) -> bool:
    """Whether a chat/transcript item is the late copy of a user's feed message kept just before.

    The kept message keeps the speaker its arrival could tell (:func:`_user_speaker`): changing it
    now would make the projector, which has written it already, and a whole fold disagree."""
    if item.role != "user" or not item.text or not state.fed:
        return False
    digest = text_digest(item.text)
    fed = next((e for e in state.fed.values()
                if not e.matched and e.digest == digest and e.at is not None
                and -FED_EARLIER_S <= (item.time - e.at).total_seconds() <= FED_WINDOW_S), None)
    if fed is None:
        return False
    fed.matched = True
    return True


#: Participant kinds that are people, who speak the user's side of a conversation.
_HUMAN_KINDS: Final = frozenset({"standard", "sip"})


def _user_speaker(state: RoomState, claimed: str | None, owner: str) -> str | None:
    """Who said a user message an agent session's feed carries (the feed names no one).

    The feed's publisher is the agent, never the user: a speaker equal to it (what bridges before
    this rule wrote) or to any agent is not believed. Then the one person present in the room is
    the speaker; with several, or none, it is unknown until a chat or transcript copy names them.
    """
    if claimed and claimed != owner and not _is_agent(state, claimed):
        return claimed
    people = [p.identity for p in state.participants.values() if p.present and p.kind in _HUMAN_KINDS]
    return people[0] if len(people) == 1 else None


def _put_item(state: RoomState, item: ConversationItem, *, may_echo: bool = False) -> None:
    if may_echo:
        if item.item_id not in state.echoes and _repeats_feed(state, item):
            return  # the feed's copy, with the session's own timestamps, stands for it
        _remember_echo(state, item)
    position = state.item_position(item.item_id)
    if position is None:
        state.positions[item.item_id] = len(state.conversation)
        state.conversation.append(item)
        return
    old = state.conversation[position]
    # The first appearance fixes the place in the conversation.
    item.seq = old.seq
    item.time = old.time
    state.conversation[position] = item


def _is_agent(state: RoomState, identity: str | None) -> bool:
    if not identity:
        return False
    p = state.participants.get(identity)
    return p is not None and p.is_agent


def _on_conversation_item(state: RoomState, event: ev.ConversationItemEvent, seq: int, time: datetime) -> None:
    body: ev.ConversationItem = event.body
    owner = event.sender.identity or body.speaker or ""
    if owner and owner not in state.feeds:
        state.feeds.append(owner)
    role = body.role
    if body.item_type == "message" and role == "user":
        if state.user_feed is None:
            state.user_feed = owner
        elif state.user_feed != owner:
            return
    # An echo takes the place of the item it repeats: the feed's content (the session's own
    # timestamps, item type) at that item's id and position, so the message is there once.
    echo = state.echoed.get(body.item_id)
    if echo is None and body.item_type == "message" and body.text:
        digest = text_digest(body.text)
        echo = next((e for e in state.echoes.values()
                     if not e.matched and e.role == role and e.digest == digest), None)
        if echo is not None:
            echo.matched = True
            state.echoed[body.item_id] = echo
            if len(state.echoed) > 4 * MAX_ECHOES:
                del state.echoed[next(iter(state.echoed))]
    item_id = echo.item_id if echo is not None else body.item_id
    if body.item_type == "function_call" and body.call_id:
        item_id = _call_item_id(state, body.call_id, item_id)
    if body.item_type == "message" and role == "user":
        # The chat or transcript copy knows who spoke; the feed does not (its sender is the agent).
        speaker = echo.speaker if echo is not None and echo.speaker else _user_speaker(state, body.speaker, owner)
    else:
        speaker = body.speaker or (echo.speaker if echo is not None else None)
    if speaker is None and body.item_type == "message" and role == "assistant":
        speaker = owner or None
    item = ConversationItem(
        item_id=item_id,
        type=body.item_type,
        role=role,
        speaker=speaker,
        text=body.text,
        seq=seq,
        time=event.at or time,
        source="conversation.item",
        interrupted=body.interrupted,
        created_at=body.created_at,
        name=body.name,
        call_id=body.call_id,
        arguments=body.arguments,
        output=body.output,
        is_error=body.is_error,
        old_agent_id=body.old_agent_id,
        new_agent_id=body.new_agent_id,
    )
    # Remembered with this record's own time: _put_item gives an update its first appearance's
    # time, which the projector (holding no written items) cannot know; both must agree.
    arrived = item.time
    _put_item(state, item)
    if echo is None and body.item_type == "message":
        _remember_fed(state, item, arrived)


def _call_item_id(state: RoomState, call_id: str, item_id: str) -> str:
    """The item id a call's function call is kept under: the first one given for its call id."""
    kept = state.calls.get(call_id)
    if kept is not None:
        return kept
    state.calls[call_id] = item_id
    if len(state.calls) > MAX_CALLS:
        del state.calls[next(iter(state.calls))]
    return item_id


def _on_tool_execution(state: RoomState, event: ev.ToolExecutionEvent, seq: int, time: datetime) -> None:
    body: ev.ToolExecution = event.body
    if body.stage != "started" or not body.call_id or body.call_id in state.calls:
        return
    owner = event.sender.identity or None
    item_id = _call_item_id(state, body.call_id, f"call:{body.call_id}")
    _put_item(state, ConversationItem(
        item_id=item_id, type="function_call", speaker=owner, seq=seq, time=event.at or time,
        source="tool.execution", created_at=body.created_at, name=body.name, call_id=body.call_id,
        arguments=body.arguments,
    ))


def _on_transcript(state: RoomState, event: ev.TranscriptEvent, seq: int, time: datetime) -> None:
    body: ev.Transcript = event.body
    if not body.final:
        return
    transcriber = event.sender.identity or body.speaker
    if transcriber in state.feeds or body.speaker in state.feeds:
        return
    track = body.track_id or body.speaker
    canonical = state.transcribers.get(track)
    if canonical is None:
        state.transcribers[track] = transcriber
    elif canonical != transcriber:
        return
    role = "assistant" if _is_agent(state, body.speaker) else "user"
    item_id = f"tr:{body.segment_id}" if body.segment_id else f"tr:{event.id}"
    when = event.at or time
    digest = text_digest(body.text)
    heard = state.last_heard.get(track)
    if (heard is not None and heard.item_id != item_id and heard.digest == digest and heard.at is not None
            and abs((when - heard.at).total_seconds()) <= SAME_SPEECH_S):
        # Another agent's transcription of the same speech: agents publish a caller's transcript
        # on the caller's behalf, so the server gives every copy the caller's identity and the
        # transcriber rule above cannot tell them apart; the same words of the same track
        # within SAME_SPEECH_S are one utterance.
        return
    state.last_heard[track] = Echo(role=role, digest=digest, item_id=item_id, at=when)
    _put_item(
        state,
        ConversationItem(
            item_id=item_id, role=role, speaker=body.speaker, text=body.text, seq=seq,
            time=event.at or time, source="transcript", language=body.language,
        ),
        may_echo=True,
    )


def _on_chat(state: RoomState, event: ev.ChatMessageEvent, seq: int, time: datetime) -> None:
    body: ev.ChatMessage = event.body
    speaker = body.identity or event.sender.identity
    role = "assistant" if _is_agent(state, speaker) or event.sender.kind == "agent" else "user"
    _put_item(
        state,
        ConversationItem(
            item_id=f"chat:{body.message_id}", role=role, speaker=speaker or None, text=body.text, seq=seq,
            time=event.at or time, source="chat.message",
        ),
        may_echo=True,
    )


#: A reducer of one event type: (state, event, sequence, time of the record).
_Handler: TypeAlias = Callable[[RoomState, Any, int, datetime], None]
E = TypeVar("E")


def _on(cls: type[E], handler: Callable[[RoomState, E, int, datetime], None]) -> tuple[type, _Handler]:
    """One entry of the dispatch table: mypy checks that ``handler`` takes events of ``cls``. The table
    is keyed by the exact class, so a handler is only ever called with its own type."""
    return cls, handler


# A dict lookup by class (not a `match` over twenty-odd classes): the fold is the hot path of
# the projector and hydration.
_HANDLERS: Final[dict[type, _Handler]] = dict([
    _on(ev.ParticipantJoinedEvent, _on_joined),
    _on(ev.ParticipantLeftEvent, _on_left),
    _on(ev.ParticipantAttributesEvent, _on_attributes),
    _on(ev.RoomMetadataEvent, _on_room_metadata),
    _on(ev.AgentStateEvent, _on_agent_state),
    _on(ev.AgentStatusEvent, _on_agent_status),
    _on(ev.FloorRequestEvent, _on_floor_request),
    _on(ev.FloorReleaseEvent, _on_floor_release),
    _on(ev.TranscriptEvent, _on_transcript),
    _on(ev.ChatMessageEvent, _on_chat),
    _on(ev.ConversationItemEvent, _on_conversation_item),
    _on(ev.ToolExecutionEvent, _on_tool_execution),
    _on(ev.HandoffEvent, _on_handoff),
    _on(ev.SessionPatchEvent, _on_session_patch),
    _on(ev.ContextSummaryEvent, _on_summary),
    _on(ev.DataEvent, _ignore),
    _on(ev.BridgeJoinedEvent, _ignore),
    _on(ev.BridgeGapEvent, _on_gap),
    _on(ev.BridgeLeftEvent, _ignore),
    _on(ev.RoleClaimEvent, _on_role),
    _on(ev.RoleReleaseEvent, _on_role),
    # The server's own view (ledger webhooks) and the dispatches the ledger made: shown, no state.
    _on(ev.DispatchCreatedEvent, _ignore),
    *(_on(cls, _ignore) for tag, cls in ev.EVENT_TYPES.items() if tag.startswith("server.")),
])
