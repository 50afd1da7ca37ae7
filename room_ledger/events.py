"""The event model of the log (v1): one envelope, one body per type.

Every message in the stream is one event, JSON-encoded by msgspec::

    {"type": "floor.request", "id": "…", "room": "…", "at": "…", "observed_at": "…",
     "sender": {"identity": "…", "kind": "agent"}, "body": {…}}

An event does not carry its stream sequence or subject; a read returns it inside a
:class:`ledger.client.Record` with both.

Schema evolution: the log is permanent, so these rules are never broken
-----------------------------------------------------------------------
1. A tag (``type``) is permanent. A type is never renamed and a retired tag is never reused.
2. A new field gets a default, so old events still decode.
3. A field never changes type. To change a meaning, add a new field (or a new type) and keep
   the old one readable.
4. Readers ignore fields they don't know (msgspec's default), so a newer writer does not break
   an older reader.
5. A type this reader does not know decodes to :class:`OpaqueEvent`, which keeps its raw bytes;
   reducers skip it and count it, ``ledger replay`` shows it.
6. Breaking changes need a new tag (``floor.request.v2``) and an upcaster in this module
   mapping the old tag to the new struct at decode time.

What the sender sent
--------------------
A typed event made from a JSON payload (the seed shape, the ledger protocol) keeps that payload
verbatim in ``sent``: fields its type does not know, fields sent with their default value (which
the body, encoded with ``omit_defaults``, leaves out) and the payload's own ``id``/``at`` are all
there, byte for byte. :func:`sent_fields` and :func:`extra_fields` read it.

A payload above the inline limit (``LEDGER_INLINE_LIMIT``) lives in the JetStream Object Store
bucket beside the stream; the event carries a :class:`PayloadRef` (name, size, sha256 and how the
body is rebuilt from the bytes) and a stub body whose large fields are empty.
:func:`with_payload` rebuilds the full event from the object's bytes
(:meth:`ledger.client.Ledger.read` does it for every reader).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeAlias

import msgspec

from room_ledger.errors import EventError, MalformedEvent
from room_ledger.subjects import room_token

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
    it is; ``idle`` and ``resolved`` release it (see :mod:`ledger.state`). Widened from
    ``bool = False``: an explicit false is now stored, and old events decode unchanged. Events
    stored before the widening left a false out (``omit_defaults``), so None means "absent" only
    on an event that keeps what was sent (``sent`` or ``payload``): see :func:`status_lock`.
    """

    agent_id: str
    status: AgentStatusValue
    action_lock: bool | None = None
    task: str | None = None


class FloorRequest(Body, frozen=True):
    agent_id: str
    task: str | None = None


class FloorRelease(Body, frozen=True):
    agent_id: str
    reason: str | None = None


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
    until a role it accepts is freed (see :mod:`ledger.roles`)."""

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


# --- envelopes ------------------------------------------------------------------------------

_NO_RAW: Final = msgspec.Raw()


class _Envelope(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type"):
    id: str
    room: str
    at: datetime | None = None
    observed_at: datetime = msgspec.field(default_factory=utcnow)
    sender: Sender = UNKNOWN_SENDER
    #: The JSON payload exactly as sent, for typed events made from one (empty otherwise).
    sent: msgspec.Raw = _NO_RAW
    #: Where the payload lives when it is too large to be inline.
    payload: PayloadRef | None = None

    @property
    def type(self) -> str:
        return str(self.__struct_config__.tag)


class ParticipantJoinedEvent(_Envelope, frozen=True, tag="participant.joined"):
    body: ParticipantJoined


class ParticipantLeftEvent(_Envelope, frozen=True, tag="participant.left"):
    body: ParticipantLeft


class ParticipantAttributesEvent(_Envelope, frozen=True, tag="participant.attributes"):
    body: ParticipantAttributes


class RoomMetadataEvent(_Envelope, frozen=True, tag="room.metadata"):
    body: RoomMetadata


class AgentStateEvent(_Envelope, frozen=True, tag="agent.state"):
    body: AgentState


class AgentStatusEvent(_Envelope, frozen=True, tag="agent.status"):
    body: AgentStatus


class FloorRequestEvent(_Envelope, frozen=True, tag="floor.request"):
    body: FloorRequest


class FloorReleaseEvent(_Envelope, frozen=True, tag="floor.release"):
    body: FloorRelease


class TranscriptEvent(_Envelope, frozen=True, tag="transcript"):
    body: Transcript


class ChatMessageEvent(_Envelope, frozen=True, tag="chat.message"):
    body: ChatMessage


class ConversationItemEvent(_Envelope, frozen=True, tag="conversation.item"):
    body: ConversationItem


class HandoffEvent(_Envelope, frozen=True, tag="handoff"):
    body: Handoff


class SessionPatchEvent(_Envelope, frozen=True, tag="session.patch"):
    body: SessionPatch


class ContextSummaryEvent(_Envelope, frozen=True, tag="context.summary"):
    body: ContextSummary


class DataEvent(_Envelope, frozen=True, tag="data"):
    body: Data


class BridgeJoinedEvent(_Envelope, frozen=True, tag="bridge.joined"):
    body: BridgeJoined


class BridgeGapEvent(_Envelope, frozen=True, tag="bridge.gap"):
    body: BridgeGap


class BridgeLeftEvent(_Envelope, frozen=True, tag="bridge.left"):
    body: BridgeLeft


class RoleClaimEvent(_Envelope, frozen=True, tag="role.claim"):
    body: RoleClaim


class RoleReleaseEvent(_Envelope, frozen=True, tag="role.release"):
    body: RoleRelease


class DispatchCreatedEvent(_Envelope, frozen=True, tag="dispatch.created"):
    body: DispatchCreated


class ServerRoomStartedEvent(_Envelope, frozen=True, tag="server.room_started"):
    body: ServerRoomStarted


class ServerRoomFinishedEvent(_Envelope, frozen=True, tag="server.room_finished"):
    body: ServerRoomFinished


class ServerParticipantJoinedEvent(_Envelope, frozen=True, tag="server.participant_joined"):
    body: ServerParticipantJoined


class ServerParticipantLeftEvent(_Envelope, frozen=True, tag="server.participant_left"):
    body: ServerParticipantLeft


class ServerParticipantConnectionAbortedEvent(_Envelope, frozen=True, tag="server.participant_connection_aborted"):
    body: ServerParticipantConnectionAborted


class ServerTrackPublishedEvent(_Envelope, frozen=True, tag="server.track_published"):
    body: ServerTrackPublished


class ServerTrackUnpublishedEvent(_Envelope, frozen=True, tag="server.track_unpublished"):
    body: ServerTrackUnpublished


class ServerEgressStartedEvent(_Envelope, frozen=True, tag="server.egress_started"):
    body: ServerEgressStarted


class ServerEgressUpdatedEvent(_Envelope, frozen=True, tag="server.egress_updated"):
    body: ServerEgressUpdated


class ServerEgressEndedEvent(_Envelope, frozen=True, tag="server.egress_ended"):
    body: ServerEgressEnded


class ServerIngressStartedEvent(_Envelope, frozen=True, tag="server.ingress_started"):
    body: ServerIngressStarted


class ServerIngressEndedEvent(_Envelope, frozen=True, tag="server.ingress_ended"):
    body: ServerIngressEnded


class ServerWebhookEvent(_Envelope, frozen=True, tag="server.webhook"):
    body: ServerWebhook


KnownEvent: TypeAlias = (
    ParticipantJoinedEvent
    | ParticipantLeftEvent
    | ParticipantAttributesEvent
    | RoomMetadataEvent
    | AgentStateEvent
    | AgentStatusEvent
    | FloorRequestEvent
    | FloorReleaseEvent
    | TranscriptEvent
    | ChatMessageEvent
    | ConversationItemEvent
    | HandoffEvent
    | SessionPatchEvent
    | ContextSummaryEvent
    | DataEvent
    | BridgeJoinedEvent
    | BridgeGapEvent
    | BridgeLeftEvent
    | DispatchCreatedEvent
    | RoleClaimEvent
    | RoleReleaseEvent
    | ServerRoomStartedEvent
    | ServerRoomFinishedEvent
    | ServerParticipantJoinedEvent
    | ServerParticipantLeftEvent
    | ServerParticipantConnectionAbortedEvent
    | ServerTrackPublishedEvent
    | ServerTrackUnpublishedEvent
    | ServerEgressStartedEvent
    | ServerEgressUpdatedEvent
    | ServerEgressEndedEvent
    | ServerIngressStartedEvent
    | ServerIngressEndedEvent
    | ServerWebhookEvent
)


class OpaqueEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event this reader cannot type: an unknown type, or (with ``error``) a malformed one.

    It keeps its bytes; reducers skip it and count it; ``ledger replay`` shows it.
    """

    id: str
    room: str
    type: str
    raw: bytes
    at: datetime | None = None
    observed_at: datetime | None = None
    sender: Sender = UNKNOWN_SENDER
    #: Why a known type did not decode ("" for a type this reader does not know).
    error: str = ""


Event: TypeAlias = KnownEvent | OpaqueEvent

#: Tag -> envelope class, for every type this version knows.
EVENT_TYPES: Final[dict[str, type[_Envelope]]] = {
    str(cls.__struct_config__.tag): cls
    for cls in (
        ParticipantJoinedEvent,
        ParticipantLeftEvent,
        ParticipantAttributesEvent,
        RoomMetadataEvent,
        AgentStateEvent,
        AgentStatusEvent,
        FloorRequestEvent,
        FloorReleaseEvent,
        TranscriptEvent,
        ChatMessageEvent,
        ConversationItemEvent,
        HandoffEvent,
        SessionPatchEvent,
        ContextSummaryEvent,
        DataEvent,
        BridgeJoinedEvent,
        BridgeGapEvent,
        BridgeLeftEvent,
        DispatchCreatedEvent,
        RoleClaimEvent,
        RoleReleaseEvent,
        ServerRoomStartedEvent,
        ServerRoomFinishedEvent,
        ServerParticipantJoinedEvent,
        ServerParticipantLeftEvent,
        ServerParticipantConnectionAbortedEvent,
        ServerTrackPublishedEvent,
        ServerTrackUnpublishedEvent,
        ServerEgressStartedEvent,
        ServerEgressUpdatedEvent,
        ServerEgressEndedEvent,
        ServerIngressStartedEvent,
        ServerIngressEndedEvent,
        ServerWebhookEvent,
    )
}

def _body_type(cls: type[_Envelope]) -> type[Body]:
    field_types: dict[str, Any] = {f.name: f.type for f in msgspec.structs.fields(cls)}
    body_type: type[Body] = field_types["body"]
    return body_type


_BODY_OF_EVENT: Final[dict[type[_Envelope], type[Body]]] = {cls: _body_type(cls) for cls in EVENT_TYPES.values()}
_EVENT_FOR_BODY: Final[dict[type[Body], type[_Envelope]]] = {b: e for e, b in _BODY_OF_EVENT.items()}


class _Head(msgspec.Struct, kw_only=True):
    """Just enough of an envelope to keep an event of unknown type."""

    id: str
    room: str
    type: str
    at: datetime | None = None
    observed_at: datetime | None = None
    sender: Sender = UNKNOWN_SENDER


_encoder: Final = msgspec.json.Encoder()
_decoder: Final[msgspec.json.Decoder[KnownEvent]] = msgspec.json.Decoder(KnownEvent)
_head_decoder: Final = msgspec.json.Decoder(_Head)


def encode(event: KnownEvent) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes) -> Event:
    """Decode one stored event.

    Unknown types come back as :class:`OpaqueEvent`; a known type with a wrong shape raises
    :class:`MalformedEvent` naming the field path (``… - at `$.body.action_lock```).
    """
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as exc:
        try:
            head = _head_decoder.decode(data)
        except msgspec.DecodeError:
            raise MalformedEvent("?", str(exc)) from exc
        if head.type in EVENT_TYPES:
            raise MalformedEvent(head.type, str(exc)) from exc
        return OpaqueEvent(
            id=head.id,
            room=head.room,
            type=head.type,
            raw=bytes(data),
            at=head.at,
            observed_at=head.observed_at,
            sender=head.sender,
        )
    except msgspec.DecodeError as exc:
        raise MalformedEvent("?", f"not JSON: {exc}") from exc


def decode_lenient(data: bytes) -> Event:
    """Like :func:`decode`, but a malformed event comes back opaque with its error: a reader of
    the log must never stop at one bad message."""
    try:
        return decode(data)
    except MalformedEvent as exc:
        try:
            head = _head_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return OpaqueEvent(id="", room="", type="?", raw=bytes(data), error=exc.detail)
        return OpaqueEvent(
            id=head.id,
            room=head.room,
            type=head.type,
            raw=bytes(data),
            at=head.at,
            observed_at=head.observed_at,
            sender=head.sender,
            error=exc.detail,
        )


def event_type(event: Event) -> str:
    if isinstance(event, OpaqueEvent):
        return event.type
    return str(event.__struct_config__.tag)


def make_event(
    room: str,
    body: Body,
    *,
    id: str | None = None,
    sender: Sender = UNKNOWN_SENDER,
    at: datetime | None = None,
    observed_at: datetime | None = None,
    sent: msgspec.Raw | None = None,
    payload: PayloadRef | None = None,
) -> KnownEvent:
    """Wrap a body in the envelope of its type: ``make_event("r1", FloorRequest(agent_id="a"))``."""
    cls = _EVENT_FOR_BODY.get(type(body))
    if cls is None:
        raise TypeError(f"{type(body).__name__} is not an event body")
    event: KnownEvent = cls(  # type: ignore[assignment,call-arg]
        id=id or new_event_id(),
        room=room,
        at=at,
        observed_at=observed_at or utcnow(),
        sender=sender,
        body=body,
        sent=sent if sent is not None else _NO_RAW,
        payload=payload,
    )
    return event


def body_from_dict(event_type_name: str, body: Any) -> Body:
    """Validate a body given as plain data (JSON from an agent) against its type."""
    cls = EVENT_TYPES.get(event_type_name)
    if cls is None:
        raise MalformedEvent(event_type_name, "unknown event type")
    body_type = _BODY_OF_EVENT[cls]
    try:
        result: Body = msgspec.convert(body, body_type)
    except msgspec.ValidationError as exc:
        raise MalformedEvent(event_type_name, str(exc)) from exc
    return result


def to_builtins(event: Event) -> dict[str, Any]:
    """The event as plain JSON-able data (for ``--json`` output).

    ``sent`` (when the event keeps its payload) is the JSON object as the sender sent it, and
    ``extra`` the fields of it the body does not show with the value sent.
    """
    if isinstance(event, OpaqueEvent):
        try:
            decoded = msgspec.json.decode(event.raw)
        except msgspec.DecodeError:
            decoded = None
        if not isinstance(decoded, dict):
            decoded = {"type": event.type, "id": event.id, "room": event.room}
        if event.error:
            decoded["error"] = event.error
        return dict(decoded)
    if not event.sent:
        result: dict[str, Any] = msgspec.to_builtins(event)
        return result
    result = msgspec.to_builtins(msgspec.structs.replace(event, sent=_NO_RAW))
    sent = sent_fields(event)
    result["sent"] = sent
    extra = extra_fields(event, sent)
    if extra:
        result["extra"] = extra
    return result


# --- what the sender sent -------------------------------------------------------------------

#: Keys of a protocol message that belong to the envelope, not the body.
ENVELOPE_KEYS: Final = frozenset({"type", "id", "at", "room", "sender", "observed_at", "v"})


def protocol_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """The body fields of a protocol message: those under ``"body"``, or the top-level ones
    without the envelope's keys."""
    nested = obj.get("body")
    if isinstance(nested, dict):
        return nested
    return {k: v for k, v in obj.items() if k not in ENVELOPE_KEYS}


def sent_fields(event: KnownEvent) -> Any:
    """The JSON payload as sent (None when the event keeps none)."""
    if not event.sent:
        return None
    try:
        return msgspec.json.decode(event.sent)
    except msgspec.DecodeError:
        return None


def extra_fields(event: KnownEvent, sent: Any = None) -> dict[str, Any]:
    """Fields the sender sent that the body does not show with the value sent: unknown fields,
    known ones sent with their default value, and the payload's own ``id``/``at``."""
    if sent is None:
        sent = sent_fields(event)
    if not isinstance(sent, dict):
        return {}
    shown = msgspec.to_builtins(event.body)
    extra: dict[str, Any] = {}
    nested = isinstance(sent.get("body"), dict)
    for key, value in protocol_fields(sent).items():
        if key not in shown or shown[key] != value:
            extra[key] = value
    for key, value in sent.items():
        if key != "type" and (key in ENVELOPE_KEYS or (nested and key != "body")):
            extra.setdefault(key, value)
    return extra


def status_lock(event: AgentStatusEvent) -> bool | None:
    """An ``agent.status`` event's action lock: True, False, or None when the sender left it out.

    A None on an event without ``sent``/``payload`` (stored before locks could be absent, or
    built in code) is the old encoding of false.
    """
    lock = event.body.action_lock
    if lock is None and not event.sent and event.payload is None:
        return False
    return lock


# --- payloads in the object store -------------------------------------------------------------


def payload_object_name(room: str, event_id: str) -> str:
    """The object holding an event's payload: ``<room token>/<event id>``. Deterministic, so a
    retried or doubly-bridged payload is stored once, and a room's objects share a prefix."""

    return f"{room_token(room)}/{event_id}"


#: A field whose JSON is larger than this is emptied in the stub body of an externalized event.
STUB_FIELD_MAX: Final = 256


def stub_body(body: Body) -> Body:
    """``body`` with its large string, object and list fields emptied (None when that is their
    default): what is stored inline when the payload lives in the object store. Small fields
    (ids, topic, reason, numbers) stay, so the event still reads as what it is."""
    changes: dict[str, Any] = {}
    for f in msgspec.structs.fields(body):
        value = getattr(body, f.name)
        if value is None or isinstance(value, bool | int | float):
            continue
        if len(msgspec.json.encode(value)) <= STUB_FIELD_MAX:
            continue
        if isinstance(value, str):
            changes[f.name] = None if f.default is None else ""
        elif isinstance(value, dict | list):
            changes[f.name] = None if f.default is None else type(value)()
        else:
            changes[f.name] = None
    return msgspec.structs.replace(body, **changes) if changes else body


def with_payload(event: KnownEvent, data: bytes) -> Event:
    """The event with the body its stored payload gives (see :class:`PayloadRef`).

    A payload that does not give a valid body comes back as an :class:`OpaqueEvent` with the
    reason, so reducers skip it and count it rather than fold a stub.
    """
    ref = event.payload
    if ref is None or not ref.form:
        return event
    type_name = event.type
    try:
        if ref.form == "json":
            obj = msgspec.json.decode(data)
            if not isinstance(obj, dict):
                raise MalformedEvent(type_name, "stored payload is not a JSON object")
            body = body_from_dict(type_name, protocol_fields(obj))
        elif ref.form == "text":
            body = msgspec.structs.replace(event.body, text=data.decode("utf-8"))
        else:
            body = msgspec.json.decode(data, type=type(event.body))
    except (MalformedEvent, msgspec.DecodeError, UnicodeDecodeError, TypeError, RecursionError) as exc:
        return unresolved(event, f"payload {ref.name} does not give a {type_name} body: {str(exc)[:200]}")
    resolved: KnownEvent = msgspec.structs.replace(event, body=body)
    return resolved


def unresolved(event: KnownEvent, error: str) -> OpaqueEvent:
    """An event whose stored payload could not be loaded, kept opaque with the reason."""
    return OpaqueEvent(id=event.id, room=event.room, type=event.type, raw=encode(event), at=event.at,
                       observed_at=event.observed_at, sender=event.sender, error=error)
