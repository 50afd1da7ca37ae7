"""Encoding and decoding events; what the sender sent; payloads kept in the Object Store.

Part of :mod:`room_ledger.events` (import from there).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

import msgspec

from room_ledger.errors import MalformedEvent
from room_ledger.events.bodies import (
    UNKNOWN_SENDER,
    Body,
    PayloadRef,
    Sender,
    new_event_id,
    utcnow,
)
from room_ledger.events.envelopes import (
    _BODY_OF_EVENT,
    _EVENT_FOR_BODY,
    _NO_RAW,
    EVENT_TYPES,
    AgentStatusEvent,
    Event,
    KnownEvent,
    OpaqueEvent,
    _Head,
)
from room_ledger.subjects import room_token

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
