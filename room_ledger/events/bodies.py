"""Ids, senders and the body of every event type (the payloads); payload references.

Part of :mod:`room_ledger.events` (import from there).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeAlias

import msgspec

from room_ledger.errors import EventError

SenderKind: TypeAlias = Literal["agent", "standard", "sip", "egress", "ingress", "unknown"]
AgentStatusValue: TypeAlias = Literal["processing", "idle", "resolved"]
ConversationItemType: TypeAlias = Literal[
    "message", "function_call", "function_call_output", "agent_handoff", "agent_config_update"
]


class PayloadTooLarge(EventError, ValueError):
    """A payload over the hard limit (``LEDGER_MAX_PAYLOAD``): the helpers refuse to send it."""

    def __init__(self, type_name: str, size: int, limit: int) -> None:
        super().__init__(
            f"{type_name} payload is {size} bytes, over the hard limit of {limit} bytes (LEDGER_MAX_PAYLOAD): "
            "the bridge would store it only as data, never apply it; split it, or raise LEDGER_MAX_PAYLOAD "
            "on the agents and the bridge alike"
        )
        self.size = size
        self.limit = limit


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_event_id() -> str:
    """A fresh id for an event whose source gives no identity of its own.

    32 hex digits like a UUID, but a random per-process prefix and a counter: unique without
    a call to the kernel's random source per event (the bridge makes one per data packet).
    """
    return f"{_id_prefix}{next(_id_counter):016x}"


def _new_id_prefix() -> None:
    global _id_prefix, _id_counter
    _id_prefix = os.urandom(8).hex()
    _id_counter = itertools.count()


_id_prefix = ""
_id_counter = itertools.count()
_new_id_prefix()
# A forked child (agent job processes) must not repeat its parent's ids.
os.register_at_fork(after_in_child=_new_id_prefix)


def derived_event_id(*parts: str) -> str:
    """A deterministic id from a source identity, so two bridges store the event once.

    The parts are length-prefixed before hashing so ("ab", "c") and ("a", "bc") differ.
    """
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        encoded = part.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(4, "big"))
        digest.update(encoded)
    return digest.hexdigest()


class Sender(msgspec.Struct, frozen=True, omit_defaults=True):
    identity: str = ""
    kind: SenderKind = "unknown"


UNKNOWN_SENDER: Final = Sender()


# --- bodies ---------------------------------------------------------------------------------


class Body(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=False):
    """Base of every body; kept apart so bodies can be built before the envelope."""


class ParticipantJoined(Body, frozen=True):
    identity: str
    sid: str = ""
    name: str = ""
    kind: SenderKind = "unknown"
    attributes: dict[str, str] = {}
    metadata: str = ""
    #: True when recorded from the snapshot taken as the bridge joins (it was already there).
    snapshot: bool = False


class ParticipantLeft(Body, frozen=True):
    identity: str
    sid: str = ""
    reason: str = ""


class ParticipantAttributes(Body, frozen=True):
    identity: str
    #: What changed; an empty string means the attribute was deleted.
    changed: dict[str, str] = {}
    #: Every attribute after the change.
    attributes: dict[str, str] = {}
    name: str | None = None
    metadata: str | None = None


class RoomMetadata(Body, frozen=True):
    metadata: str


class AgentState(Body, frozen=True):
    identity: str
    #: initializing, idle, listening, thinking, speaking (LiveKit Agents' ``lk.agent.state``).
    state: str
    old_state: str | None = None


class AgentStatus(Body, frozen=True):
    """The coordination payload agents broadcast (seed 000).

    ``action_lock`` absent (None) is not false: with status ``processing`` the floor is left as
    it is; ``idle`` and ``resolved`` release it (see :mod:`room_ledger.state`). Widened from
    ``bool = False``: an explicit false is now stored, and old events decode unchanged. Events
    stored before the widening left a false out (``omit_defaults``), so None means "absent" only
    on an event that keeps what was sent (``sent`` or ``payload``): see :func:`status_lock`.
    """

    agent_id: str
    status: AgentStatusValue
    action_lock: bool | None = None
    task: str | None = None
    #: The sender's ownership epoch (the log sequence that made it the owner of its call): a write
    #: from a superseded epoch is ignored by the fold (see :mod:`room_ledger.ownership`). None: never fenced.
    epoch: int | None = None


class FloorRequest(Body, frozen=True):
    agent_id: str
    task: str | None = None
    #: The sender's ownership epoch (the log sequence that made it the owner of its call): a write
    #: from a superseded epoch is ignored by the fold (see :mod:`room_ledger.ownership`). None: never fenced.
    epoch: int | None = None


class FloorRelease(Body, frozen=True):
    agent_id: str
    reason: str | None = None
    #: The sender's ownership epoch (the log sequence that made it the owner of its call): a write
    #: from a superseded epoch is ignored by the fold (see :mod:`room_ledger.ownership`). None: never fenced.
    epoch: int | None = None


class Transcript(Body, frozen=True):
    speaker: str
    text: str
    segment_id: str = ""
    track_id: str | None = None
    language: str | None = None
    final: bool = True


class ChatMessage(Body, frozen=True):
    message_id: str
    text: str
    identity: str = ""


class ConversationItem(Body, frozen=True):
    """One item of an AgentSession's chat context, as published on ``lk.agent.session``."""

    item_id: str
    item_type: ConversationItemType = "message"
    role: str | None = None
    text: str = ""
    #: The participant whose session produced (or heard) the item.
    speaker: str | None = None
    interrupted: bool = False
    name: str | None = None
    call_id: str | None = None
    arguments: str | None = None
    output: str | None = None
    is_error: bool = False
    old_agent_id: str | None = None
    new_agent_id: str | None = None
    #: Unix seconds, as LiveKit Agents stamps items.
    created_at: float | None = None


class ToolExecution(Body, frozen=True):
    """One step of a function tool's run in an AgentSession, from its ``lk.agent.session`` feed
    (``tool_execution_updated``; ``function_tools_started`` too, as ``started``).

    LiveKit Agents puts a function call in the feed's conversation only together with its output,
    once the tool has returned; this is the call while it runs. ``stage`` says which step (a
    string, not a closed set: a step a later LiveKit version adds still decodes):

    - ``started``: the call was dispatched (``item_id`` the call's chat item id, ``name``, ``arguments``);
    - ``updated``: a progress update the tool sent (``item_id`` the update's entry id, ``message``);
    - ``ended``: its one terminal step (``status`` done, error or cancelled; ``message`` the result
      or error text, when there is one to voice);
    - ``reply``: the deferred reply voicing updates (``status`` scheduled, completed, interrupted or
      skipped; ``update_ids``, ``speech_id``).
    """

    stage: str = ""
    call_id: str = ""
    item_id: str = ""
    name: str | None = None
    arguments: str | None = None
    message: str | None = None
    status: str | None = None
    update_ids: list[str] = []
    speech_id: str | None = None
    #: Unix seconds, as the session stamped the step.
    created_at: float | None = None


class Handoff(Body, frozen=True):
    from_agent: str
    to_agent: str
    reason: str | None = None
    #: The log sequence the target must hydrate to (read-your-writes).
    min_seq: int | None = None


#: The reason of the ``handoff`` that records a failed one (the caller handed back to the source).
FAILED_HANDOFF_PREFIX: Final = "handoff failed: "


class SessionPatch(Body, frozen=True):
    """A change of the room's shared session document: a merge patch, then exact values.

    ``patch`` is an RFC 7386 JSON merge patch, whose ``null`` deletes a key: it cannot say
    "this field is now null". ``set`` (on the wire; ``set_values`` here) maps RFC 6901 JSON
    Pointers to values stored exactly as given, ``null`` and nested nulls included; it is applied
    after ``patch``, pointer by pointer in order, creating missing objects on the way. An event
    written before ``set`` existed has only ``patch`` and folds as it always did.
    """

    patch: dict[str, Any] = {}
    set_values: dict[str, Any] = msgspec.field(default_factory=dict, name="set")
    #: The agent that wrote it and its ownership epoch: a patch carrying both is fenced like the
    #: agent's floor claims (see :mod:`room_ledger.ownership`); one without either never is.
    agent_id: str | None = None
    epoch: int | None = None


class ContextSummary(Body, frozen=True):
    text: str
    #: The last sequence the summary covers; conversation after it is replayed verbatim.
    covers_seq: int


class Data(Body, frozen=True):
    """Any packet or stream not typed otherwise, and anything rejected (with the reason)."""

    topic: str = ""
    #: "packet", "text_stream" or "byte_stream".
    transport: str = "packet"
    #: The payload as text when it is valid UTF-8, else base64 in ``payload_b64``.
    text: str | None = None
    payload_b64: str | None = None
    json: Any = None
    size: int = 0
    #: Why the payload was not recorded as a typed event ("" when it is just untyped data).
    reason: str = ""
    stream_id: str | None = None
    attributes: dict[str, str] = {}


class BridgeJoined(Body, frozen=True):
    bridge_id: str
    livekit_url: str = ""


class BridgeGap(Body, frozen=True):
    """A span during which the bridge could not see the room; the log may miss events in it."""

    bridge_id: str
    started_at: datetime
    ended_at: datetime
    reason: str = ""


class BridgeLeft(Body, frozen=True):
    bridge_id: str
    reason: str = ""



class RoleClaim(Body, frozen=True):
    """An agent claims one of ``roles`` (seed 002: customer or support). Decided by log order, like
    the floor: the earliest claim gets the first role of its list still free; a later one waits
    until a role it accepts is freed (see :mod:`room_ledger.roles`)."""

    agent_id: str
    #: The roles it would take, in its order of preference.
    roles: list[str]


class RoleRelease(Body, frozen=True):
    agent_id: str
    #: The role given up (None: whatever it holds, and its waiting claim).
    role: str | None = None


class DispatchCreated(Body, frozen=True):
    """An agent dispatch the ledger created through LiveKit's AgentDispatch API (``ledger dispatch``,
    the handoff tool): ``ledger dispatches`` puts it beside the agent that joined for it."""

    dispatch_id: str
    agent_name: str
    metadata: str = ""
    #: What created it: "ledger dispatch", "handoff", …
    by: str = ""


class ServerEvent(Body, frozen=True):
    """What livekit-server itself reported about the room through its webhook (``ledger webhooks``).

    One type per webhook event (``server.room_started`` …; ``server.webhook`` for a name this
    version does not know). The event id derives from the webhook's own ``id``, so a redelivered
    webhook is stored once. ``webhook`` keeps the webhook's JSON as the server sent it.
    """

    #: The webhook's event name (``room_started`` …) and its own id.
    event: str
    webhook_id: str
    #: Unix seconds when the server made the event.
    created_at: int = 0
    room_sid: str = ""
    identity: str = ""
    participant_sid: str = ""
    kind: SenderKind = "unknown"
    track_sid: str = ""
    egress_id: str = ""
    ingress_id: str = ""
    webhook: dict[str, Any] = {}


class ServerRoomStarted(ServerEvent, frozen=True):
    pass


class ServerRoomFinished(ServerEvent, frozen=True):
    pass


class ServerParticipantJoined(ServerEvent, frozen=True):
    pass


class ServerParticipantLeft(ServerEvent, frozen=True):
    pass


class ServerParticipantConnectionAborted(ServerEvent, frozen=True):
    pass


class ServerTrackPublished(ServerEvent, frozen=True):
    pass


class ServerTrackUnpublished(ServerEvent, frozen=True):
    pass


class ServerEgressStarted(ServerEvent, frozen=True):
    pass


class ServerEgressUpdated(ServerEvent, frozen=True):
    pass


class ServerEgressEnded(ServerEvent, frozen=True):
    pass


class ServerIngressStarted(ServerEvent, frozen=True):
    pass


class ServerIngressEnded(ServerEvent, frozen=True):
    pass


class ServerWebhook(ServerEvent, frozen=True):
    pass


# --- payload references ---------------------------------------------------------------------

PayloadForm: TypeAlias = Literal["", "json", "text", "body"]


class PayloadRef(msgspec.Struct, frozen=True, omit_defaults=True):
    """A payload stored in the Object Store bucket beside the stream (``ledger payload`` reads it)."""

    #: Object name: ``<room token>/<event id>`` (for a stream: the id its stream gives, even when a
    #: protocol message names its own), so a retried or doubly-bridged payload is stored once.
    name: str
    size: int
    #: Hex SHA-256 of the bytes.
    sha256: str
    #: How the body is rebuilt from the bytes: "json" (the JSON object the sender sent, as the
    #: seed shape or the ledger protocol), "text" (the body's ``text`` is the bytes as UTF-8),
    #: "body" (the bytes are the body's own JSON, for events decoded from another encoding),
    #: "" (a ``data`` event: nothing to rebuild).
    form: PayloadForm = ""


