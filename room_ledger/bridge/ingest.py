"""Room observations -> ledger events: the part of the bridge that needs no WebRTC.

``Ingest`` takes plain observations (an identity joined, a packet of bytes arrived on a topic,
a text stream was read to its end …) and turns each into exactly one event handed to a sink,
normally :meth:`bridge.writer.BridgeWriter.submit`. ``ledger demo``, the tests and the
benchmark drive it directly; :mod:`bridge.room` feeds it from a ``livekit.rtc.Room``::

    writer = BridgeWriter(ledger, home=settings.home)
    await writer.start()
    ingest = writer.ingest("support-42")
    ingest.participant_joined("triage", kind="agent")
    ingest.data_packet(b'{"agent_id":"triage","status":"processing","action_lock":true}',
                       topic="state", sender_identity="triage")

Rules kept here:

* Bad input never raises. Anything that is not valid for its type becomes a ``data`` event with
  a ``reason`` (invalid UTF-8, invalid JSON, wrong shape, too deep, too large …). An internal
  error while ingesting is recorded the same way.
* Ids are deterministic where the source gives an identity (participant sid, stream id, the
  payload's own id, an AgentSession item id), so two bridges in one room store each event once.
* Transcript text and identities never go to log messages.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from room_ledger import events as ev
from room_ledger import protocol
from room_ledger.agents import AGENT_EVENT_TYPES, LEDGER_TOPIC, protocol_event_id
from room_ledger.bridge import session_feed
from room_ledger.bridge.payloads import PayloadSpool
from room_ledger.bridge.stats import Counters
from room_ledger.errors import MalformedEvent
from room_ledger.settings import DEFAULT_INLINE_LIMIT, DEFAULT_MAX_PAYLOAD

log = logging.getLogger("bridge.ingest")

TOPIC_TRANSCRIPTION: Final = protocol.TOPIC_TRANSCRIPTION
TOPIC_CHAT: Final = protocol.TOPIC_CHAT
TOPIC_AGENT_SESSION: Final = protocol.TOPIC_AGENT_SESSION
ATTR_AGENT_STATE: Final = protocol.ATTR_AGENT_STATE
ATTR_SEGMENT_ID: Final = protocol.ATTR_SEGMENT_ID
ATTR_TRACK_ID: Final = protocol.ATTR_TRANSCRIBED_TRACK_ID
ATTR_FINAL: Final = protocol.ATTR_TRANSCRIPTION_FINAL
ATTR_LANGUAGE: Final = protocol.ATTR_LANGUAGE

#: Default inline limit: a payload larger than this goes to the Object Store (LEDGER_INLINE_LIMIT).
MAX_INLINE_BYTES: Final = DEFAULT_INLINE_LIMIT
#: Preview kept of an event that cannot be encoded at all (its repr).
PREVIEW_BYTES: Final = 4096
#: Deepest JSON kept parsed in ``data.json`` and accepted as a typed body.
MAX_JSON_DEPTH: Final = 64
#: An encoded event above this keeps its body in the Object Store (the stream's default maximum
#: message is 1 MiB, and the subject and headers need room too).
MAX_EVENT_BYTES: Final = 900 * 1024
#: Topics whose streams are parsed (typed) whatever their first byte.
TYPED_TOPICS: Final = frozenset({LEDGER_TOPIC, TOPIC_TRANSCRIPTION, TOPIC_CHAT, TOPIC_AGENT_SESSION})

#: The seed shape's keys; ``action_lock`` may be absent (``{"agent_id", "status"}`` is enough).
_SEED_KEYS: Final = frozenset({"agent_id", "status"})


class _SeedPacket(msgspec.Struct):
    """The seed shape, decoded in one pass: the commonest packet in a multi-agent room."""

    agent_id: str
    status: ev.AgentStatusValue
    #: Absent is not false (the floor treats them differently): None.
    action_lock: bool | None = None
    task: str | None = None
    id: Any = None
    at: Any = None
    #: Present means it is not the seed shape (the ledger protocol names its type).
    type: Any = msgspec.UNSET


_seed_decoder: Final = msgspec.json.Decoder(_SeedPacket)
#: Seed packets are small; larger payloads take the general path.
_SEED_FAST_MAX: Final = 4096

Sink = Callable[[ev.KnownEvent], object]


_KIND_NAMES: Final[dict[object, ev.SenderKind]] = {
    0: "standard", 1: "ingress", 2: "egress", 3: "sip", 4: "agent",
    "standard": "standard", "ingress": "ingress", "egress": "egress", "sip": "sip", "agent": "agent",
}


def sender_kind(value: object) -> ev.SenderKind:
    """A LiveKit participant kind (name, or ``rtc.ParticipantKind`` number) -> our sender kind."""
    if isinstance(value, str):
        value = value.lower().removeprefix("participant_kind_")
    return _KIND_NAMES.get(value, "unknown")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, stopping early once past ``limit`` (no recursion)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parse_at(value: Any) -> datetime | None:
    try:
        if isinstance(value, bool):
            return None
        if isinstance(value, int | float):
            seconds = float(value)
            if seconds > 1e12:  # milliseconds
                seconds /= 1000.0
            return datetime.fromtimestamp(seconds, UTC)
        if isinstance(value, str) and len(value) <= 64:
            parsed = datetime.fromisoformat(value)
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return None


def _ms_to_datetime(ms: int | float | None) -> datetime | None:
    if not ms:
        return None
    try:
        return datetime.fromtimestamp(float(ms) / 1000.0, UTC)
    except (ValueError, OverflowError, OSError):
        return None


@dataclass
class _Payload:
    """A payload decoded as far as it goes: text if UTF-8, JSON if it parses (and is not too deep)."""

    raw: bytes
    text: str | None = None
    json: Any = None
    is_json: bool = False
    problem: str = ""


class Observation(msgspec.Struct, frozen=True, gc=False):
    """Where a payload was seen, from whom and when: all that its event says besides the payload.

    One per packet or stream, made where it enters the ingest and handed unchanged through the
    classification to the event it becomes (typed, or ``data`` with a reason). A Struct: one is
    made per packet, and it costs less than the keyword arguments it replaces.
    """

    topic: str
    #: ``packet``, ``text_stream`` or ``byte_stream``.
    transport: str
    sender: ev.Sender
    #: The event's id unless the payload names one of its own (a stream's, derived from its id);
    #: None: a new one.
    fallback_id: str | None = None
    #: When it was sent, as far as known (a stream's timestamp; a packet's arrival).
    at: datetime | None = None
    stream_id: str | None = None
    attributes: Mapping[str, str] | None = None


def over_limit_reason(size: int, limit: int) -> str:
    return (f"over the hard limit: {size} bytes > LEDGER_MAX_PAYLOAD {limit} bytes "
            "(stored byte-exact, not parsed)")


def _decode_payload(raw: bytes, max_payload: int = DEFAULT_MAX_PAYLOAD) -> _Payload:
    result = _Payload(raw)
    if len(raw) > max_payload:
        result.problem = over_limit_reason(len(raw), max_payload)
        return result
    try:
        result.text = raw.decode("utf-8")
    except UnicodeDecodeError:
        result.problem = "invalid utf-8"
        return result
    stripped = result.text.lstrip()
    if not stripped or stripped[0] not in "{[":
        return result
    try:
        parsed = msgspec.json.decode(raw)
    except RecursionError:
        result.problem = "json nested too deeply"
        return result
    except msgspec.DecodeError as exc:
        result.problem = f"invalid json: {str(exc)[:120]}"
        return result
    # a document of n bytes nests at most n/2 deep: small ones need no walk
    if len(raw) > 2 * MAX_JSON_DEPTH and _depth(parsed, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        result.problem = f"json nested deeper than {MAX_JSON_DEPTH}"
        return result
    result.json = parsed
    result.is_json = True
    return result


@dataclass
class Ingest:
    """Turns one room's observations into events, in the order observed, handed to ``sink``."""

    room: str
    sink: Sink
    bridge_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    counters: Counters = field(default_factory=Counters)
    #: identity -> sender (kind), learned from joins and snapshots.
    participants: dict[str, ev.Sender] = field(default_factory=dict)
    #: track sid -> owner identity, for transcript speakers.
    track_owners: dict[str, str] = field(default_factory=dict)
    #: Optional sink that also takes the event's encoding (saves the writer encoding it again).
    encoded_sink: Callable[[ev.KnownEvent, bytes], object] | None = None
    #: Where payloads above ``inline_limit`` wait for the Object Store (the writer puts them).
    spool: PayloadSpool = field(default_factory=PayloadSpool)
    inline_limit: int = DEFAULT_INLINE_LIMIT
    max_payload: int = DEFAULT_MAX_PAYLOAD
    _snapshots: int = 0
    _observed_at: datetime | None = None
    #: The spooled payload of the stream being ingested (its file is already written).
    _spooled: ev.PayloadRef | None = None

    # --- plumbing ----------------------------------------------------------------------------

    def sender(self, identity: str | None, kind: object = None) -> ev.Sender:
        if not identity:
            return ev.UNKNOWN_SENDER
        if kind is not None:
            resolved = sender_kind(kind)
            if resolved != "unknown":
                return ev.Sender(identity, resolved)
        known = self.participants.get(identity)
        return known if known is not None else ev.Sender(identity, "unknown")

    def _emit(self, body: ev.Body, *, id: str | None = None, sender: ev.Sender = ev.UNKNOWN_SENDER,
              at: datetime | None = None, kind: str = "typed", raw: bytes | None = None,
              form: ev.PayloadForm = "") -> ev.KnownEvent:
        """Build, size-check and hand one event to the sink; count it under ``kind``.

        ``raw``: the payload the body was made from (``form`` says how: "json" keeps it as
        ``sent``). Above the inline limit, or when the event would be too large for the stream,
        the payload goes to the spool (then the Object Store) and the event carries its reference.
        """
        sent = msgspec.Raw(raw) if form == "json" and raw is not None and len(raw) <= self.inline_limit else None
        event = ev.make_event(self.room, body, id=id or ev.new_event_id(), sender=sender, at=at,
                              observed_at=self._observed_at, sent=sent)
        encoded: bytes | None = None
        try:
            encoded = ev.encode(event)
        except (UnicodeEncodeError, RecursionError, TypeError, ValueError, OverflowError) as exc:
            kind = "rejected"
            if raw is not None and not isinstance(body, ev.Data):
                # The bytes as they came are always storable: keep them whole, untyped.
                data = ev.Data(topic=str(getattr(body, "topic", "")), transport="internal",
                               payload_b64=base64.b64encode(raw).decode("ascii"), size=len(raw),
                               reason=f"not encodable as {event.type} ({type(exc).__name__}); kept as bytes")
                self.counters.reject("unencodable event")
                return self._emit(data, id=event.id, sender=_storable(sender), at=at, kind="rejected", raw=raw)
            event = self._unencodable(event, type(exc).__name__)
        else:
            if self._spooled is not None or (raw is not None and len(raw) > self.inline_limit) \
                    or len(encoded) > MAX_EVENT_BYTES:
                event = self._externalize(event, raw, form)
                encoded = ev.encode(event)
        if kind == "typed":
            self.counters.typed += 1
        elif kind == "raw":
            self.counters.raw += 1
        elif kind == "rejected" and not isinstance(body, ev.Data):
            self.counters.reject("unencodable event")
        self.counters.submitted += 1
        if encoded is not None and self.encoded_sink is not None:
            self.encoded_sink(event, encoded)
        else:
            self.sink(event)
        return event

    def _unencodable(self, event: ev.KnownEvent, why: str) -> ev.KnownEvent:
        text = repr(msgspec.to_builtins(event.body) if not isinstance(event.body, ev.Data) else event.body)
        raw = text.encode("utf-8", "backslashreplace")
        body = ev.Data(topic=getattr(event.body, "topic", ""), transport="internal",
                       text=raw[:PREVIEW_BYTES].decode("utf-8", "ignore"), size=len(raw),
                       reason=f"not encodable ({why}); original type {event.type}, repr preview kept")
        identity = event.sender.identity.encode("utf-8", "backslashreplace").decode("utf-8")
        return ev.make_event(self.room, body, id=event.id, sender=ev.Sender(identity, event.sender.kind), at=event.at)

    def _externalize(self, event: ev.KnownEvent, raw: bytes | None, form: ev.PayloadForm) -> ev.KnownEvent:
        """The event with its payload in the spool and a stub body (see ``ev.stub_body``)."""
        name = ev.payload_object_name(self.room, event.id)
        spooled, self._spooled = self._spooled, None
        if spooled is not None:
            # A stream's bytes, spooled (and uploaded) as they arrived under the name its event
            # id gives; a protocol message names an id of its own, but the stream's name stays
            # (as deterministic: a second bridge reads the same stream id).
            ref = ev.PayloadRef(name=spooled.name, size=spooled.size, sha256=spooled.sha256, form=form)
        elif raw is not None:
            ref = self.spool.keep(name, raw, form)
        else:
            # Decoded from another encoding (the agent session feed): the body's own JSON.
            ref = self.spool.keep(name, msgspec.json.encode(event.body), "body")
        return ev.make_event(self.room, ev.stub_body(event.body), id=event.id, sender=event.sender, at=event.at,
                             observed_at=event.observed_at, payload=ref)

    def _data(self, payload: _Payload, seen: Observation, reason: str) -> ev.KnownEvent:
        raw = payload.raw
        text: str | None = None
        b64: str | None = None
        json: Any = None
        if len(raw) <= self.inline_limit:
            # Above it the bytes go to the Object Store whole: nothing inline to fill.
            if payload.text is not None:
                text = payload.text
            else:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    b64 = base64.b64encode(raw).decode("ascii")
            json = payload.json if payload.is_json else None
        body = ev.Data(
            topic=seen.topic, transport=seen.transport, text=text, payload_b64=b64, json=json, size=len(raw),
            reason=reason, stream_id=seen.stream_id, attributes=dict(seen.attributes or {}),
        )
        if reason:
            self.counters.reject(reason)
        return self._emit(body, id=seen.fallback_id, sender=seen.sender, at=seen.at,
                          kind="rejected" if reason else "raw", raw=raw)

    def _guarded(self, what: str, action: Callable[[], object], observed_at: datetime | None = None) -> None:
        # The time the room callback saw it, for every event this observation makes.
        self._observed_at = observed_at
        try:
            action()
        except Exception as exc:  # bad input must never stop the bridge
            log.warning("ingest: %s failed (%s); recorded as data", what, type(exc).__name__)
            self.counters.last_error = f"{what}: {type(exc).__name__}"
            body = ev.Data(topic="", transport="internal", reason=f"internal error in {what}: {type(exc).__name__}")
            self.counters.reject("internal error")
            try:
                self._emit(body, kind="rejected")
            except Exception:
                log.exception("ingest: could not record an internal error")
        finally:
            self._observed_at = None

    # --- participants and room ----------------------------------------------------------------

    def participant_joined(self, identity: str, *, kind: object = None, sid: str = "", name: str = "",
                           attributes: Mapping[str, str] | None = None, metadata: str = "",
                           tracks: Iterable[str] = (), snapshot: bool = False,
                           at: datetime | None = None) -> None:
        def go() -> None:
            sender = ev.Sender(identity, sender_kind(kind))
            self.participants[identity] = sender
            for track_sid in tracks:
                self.track_owners[track_sid] = identity
            attrs = dict(attributes or {})
            body = ev.ParticipantJoined(identity=identity, sid=sid, name=name, kind=sender.kind,
                                        attributes=attrs, metadata=metadata, snapshot=snapshot)
            event_id: str | None = None
            if snapshot:
                content = msgspec.json.encode([sorted(attrs.items()), metadata, name])
                epoch = f"{self._snapshots}:{self.bridge_id}" if self._snapshots > 1 else "first"
                event_id = ev.derived_event_id(self.room, "participant.snapshot", sid or identity,
                                               epoch, _digest(content))
            else:
                event_id = ev.derived_event_id(self.room, "participant.joined", sid) if sid else None
            self._emit(body, id=event_id, sender=sender, at=at)
            state = attrs.get(ATTR_AGENT_STATE)
            if state and not snapshot:
                self._emit(ev.AgentState(identity=identity, state=state), sender=sender, at=at)

        self._guarded("participant_joined", go)

    def participant_left(self, identity: str, *, sid: str = "", reason: str = "",
                         at: datetime | None = None) -> None:
        def go() -> None:
            sender = self.sender(identity)
            event_id = ev.derived_event_id(self.room, "participant.left", sid) if sid else None
            self._emit(ev.ParticipantLeft(identity=identity, sid=sid, reason=reason), id=event_id,
                       sender=sender, at=at)
            self.participants.pop(identity, None)
            for track_sid in [t for t, owner in self.track_owners.items() if owner == identity]:
                del self.track_owners[track_sid]

        self._guarded("participant_left", go)

    def participant_attributes(self, identity: str, changed: Mapping[str, str],
                               attributes: Mapping[str, str] | None = None, *,
                               old_agent_state: str | None = None, at: datetime | None = None) -> None:
        """Attributes changed. ``lk.agent.state`` in ``changed`` is also recorded as ``agent.state``."""

        def go() -> None:
            sender = self.sender(identity)
            changed_d = dict(changed)
            body = ev.ParticipantAttributes(identity=identity, changed=changed_d,
                                            attributes=dict(attributes if attributes is not None else changed_d))
            self._emit(body, sender=sender, at=at)
            state = changed_d.get(ATTR_AGENT_STATE)
            if state:
                self._emit(ev.AgentState(identity=identity, state=state, old_state=old_agent_state),
                           sender=sender, at=at)

        self._guarded("participant_attributes", go)

    def participant_metadata(self, identity: str, metadata: str, *, at: datetime | None = None) -> None:
        def go() -> None:
            body = ev.ParticipantAttributes(identity=identity, metadata=metadata)
            self._emit(body, sender=self.sender(identity), at=at)

        self._guarded("participant_metadata", go)

    def participant_name(self, identity: str, name: str, *, at: datetime | None = None) -> None:
        def go() -> None:
            self._emit(ev.ParticipantAttributes(identity=identity, name=name), sender=self.sender(identity), at=at)

        self._guarded("participant_name", go)

    def track_published(self, identity: str, track_sid: str) -> None:
        """Remember a track's owner (transcripts name the track, not the speaker). Records nothing."""
        if track_sid:
            self.track_owners[track_sid] = identity

    def room_metadata(self, metadata: str, *, at: datetime | None = None, snapshot: bool = False) -> None:
        def go() -> None:
            event_id = None
            if snapshot:
                epoch = f"{self._snapshots}:{self.bridge_id}" if self._snapshots > 1 else "first"
                event_id = ev.derived_event_id(self.room, "room.metadata.snapshot", epoch,
                                               _digest(metadata.encode("utf-8", "surrogatepass")))
            self._emit(ev.RoomMetadata(metadata=metadata), id=event_id, at=at)

        self._guarded("room_metadata", go)

    def snapshot(self, participants: Iterable[ParticipantObservation], *, room_metadata: str | None = None) -> None:
        """Who is in the room right now (on join, and after every reconnect)."""
        self._snapshots += 1
        for p in participants:
            self.participant_joined(p.identity, kind=p.kind, sid=p.sid, name=p.name, attributes=p.attributes,
                                    metadata=p.metadata, tracks=p.tracks, snapshot=True)
        if room_metadata:
            self.room_metadata(room_metadata, snapshot=True)

    # --- the bridge's own presence -----------------------------------------------------------

    def bridge_joined(self, livekit_url: str = "") -> None:
        self._guarded("bridge_joined", lambda: self._emit(
            ev.BridgeJoined(bridge_id=self.bridge_id, livekit_url=livekit_url),
            sender=ev.Sender(self.bridge_id, "agent")))

    def bridge_gap(self, started_at: datetime, ended_at: datetime, reason: str = "") -> None:
        self.counters.gaps += 1
        event_id = ev.derived_event_id(self.room, "bridge.gap", self.bridge_id, started_at.isoformat())
        self._guarded("bridge_gap", lambda: self._emit(
            ev.BridgeGap(bridge_id=self.bridge_id, started_at=started_at, ended_at=ended_at, reason=reason),
            id=event_id, sender=ev.Sender(self.bridge_id, "agent")))

    def bridge_left(self, reason: str = "") -> None:
        self._guarded("bridge_left", lambda: self._emit(
            ev.BridgeLeft(bridge_id=self.bridge_id, reason=reason), sender=ev.Sender(self.bridge_id, "agent")))

    # --- data packets ---------------------------------------------------------------------------

    def data_packet(self, payload: bytes, *, topic: str | None = None, sender_identity: str | None = None,
                    sender_kind: object = None, at: datetime | None = None) -> None:
        """One data packet (any topic, reliable or lossy). Packets carry no id of their own."""

        def go() -> None:
            seen = Observation(topic or "", "packet", self.sender(sender_identity, sender_kind))
            self._classify(bytes(payload), seen)

        self._guarded("data_packet", go, at)

    def _classify(self, raw: bytes, seen: Observation) -> None:
        topic = seen.topic
        if topic != LEDGER_TOPIC and self._seed_fast(raw, seen):
            return
        payload = _decode_payload(raw, self.max_payload)
        if payload.problem:
            self._data(payload, seen, payload.problem)
            return
        obj = payload.json if payload.is_json else None
        if topic == LEDGER_TOPIC:
            if not isinstance(obj, dict):
                reason = "ledger topic: not a JSON object" if payload.text is not None else "ledger topic: not text"
                self._data(payload, seen, reason)
                return
            self._ledger_protocol(obj, payload, seen)
            return
        if isinstance(obj, dict) and obj.keys() >= _SEED_KEYS and "type" not in obj:
            self._seed(obj, payload, seen)
            return
        self._data(payload, seen, "")

    def _seed_fast(self, raw: bytes, seen: Observation) -> bool:
        """A valid seed-shaped packet as ``agent.status`` in one typed decode; False for anything
        else (which then takes the general path, so every rejection reads as before).

        Same checks as the general path: UTF-8, at most MAX_JSON_DEPTH deep (bounded by counting
        openers), the three seed keys with valid values, no ``type``. This halves the Python cost
        of the commonest packet.
        """
        # Other packets pay only a substring search before the general path.
        if len(raw) > _SEED_FAST_MAX or b'"agent_id"' not in raw \
                or raw.count(b"{") + raw.count(b"[") > MAX_JSON_DEPTH:
            return False
        try:
            raw.decode("utf-8")
            seed = _seed_decoder.decode(raw)
        except (UnicodeDecodeError, msgspec.DecodeError):
            return False
        if seed.type is not msgspec.UNSET:
            return False
        body = ev.AgentStatus(agent_id=seed.agent_id, status=seed.status, action_lock=seed.action_lock,
                              task=seed.task)
        self._emit_status(body, seed.id, seed.at, seen, raw)
        return True

    def _emit_status(self, body: ev.Body, own_id: Any, own_at: Any, seen: Observation, raw: bytes) -> None:
        """A seed packet's event: its own id and time when it carries them, the packet as sent."""
        event_id = protocol_event_id(self.room, own_id) if isinstance(own_id, str) and own_id else seen.fallback_id
        self._emit(body, id=event_id, sender=seen.sender, at=_parse_at(own_at) or seen.at, raw=raw, form="json")

    def _seed(self, obj: dict[str, Any], payload: _Payload, seen: Observation) -> None:
        """The seed shape ``{"agent_id", "status", "action_lock"}`` on any topic -> ``agent.status``."""
        fields = {k: obj[k] for k in ("agent_id", "status", "action_lock", "task") if k in obj}
        try:
            body = ev.body_from_dict("agent.status", fields)
        except MalformedEvent as exc:
            # Without an action_lock the keys alone do not make it a claim on the seed protocol:
            # plain data, no rejection.
            claimed = "action_lock" in obj or seen.topic == LEDGER_TOPIC
            self._data(payload, seen, f"agent status: {exc.detail}" if claimed else "")
            return
        self._emit_status(body, obj.get("id"), obj.get("at"), seen, payload.raw)

    def _ledger_protocol(self, obj: dict[str, Any], payload: _Payload, seen: Observation) -> None:
        """Topic ``ledger``: ``{"type": …, "id": …, <body fields>}`` (or the fields under ``"body"``)."""
        type_name = obj.get("type")
        own_id = obj.get("id")
        if type_name is None and obj.keys() >= _SEED_KEYS:
            self._seed(obj, payload, seen)
            return
        if not isinstance(type_name, str):
            self._data(payload, seen, "ledger protocol: missing or non-string 'type'")
            return
        if type_name not in AGENT_EVENT_TYPES:
            self._data(payload, seen, f"ledger protocol: type {type_name[:64]!r} is not one agents publish")
            return
        if own_id is not None and (not isinstance(own_id, str) or not own_id or len(own_id) > 256):
            self._data(payload, seen, "ledger protocol: 'id' must be a non-empty string of at most 256 characters")
            return
        try:
            body = ev.body_from_dict(type_name, ev.protocol_fields(obj))
        except MalformedEvent as exc:
            self._data(payload, seen, f"ledger protocol: {exc.detail[:200]}")
            return
        event_id = protocol_event_id(self.room, own_id) if own_id else seen.fallback_id
        self._emit(body, id=event_id, sender=seen.sender, at=_parse_at(obj.get("at")) or seen.at, raw=payload.raw,
                   form="json")

    # --- streams --------------------------------------------------------------------------------

    def stream_event_id(self, stream_id: str) -> str:
        """The id a stream's event gets (its payload object is named after it)."""
        return ev.derived_event_id(self.room, "stream", stream_id)

    def stream_payload_name(self, stream_id: str) -> str:
        """Where :mod:`bridge.room` spools a stream too large to be inline."""
        return ev.payload_object_name(self.room, self.stream_event_id(stream_id))

    def _stream(self, what: str, data: str | bytes, *, topic: str, transport: str, stream_id: str,
                sender_identity: str | None, attrs: dict[str, str], timestamp_ms: int | None,
                error: str | None, spooled: ev.PayloadRef | None,
                typed: Callable[[bytes, Observation], None]) -> None:
        def go() -> None:
            seen = Observation(topic, transport, self.sender(sender_identity),
                               self.stream_event_id(stream_id) if stream_id else None,
                               _ms_to_datetime(timestamp_ms), stream_id, attrs)
            if isinstance(data, str):
                try:
                    raw = data.encode("utf-8")
                except UnicodeEncodeError:
                    raw = data.encode("utf-8", "surrogatepass")
            else:
                raw = bytes(data)
            self._spooled = spooled
            try:
                size = spooled.size if spooled is not None else len(raw)
                loaded = spooled is None or len(raw) == spooled.size
                if error or not loaded:
                    if error:
                        reason = f"stream error: {error[:200]}"
                    elif size > self.max_payload and (topic in TYPED_TOPICS or raw.lstrip()[:1] in (b"{", b"[")):
                        reason = over_limit_reason(size, self.max_payload)
                    else:
                        reason = ""
                    if spooled is not None:
                        body = ev.Data(topic=topic, transport=transport, size=size, reason=reason,
                                       stream_id=stream_id, attributes=attrs)
                        if reason:
                            self.counters.reject(reason)
                        self._emit(body, id=seen.fallback_id, sender=seen.sender, at=seen.at,
                                   kind="rejected" if reason else "raw")
                    else:
                        self._data(_Payload(raw), seen, reason)
                    return
                typed(raw, seen)
            finally:
                left, self._spooled = self._spooled, None
                if left is not None:  # nothing took the spooled bytes (a skipped or decoded stream)
                    self.spool.discard(left.name)

        self._guarded(what, go)

    def text_stream(self, text: str | bytes, *, topic: str, stream_id: str = "", sender_identity: str | None = None,
                    attributes: Mapping[str, str] | None = None, timestamp_ms: int | None = None,
                    error: str | None = None, spooled: ev.PayloadRef | None = None) -> None:
        """A text stream read to its end (``attributes`` include those set when it closed).

        ``spooled``: the stream was larger than the inline limit and :mod:`bridge.room` wrote it
        to the spool as it arrived (``text`` is then the whole of it when it is to be parsed, or
        only its head). ``error``: the stream ended abnormally (what arrived is still kept).
        """
        attrs = dict(attributes or {})

        def typed(raw: bytes, seen: Observation) -> None:
            if topic == TOPIC_TRANSCRIPTION:
                self._transcript(raw, seen)
            elif topic == TOPIC_CHAT:
                try:
                    chat_text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    self._data(_Payload(raw), seen, "chat: invalid utf-8")
                    return
                body = ev.ChatMessage(message_id=stream_id, text=chat_text, identity=seen.sender.identity)
                self._emit(body, id=seen.fallback_id, sender=seen.sender, at=seen.at, raw=raw, form="text")
            else:
                self._classify(raw, seen)

        self._stream("text_stream", text, topic=topic, transport="text_stream", stream_id=stream_id,
                     sender_identity=sender_identity, attrs=attrs, timestamp_ms=timestamp_ms, error=error,
                     spooled=spooled, typed=typed)

    def _transcript(self, raw: bytes, seen: Observation) -> None:
        attrs = seen.attributes or {}
        if attrs.get(ATTR_FINAL, "").lower() != "true":
            self.counters.skipped += 1
            return
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._data(_Payload(raw), seen, "transcript: invalid utf-8")
            return
        text = _timed_text(decoded)
        track_id = attrs.get(ATTR_TRACK_ID) or None
        speaker = (self.track_owners.get(track_id) if track_id else None) or seen.sender.identity
        body = ev.Transcript(speaker=speaker, text=text, segment_id=attrs.get(ATTR_SEGMENT_ID, ""),
                             track_id=track_id, language=attrs.get(ATTR_LANGUAGE) or None, final=True)
        # Timed-text lines are not the text itself: such a payload is kept as the body's JSON.
        same = text is decoded
        self._emit(body, id=seen.fallback_id, sender=seen.sender, at=seen.at, raw=raw if same else None,
                   form="text" if same else "")

    def byte_stream(self, data: bytes, *, topic: str, stream_id: str = "", sender_identity: str | None = None,
                    attributes: Mapping[str, str] | None = None, name: str = "", timestamp_ms: int | None = None,
                    error: str | None = None, spooled: ev.PayloadRef | None = None) -> None:
        """A byte stream read to its end. ``lk.agent.session`` is decoded; anything else is ``data``
        (typed when it is a JSON payload of the ledger protocol or the seed shape)."""
        attrs = dict(attributes or {})
        if name:
            attrs.setdefault("name", name)

        def typed(raw: bytes, seen: Observation) -> None:
            if topic == TOPIC_AGENT_SESSION:
                if self._agent_session(raw, seen):
                    return
                self._data(_Payload(raw), seen, "agent session: not a decodable AgentSessionMessage event")
                return
            payload = _decode_payload(raw, self.max_payload)
            if payload.problem:
                # binary or non-JSON bytes are ordinary for a byte stream: keep them untyped, no reason
                self._data(_Payload(raw), seen, "")
                return
            self._classify(raw, seen)

        self._stream("byte_stream", data, topic=topic, transport="byte_stream", stream_id=stream_id,
                     sender_identity=sender_identity, attrs=attrs, timestamp_ms=timestamp_ms, error=error,
                     spooled=spooled, typed=typed)

    def _agent_session(self, raw: bytes, seen: Observation) -> bool:
        """Decode an ``AgentSessionMessage``; record what it carries. False when nothing was usable."""
        sender, at = seen.sender, seen.at
        items = session_feed.decode(raw)
        if items is None:
            return False
        # The feed message is not any one item's payload: the items are recorded, not its bytes.
        if self._spooled is not None:
            self.spool.discard(self._spooled.name)
            self._spooled = None
        for item in items:
            if isinstance(item, session_feed.Other):
                body: ev.Body = ev.Data(topic=TOPIC_AGENT_SESSION, transport="byte_stream", json=item.json,
                                        size=len(raw), reason=item.reason, attributes={"event": item.kind})
                if item.reason:
                    self.counters.reject(item.reason)
                self._emit(body, sender=sender, at=item.at or at, kind="rejected" if item.reason else "raw")
                continue
            body = item.body
            if isinstance(body, ev.ConversationItem):
                event_id = ev.derived_event_id(self.room, "conversation.item", body.item_id) \
                    if body.item_id else None
                # The feed's publisher owns its items (tool calls, its own speech), but a user
                # message in it was said by the user, whom the feed does not name: the fold
                # finds them (ledger.state._user_speaker).
                if body.speaker is None and not (body.item_type == "message" and body.role == "user"):
                    body = msgspec.structs.replace(body, speaker=sender.identity)
            else:
                event_id = ev.derived_event_id(self.room, "session.event", sender.identity, item.key)
                if isinstance(body, ev.AgentState) and not body.identity:
                    body = ev.AgentState(identity=sender.identity, state=body.state, old_state=body.old_state)
            self._emit(body, id=event_id, sender=sender, at=item.at or at)
        if not items:
            self.counters.skipped += 1
        return True


def _storable(sender: ev.Sender) -> ev.Sender:
    """A sender whose identity can be encoded (lone surrogates escaped)."""
    identity = sender.identity.encode("utf-8", "backslashreplace").decode("utf-8")
    return sender if identity == sender.identity else ev.Sender(identity, sender.kind)


def _timed_text(text: str) -> str:
    """Agent transcripts may be JSON ``TimedString`` lines; keep only their text."""
    if not text.startswith("{"):
        return text
    parts: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            obj = msgspec.json.decode(line)
        except (msgspec.DecodeError, RecursionError):
            return text
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            return text
        parts.append(obj["text"])
    return "".join(parts) if parts else text


@dataclass(frozen=True)
class ParticipantObservation:
    """A participant as seen in a snapshot."""

    identity: str
    kind: object = None
    sid: str = ""
    name: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    metadata: str = ""
    tracks: tuple[str, ...] = ()
