"""``ledger replay``: a room's history as a timeline, NDJSON, a state at a point, floor lanes, handoffs.

Everything here streams: records are read in order from an ordered consumer and printed (or
folded) one at a time, so a room of any size replays in constant memory and the first line
appears as soon as the first message arrives. Views that need state (``--at``, ``--floor``,
``--html``) fold with the projections' pure reducers, the same code every other reader uses.
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any, Final

import msgspec

from cli.common import CliError, Point
from ledger import events as ev
from ledger.client import Ledger, Record

#: Conversation items kept in memory while folding for a view that shows only the latest ones.
CONVERSATION_WINDOW: Final = 500


@dataclass(frozen=True)
class Window:
    """Which of a room's records to read."""

    since: Point | None = None
    until: Point | None = None
    types: tuple[str, ...] = ()
    senders: tuple[str, ...] = ()

    def read_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self.since is not None:
            if self.since.seq is not None:
                args["after"] = self.since.seq - 1
            else:
                args["since_time"] = self.since.time
        if self.until is not None and self.until.seq is not None:
            args["until"] = self.until.seq
        if self.types:
            args["types"] = list(self.types)
        return args

    def check(self) -> None:
        if (
            self.since is not None
            and self.until is not None
            and self.since.seq is not None
            and self.until.seq is not None
            and self.until.seq < self.since.seq
        ):
            raise CliError(f"--until {self.until.seq} is before --since {self.since.seq}")
        if (
            self.since is not None
            and self.until is not None
            and self.since.time is not None
            and self.until.time is not None
            and self.until.time < self.since.time
        ):
            raise CliError(f"--until {self.until.describe()} is before --since {self.since.describe()}")


async def records(
    ledger: Ledger, room: str, window: Window = Window(), *, follow: bool = False
) -> AsyncIterator[Record]:
    """The room's records in the window, in log order (after checking the room exists)."""
    window.check()
    if not follow:
        await ledger.require_room(room)
    until_time: datetime | None = window.until.time if window.until is not None else None
    senders = list(window.senders)
    async for record in ledger.read(room, follow=follow, **window.read_args()):
        if until_time is not None and record.time > until_time:
            return
        if senders and not any(fnmatch.fnmatchcase(record.event.sender.identity, p) for p in senders):
            continue
        yield record


# --- NDJSON ---------------------------------------------------------------------------------


def ndjson_line(record: Record) -> bytes:
    """``{"seq":…,"subject":…,"time":…, <the event's own fields>}`` + newline."""
    event = record.event
    body = event.raw.strip() if isinstance(event, ev.OpaqueEvent) else ev.encode(event)
    if not body.startswith(b"{") or len(body) < 2:
        body = msgspec.json.encode({"raw": body.decode("utf-8", "replace")})
    head = b'{"seq":%d,"subject":%s,"time":%s' % (
        record.seq,
        msgspec.json.encode(record.subject),
        msgspec.json.encode(record.time),
    )
    rest = body[1:]
    return head + (b"," + rest if rest != b"}" else rest) + b"\n"


def _binary_stdout() -> IO[bytes]:
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:
        raise CliError("stdout takes no bytes here; NDJSON needs a binary-capable stdout")
    out: IO[bytes] = buffer
    return out


async def replay_ndjson(
    ledger: Ledger, room: str, window: Window, *, follow: bool = False, out: IO[bytes] | None = None
) -> int:
    """Write the room's events as NDJSON (to stdout by default); returns how many.

    Output is buffered, and flushed at the first line (so it shows at once) and, when following,
    after every line.
    """
    out = out if out is not None else _binary_stdout()
    count = 0
    write = out.write
    async for record in records(ledger, room, window, follow=follow):
        write(ndjson_line(record))
        count += 1
        if follow or count == 1:
            out.flush()
    out.flush()
    return count


# --- state at a point ---------------------------------------------------------------------------


def trim_conversation(state: Any, keep: int, *, slack: int = 2) -> int:
    """Keep the latest ``keep`` items once there are ``slack`` times as many; returns how many went.

    Views that show only the latest items fold rooms of any length in bounded memory this way.
    """
    if len(state.conversation) <= keep * slack:
        return 0
    dropped = len(state.conversation) - keep
    del state.conversation[:dropped]
    state.positions = {}  # derived index of the items; the reducers rebuild it
    return dropped


async def fold_room(
    ledger: Ledger, room: str, until: Point | None = None, *, keep_items: int = CONVERSATION_WINDOW
) -> Any:
    """The room's state folded with the projections' reducers up to ``until`` (inclusive)."""
    from projections.reducers import RoomState, apply_safely

    state = RoomState(room=room)
    async for record in records(ledger, room, Window(until=until)):
        apply_safely(state, record)
        trim_conversation(state, keep_items)
    if until is not None and state.seq == 0:
        raise CliError(f"room {room!r} has no events at or before {until.describe()}")
    return state


def state_to_builtins(state: Any, *, last_items: int | None = None) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(state)
    for bookkeeping in ("feeds", "user_feed", "transcribers"):
        data.pop(bookkeeping, None)
    data["seq"] = state.seq
    if last_items is not None:
        data["conversation"] = data["conversation"][-last_items:]
    return data


# --- floor timeline -----------------------------------------------------------------------------


@dataclass
class FloorChange:
    seq: int
    time: datetime
    holder: str | None
    task: str | None
    queue: list[str]
    cause: str


@dataclass
class FloorTimeline:
    room: str
    start: datetime | None = None
    end: datetime | None = None
    first_seq: int = 0
    last_seq: int = 0
    changes: list[FloorChange] = field(default_factory=list)
    #: The reducers' floor history: one tenure per holding.
    tenures: list[Any] = field(default_factory=list)
    holder: str | None = None
    queue: list[str] = field(default_factory=list)
    state: Any = None

    def agents(self) -> list[str]:
        seen: dict[str, None] = {}
        for tenure in self.tenures:
            seen.setdefault(tenure.holder, None)
        for change in self.changes:
            for agent in change.queue:
                seen.setdefault(agent, None)
        return list(seen)

    def queued_spans(self) -> dict[str, list[tuple[datetime, datetime | None]]]:
        """Per agent, the spans it waited in the queue (end None: still waiting)."""
        spans: dict[str, list[tuple[datetime, datetime | None]]] = {}
        waiting: dict[str, datetime] = {}
        for change in self.changes:
            now = set(change.queue)
            for agent in list(waiting):
                if agent not in now:
                    spans.setdefault(agent, []).append((waiting.pop(agent), change.time))
            for agent in change.queue:
                waiting.setdefault(agent, change.time)
        for agent, since in waiting.items():
            spans.setdefault(agent, []).append((since, None))
        return spans

    def to_builtins(self) -> dict[str, Any]:
        return {
            "room": self.room,
            "start": self.start,
            "end": self.end,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "holder": self.holder,
            "queue": self.queue,
            "agents": self.agents(),
            "tenures": msgspec.to_builtins(self.tenures),
            "changes": [
                {"seq": c.seq, "time": c.time, "holder": c.holder, "task": c.task, "queue": c.queue, "cause": c.cause}
                for c in self.changes
            ],
        }


class FloorTracker:
    """Feed records in log order; notes every change of floor holder or queue."""

    def __init__(self, room: str) -> None:
        from projections.reducers import RoomState

        self.state = RoomState(room=room)
        self.timeline = FloorTimeline(room=room, state=self.state)
        self._before: tuple[str | None, str | None, tuple[str, ...]] = (None, None, ())
        # Every tenure, by start sequence: the state keeps only the latest ones in its history.
        self._tenures: dict[int, Any] = {}

    def feed(self, record: Record) -> None:
        from projections.reducers import apply_safely

        state = self.state
        apply_safely(state, record)
        trim_conversation(state, CONVERSATION_WINDOW)
        timeline = self.timeline
        if timeline.start is None:
            timeline.start = record.time
            timeline.first_seq = record.seq
        timeline.end = record.time
        timeline.last_seq = record.seq
        floor = state.floor
        after = (floor.holder, floor.task, tuple(c.agent_id for c in floor.queue))
        if after != self._before:
            timeline.changes.append(
                FloorChange(record.seq, record.time, after[0], after[1], list(after[2]), ev.event_type(record.event))
            )
            self._before = after
            # A change ends at most one tenure and starts at most one: both are among the last few.
            for tenure in floor.history[-3:]:
                self._tenures[tenure.start_seq] = tenure

    def finish(self) -> FloorTimeline:
        floor = self.state.floor
        for tenure in floor.history:
            self._tenures[tenure.start_seq] = tenure
        self.timeline.tenures = [self._tenures[k] for k in sorted(self._tenures)]
        self.timeline.holder = floor.holder
        self.timeline.queue = [c.agent_id for c in floor.queue]
        return self.timeline


async def floor_timeline(ledger: Ledger, room: str, until: Point | None = None) -> FloorTimeline:
    """Fold the room and note every change of holder or queue (who held the floor when)."""
    tracker = FloorTracker(room)
    async for record in records(ledger, room, Window(until=until)):
        tracker.feed(record)
    return tracker.finish()


# --- handoffs -----------------------------------------------------------------------------------


@dataclass
class HandoffRow:
    seq: int
    time: datetime
    from_agent: str
    to_agent: str
    reason: str | None
    via: str
    last_speech: datetime | None = None
    last_speech_seq: int | None = None
    first_speech: datetime | None = None
    first_speech_seq: int | None = None
    #: Each speaker's first speech since the handoff, while the target's identity is not yet known.
    heard: dict[str, tuple[datetime, int]] = field(default_factory=dict, repr=False)

    @property
    def dead_air_s(self) -> float | None:
        if self.last_speech is None or self.first_speech is None:
            return None
        return max(0.0, (self.first_speech - self.last_speech).total_seconds())

    def to_builtins(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time,
            "from": self.from_agent,
            "to": self.to_agent,
            "reason": self.reason,
            "via": self.via,
            "last_speech": self.last_speech,
            "last_speech_seq": self.last_speech_seq,
            "first_speech": self.first_speech,
            "first_speech_seq": self.first_speech_seq,
            "dead_air_s": None if self.dead_air_s is None else round(self.dead_air_s, 3),
        }


def _speaker_of(event: ev.Event) -> str | None:
    """Who is speaking in this event, if it is speech (a final transcript or an assistant message)."""
    match event:
        case ev.TranscriptEvent(body=b) if b.final and b.text.strip():
            return b.speaker
        case ev.ConversationItemEvent(body=b) if b.item_type == "message" and b.role == "assistant":
            return b.speaker or event.sender.identity or None
    return None


def _speech_time(record: Record) -> datetime:
    event = record.event
    if isinstance(event, ev.ConversationItemEvent) and event.body.created_at:
        from datetime import UTC

        return datetime.fromtimestamp(event.body.created_at, UTC)
    return event.at or record.time


class HandoffTracker:
    """Each handoff with its dead air: from the previous agent's last speech to the next one's first.

    Agent ids in a handoff are matched to speakers directly and through the identity that
    published the agent's ``agent.status`` (agent id -> participant identity). Memory: one entry
    per speaker and per handoff, whatever the room's length.
    """

    def __init__(self) -> None:
        self.rows: list[HandoffRow] = []
        self._last_speech: dict[str, tuple[datetime, int]] = {}
        self._identity_of: dict[str, str] = {}
        self._pending: list[HandoffRow] = []

    def _names(self, agent: str) -> set[str]:
        return {agent, self._identity_of.get(agent, agent)}

    def feed(self, record: Record) -> None:
        event = record.event
        if isinstance(event, ev.AgentStatusEvent | ev.FloorRequestEvent) and event.sender.identity:
            self._learn(event.body.agent_id, event.sender.identity)
        elif isinstance(event, ev.ParticipantJoinedEvent | ev.ParticipantAttributesEvent) and (
                name := event.body.attributes.get("lk.agent_name")):
            # A dispatched agent's LiveKit agent name (what handoffs name it by). Its first words can
            # reach the log before its join does (the server announces a participant late).
            self._learn(name, event.body.identity)
        speaker = _speaker_of(event)
        if speaker is not None:
            when = _speech_time(record)
            self._last_speech[speaker] = (when, record.seq)
            for row in list(self._pending):
                if speaker in self._names(row.to_agent):
                    row.first_speech, row.first_speech_seq = when, record.seq
                    self._pending.remove(row)
                elif speaker in self._names(row.from_agent) and (row.last_speech is None or when >= row.last_speech):
                    # The source's words after the handoff (its "transferring you") are the last the caller
                    # heard from it: dead air starts there.
                    row.last_speech, row.last_speech_seq = when, record.seq
                else:
                    row.heard.setdefault(speaker, (when, record.seq))
            return
        found: HandoffRow | None = None
        if isinstance(event, ev.HandoffEvent):
            b = event.body
            found = HandoffRow(record.seq, record.time, b.from_agent, b.to_agent, b.reason, "handoff")
        elif (
            isinstance(event, ev.ConversationItemEvent)
            and event.body.item_type == "agent_handoff"
            and event.body.new_agent_id
            and event.body.old_agent_id  # none: a session starting with its first agent, not a handoff
        ):
            b2 = event.body
            found = HandoffRow(record.seq, record.time, b2.old_agent_id or "?", b2.new_agent_id or "?", None,
                               "conversation.item")
        if found is None:
            return
        row = found
        spoken = [self._last_speech[n] for n in self._names(row.from_agent) if n in self._last_speech]
        if spoken:
            row.last_speech, row.last_speech_seq = max(spoken)
        self.rows.append(row)
        self._pending.append(row)

    def _learn(self, agent: str, identity: str) -> None:
        self._identity_of.setdefault(agent, identity)
        for row in list(self._pending):
            if row.to_agent == agent and identity in row.heard:
                row.first_speech, row.first_speech_seq = row.heard[identity]
                self._pending.remove(row)

    def finish(self, since: Point | None = None) -> list[HandoffRow]:
        if since is None:
            return self.rows
        return [
            r for r in self.rows
            if (since.seq is not None and r.seq >= since.seq) or (since.time is not None and r.time >= since.time)
        ]


async def handoffs(ledger: Ledger, room: str, window: Window = Window()) -> list[HandoffRow]:
    """The room's handoffs (all of the log is read: a handoff's dead air needs what came before)."""
    tracker = HandoffTracker()
    async for record in records(ledger, room, Window(until=window.until)):
        tracker.feed(record)
    return tracker.finish(window.since)
