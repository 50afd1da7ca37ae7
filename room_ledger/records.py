"""What the log hands out: a stored event with its place (:class:`Record`), where an append
landed (:class:`Position`), and reading both off JetStream's wire forms."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from room_ledger import events as ev


@dataclass(frozen=True, slots=True)
class Position:
    """Where an appended event sits in the stream."""

    seq: int
    #: True when the server already had an event with this id (stored once, not an error).
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Record:
    """An event as read from the log: the event with its stream sequence, subject and time."""

    seq: int
    subject: str
    time: datetime
    event: ev.Event

    @property
    def room(self) -> str:
        return self.event.room

    @property
    def type(self) -> str:
        return ev.event_type(self.event)


@dataclass(frozen=True, slots=True)
class RoomSummary:
    room: str
    events: int


@dataclass(frozen=True, slots=True)
class RoomBounds:
    """A room's first and last stored events (None when the room has none)."""

    first_seq: int | None = None
    first_time: datetime | None = None
    last_seq: int | None = None
    last_time: datetime | None = None


def ack_position(reply: str) -> tuple[int, datetime]:
    """Stream sequence and storage time from a JetStream delivery's reply subject.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>`` (or the form with
    domain and account hash before the stream): nats-py's ``msg.metadata`` parses all of it,
    each time it is read; a reader of the log needs two fields.
    """
    tokens = reply.split(".")
    if len(tokens) == 9:
        seq, nanos = tokens[5], tokens[7]
    else:
        seq, nanos = tokens[7], tokens[9]
    return int(seq), stored_time(int(nanos))


def stored_time(nanos: int) -> datetime:
    """JetStream's storage time (ns since the epoch) as a UTC datetime, cut to microseconds.

    Epoch plus a timedelta: a third of the cost of fromtimestamp(…, UTC), which a whole-stream
    reader pays once per event.
    """
    return _EPOCH + timedelta(microseconds=nanos // 1000)


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def rfc3339_time(stamp: str) -> datetime:
    """JetStream's ``Nats-Time-Stamp`` (nanoseconds, ``Z``) as a datetime, cut to microseconds
    like :func:`ack_position`, so both read paths give the same time."""
    head, _, fraction = stamp.rstrip("Z").partition(".")
    micros = int((fraction + "000000")[:6]) if fraction else 0
    return datetime.fromisoformat(head).replace(tzinfo=UTC, microsecond=micros)


def needs_payload(event: ev.Event) -> bool:
    """An event whose body lives in the Object Store (readers load it before handing it out)."""
    return not isinstance(event, ev.OpaqueEvent) and event.payload is not None and bool(event.payload.form)
