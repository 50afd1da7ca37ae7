"""Every error the ledger raises on purpose.

    LedgerError
    ├── SettingsError           a variable or flag has a bad value (names it and the expected form)
    ├── ConnectError            NATS or Postgres cannot be reached (names the URL and the way out)
    ├── StreamConfigError       the stream exists with settings that cannot be changed in place
    ├── EventError
    │   ├── InvalidRoomName     a room name that cannot be a room (empty, too long)
    │   ├── MalformedEvent      a known event type with a body of the wrong shape (names the field path)
    │   └── EventTooLarge       bigger than the stream's maximum message size (says both numbers)
    ├── AppendError             the server refused an append (carries its err_code)
    │   └── ConflictError       a conditional append lost: the room moved past the expected sequence
    └── UnknownRoom             a room with no events in the log (suggests close names)

Driver errors (nats, asyncpg) are mapped at the boundary with ``raise … from exc`` so callers
catch one tree and still see the cause.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base of every error raised on purpose by room-ledger."""


class SettingsError(LedgerError):
    """A setting has a bad value. The message names the variable and the expected form."""


class ConnectError(LedgerError):
    """A server cannot be reached. The message names it and what to do."""


class StreamConfigError(LedgerError):
    """The stream exists with settings that cannot be reconciled."""


class EventError(LedgerError):
    """An event, or a room name, is not acceptable."""


class InvalidRoomName(EventError, ValueError):
    """A room name that cannot name a room."""


class MalformedEvent(EventError, ValueError):
    """A known event type whose content does not match its schema."""

    def __init__(self, event_type: str, detail: str) -> None:
        super().__init__(f"malformed {event_type!r} event: {detail}")
        self.event_type = event_type
        self.detail = detail


class EventTooLarge(EventError, ValueError):
    """An encoded event that exceeds the stream's maximum message size."""

    def __init__(self, event_id: str, size: int, limit: int) -> None:
        super().__init__(
            f"event {event_id} is {size} bytes, over the stream's limit of {limit} bytes: "
            "split it, or raise LEDGER_MAX_MSG_SIZE (and the server's max_payload)"
        )
        self.event_id = event_id
        self.size = size
        self.limit = limit


class AppendError(LedgerError):
    """The server refused an append."""

    def __init__(self, message: str, *, err_code: int | None = None) -> None:
        super().__init__(message)
        self.err_code = err_code


class ConflictError(AppendError):
    """A conditional append found the room (or category) past the expected sequence."""

    def __init__(self, subject_filter: str, expected: int, message: str = "") -> None:
        super().__init__(
            message or f"{subject_filter} is no longer at sequence {expected}: re-read and retry",
            err_code=10071,
        )
        self.subject_filter = subject_filter
        self.expected = expected


class UnknownRoom(LedgerError):
    """No events for this room in the log."""

    def __init__(self, room: str, close_matches: list[str]) -> None:
        hint = f"; did you mean {', '.join(repr(m) for m in close_matches)}?" if close_matches else ""
        super().__init__(f"no events for room {room!r} in the log{hint}")
        self.room = room
        self.close_matches = close_matches
