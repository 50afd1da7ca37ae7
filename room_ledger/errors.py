"""Every error the ledger raises on purpose.

    LedgerError
    ├── SettingsError           a variable or flag has a bad value (names it and the expected form)
    ├── ConnectError            NATS or Postgres cannot be reached (names the URL and the way out)
    │   └── Unavailable         transient: the server is away for now, retrying can succeed
    │       ├── LogUnavailable        NATS / JetStream
    │       └── DatabaseUnavailable   PostgreSQL (asyncpg's connection errors, SQLSTATE 08, 53, 57, 58, 40001, 40P01)
    ├── StreamConfigError       the stream exists with settings that cannot be changed in place
    ├── EventError
    │   ├── InvalidRoomName     a room name that cannot be a room (empty, too long)
    │   ├── MalformedEvent      a known event type with a body of the wrong shape (names the field path)
    │   ├── EventTooLarge       bigger than the stream's maximum message size (says both numbers)
    │   └── PayloadTooLarge     (ledger.events) over LEDGER_MAX_PAYLOAD: the helpers refuse to send it
    ├── AppendError             the server refused an append (carries its err_code)
    │   └── ConflictError       a conditional append lost: the room moved past the expected sequence
    ├── UnknownRoom             a room with no events in the log (suggests close names)
    ├── EmbeddedError           the embedded nats-server / PostgreSQL cannot be started, found or stopped
    ├── CheckpointMoved         a projection's checkpoint row moved under its worker (it reloads)
    ├── HydrateTimeout          (ledger.hydrate) the state did not reach ``min_seq`` in time
    ├── RoleUnavailable         (ledger.roles) no role of a claim was free in time
    ├── WatchTimeout            (ledger.watch) what a watch waited for did not come in time (says what the log has)
    ├── HandoffFailed           (ledger.handoff) a handoff did not complete; the source keeps the caller
    ├── Superseded              this process's ownership epoch was superseded (another took the call): shut down
    ├── WebhookRejected, WebhookUnroutable   (bridge.webhooks: the ingest wing)
    └── CliError                (cli.common) a command cannot do what was asked (one line, exit 1)

Driver errors are mapped at one boundary each, with ``raise … from exc`` so callers catch one
tree and still see the cause: JetStream's by their ``err_code`` (:mod:`room_ledger.eventlog`),
PostgreSQL's by asyncpg's exception classes and SQLSTATE (:func:`room_ledger.db.database_errors`).
Whether an error is worth retrying is its type: :class:`Unavailable` is, the rest are not.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base of every error raised on purpose by room-ledger."""


class SettingsError(LedgerError):
    """A setting has a bad value. The message names the variable and the expected form."""


class ConnectError(LedgerError):
    """A server cannot be reached. The message names it and what to do; ``server`` says which."""

    default_server = "NATS"

    def __init__(self, message: str, *, server: str | None = None) -> None:
        super().__init__(message)
        self.server: str = server or self.default_server


class Unavailable(ConnectError):
    """A server is away for now (down, restarting, overloaded, connection lost): retrying can succeed."""


class LogUnavailable(Unavailable):
    """NATS / JetStream is away for now."""


class DatabaseUnavailable(Unavailable):
    """PostgreSQL is away for now."""

    default_server = "PostgreSQL"


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


class EmbeddedError(LedgerError):
    """The embedded server could not be started, found or stopped; the message says what to do."""


class CheckpointMoved(LedgerError):
    """The checkpoint row is not where this worker left it (another worker, or a rebuild swap)."""


class UnknownRoom(LedgerError):
    """No events for this room in the log."""

    def __init__(self, room: str, close_matches: list[str]) -> None:
        hint = f"; did you mean {', '.join(repr(m) for m in close_matches)}?" if close_matches else ""
        super().__init__(f"no events for room {room!r} in the log{hint}")
        self.room = room
        self.close_matches = close_matches


class Superseded(LedgerError):
    """This process owned a call at an epoch the room's log has since superseded (its call was
    handed to another agent, or to a newer process of the same agent, while it was paused or cut
    off): the fold ignores its writes, so the helpers refuse them. Stop the process's session."""

    def __init__(self, agent_id: str, epoch: int, reason: str, room: str = "") -> None:
        where = f" in room {room!r}" if room else ""
        super().__init__(
            f"agent {agent_id!r}{where} owned its call at epoch {epoch}, which the log has superseded ({reason}): "
            "another process has the call now and every write from this one is ignored; shut this session down "
            "(a new owner hydrates the room and goes on)"
        )
        self.agent_id = agent_id
        self.epoch = epoch
        self.reason = reason
        self.room = room
