"""A room's history as timelines: NDJSON lines, floor lanes (who held the floor when), handoffs.

The core's views of a log, used by ``ledger replay``, ``ledger serve``'s room page and the
benchmarks alike. Trackers are fed records in log order, one at a time, and keep memory bounded
whatever the room's length; they fold with the same reducers as every other reader
(:mod:`room_ledger.state`).
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, Final, Literal

import msgspec

from room_ledger import events as ev
from room_ledger import ownership as ownership_rules
from room_ledger import protocol
from room_ledger.ownership import Rejection
from room_ledger.state import RoomState, apply_safely

if TYPE_CHECKING:
    from room_ledger.client import Ledger, Record

#: Conversation items kept in memory while folding for a view that shows only the latest ones.
CONVERSATION_WINDOW: Final = 500



# --- NDJSON ---------------------------------------------------------------------------------


def ndjson_line(record: Record, rejection: Rejection | None = None) -> bytes:
    """``{"seq":…,"subject":…,"time":…, <the event's own fields>}`` + newline; a write the fold
    rejected (a superseded epoch's) has ``"rejected": {"agent_id", "epoch", "reason"}`` after ``time``."""
    event = record.event
    body = event.raw.strip() if isinstance(event, ev.OpaqueEvent) else ev.encode(event)
    if not body.startswith(b"{") or len(body) < 2:
        body = msgspec.json.encode({"raw": body.decode("utf-8", "replace")})
    head = b'{"seq":%d,"subject":%s,"time":%s' % (
        record.seq,
        msgspec.json.encode(record.subject),
        msgspec.json.encode(record.time),
    )
    if rejection is not None:
        head += b',"rejected":' + msgspec.json.encode(
            {"agent_id": rejection.agent_id, "epoch": rejection.epoch, "reason": rejection.reason})
    rest = body[1:]
    return head + (b"," + rest if rest != b"}" else rest) + b"\n"


async def write_ndjson(records: AsyncIterable[Record], out: IO[bytes], *, follow: bool = False,
                       rejections: RejectionTracker | None = None) -> int:
    """Write records as NDJSON lines to ``out``; returns how many. ``rejections``: marks the
    writes the fold rejected (fed every record written).

    Output is buffered, and flushed at the first line (so it shows at once) and, when following,
    after every line.
    """
    count = 0
    write = out.write
    async for record in records:
        write(ndjson_line(record, rejections.feed(record) if rejections is not None else None))
        count += 1
        if follow or count == 1:
            out.flush()
    out.flush()
    return count


# --- writes the fence rejected ------------------------------------------------------------------

#: What the fence's decisions depend on: the fenced writes, the events that may grant ownership,
#: and what else moves the floor (a handoff grants only if its source holds the floor).
FENCE_INPUTS: Final[frozenset[type]] = (
    ownership_rules.FENCED_TYPES | ownership_rules.GRANTING_TYPES | {ev.ParticipantLeftEvent})
FENCE_INPUT_TYPES: Final = sorted(tag for tag, cls in ev.EVENT_TYPES.items() if cls in FENCE_INPUTS)


class RejectionTracker:
    """Which records the fold rejects as writes from a superseded epoch (:mod:`room_ledger.ownership`).

    Fed records in log order; it folds only the fence's inputs (the floor and ownership), with the
    same reducers as every reader, so a timeline marks what the projector and hydration ignored.
    A view showing part of a room (``--since``, ``--type``, ``--sender``) calls :meth:`read_ahead`
    first: the fence's inputs of the whole room, to the head as of then.
    """

    def __init__(self) -> None:
        self.state = RoomState()
        #: Rejections found by read_ahead, by sequence (the records a view shows are looked up).
        self._ahead: dict[int, Rejection] = {}

    def feed(self, record: Record) -> Rejection | None:
        """The record's rejection, or None when the fold applies it (or it is no fenced write)."""
        if record.seq <= self.state.seq:
            return self._ahead.get(record.seq)
        if type(record.event) not in FENCE_INPUTS:
            return None
        counted = self.state.index.rejected
        apply_safely(self.state, record)
        return self.state.ownership.rejected[-1] if self.state.index.rejected != counted else None

    async def read_ahead(self, ledger: Ledger, room: str, until: int | None = None) -> None:
        async for record in ledger.read(room, types=FENCE_INPUT_TYPES, until=until):
            rejection = self.feed(record)
            if rejection is not None:
                self._ahead[record.seq] = rejection


# --- state --------------------------------------------------------------------------------------


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
        self.state = RoomState(room=room)
        self.timeline = FloorTimeline(room=room, state=self.state)
        self._before: tuple[str | None, str | None, tuple[str, ...]] = (None, None, ())
        # Every tenure, by start sequence: the state keeps only the latest ones in its history.
        self._tenures: dict[int, Any] = {}

    def feed(self, record: Record) -> None:
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


async def floor_timeline(ledger: Ledger, room: str) -> FloorTimeline:
    """Fold the room's whole log and note every change of holder or queue (who held the floor when)."""
    tracker = FloorTracker(room)
    async for record in ledger.read(room):
        tracker.feed(record)
    return tracker.finish()


# --- handoffs -----------------------------------------------------------------------------------


#: A source's "speaking" this soon after its last words ended is those words' state seen twice, not
#: new speech (a progress line comes seconds later).
SAME_SPEECH_GAP_S: Final = 0.3
#: How a handoff ended: the target spoke or took the floor ("ok"), the source recorded it as failed
#: and kept the caller ("failed"), or the log does not say yet ("pending").
HandoffOutcomeName = Literal["ok", "failed", "pending"]


@dataclass
class HandoffRow:
    """One handoff and what the caller lived through.

    Times are the speakers' own where the log has them: a speech *starts* when its transcript
    stream opened (the transcript's ``at``) or its agent entered ``speaking``, and *ends* when the
    bridge had its final segment (the transcript's ``observed_at``) or the agent left ``speaking``
    (with audio, when its last frame played). Dead air is measured from the end of the source's
    last speech begun before the handoff to the start of the target's first speech; ``waited_s`` is
    the silence the caller sat through, until anyone spoke (a progress line, a failure notice).
    """

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
    outcome: HandoffOutcomeName = "pending"
    #: The first speech by anyone after the source's last words (the target's, or the source's own
    #: progress line or failure notice).
    heard_again: datetime | None = None
    heard_again_seq: int | None = None
    #: Why it failed (the recorded failure's reason).
    error: str | None = None
    #: Each speaker's first speech since the handoff, while the target's identity is not yet known.
    heard: dict[str, tuple[datetime, int]] = field(default_factory=dict, repr=False)

    @property
    def dead_air_s(self) -> float | None:
        """Silence between the source's last words and the target's first (None: not both known)."""
        if self.last_speech is None or self.first_speech is None:
            return None
        return max(0.0, (self.first_speech - self.last_speech).total_seconds())

    @property
    def waited_s(self) -> float | None:
        """Silence the caller sat through after the source's last words, whoever broke it."""
        if self.last_speech is None or self.heard_again is None:
            return None
        return max(0.0, (self.heard_again - self.last_speech).total_seconds())

    def to_builtins(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time,
            "from": self.from_agent,
            "to": self.to_agent,
            "reason": self.reason,
            "via": self.via,
            "outcome": self.outcome,
            "error": self.error,
            "last_speech": self.last_speech,
            "last_speech_seq": self.last_speech_seq,
            "first_speech": self.first_speech,
            "first_speech_seq": self.first_speech_seq,
            "dead_air_s": None if self.dead_air_s is None else round(self.dead_air_s, 3),
            "heard_again": self.heard_again,
            "waited_s": None if self.waited_s is None else round(self.waited_s, 3),
        }


@dataclass(frozen=True)
class _Speech:
    speaker: str
    start: datetime | None
    end: datetime | None
    #: From an assistant message only (its time is when the reply was generated, not spoken): used
    #: for a speaker the log has no transcript or agent state of (logs of older bridges).
    fallback: bool = False


def _speech_of(record: Record) -> _Speech | None:
    """What this record says of someone's speech: its start, its end, or both."""
    event = record.event
    match event:
        case ev.TranscriptEvent(body=b) if b.final and b.text.strip() and b.speaker:
            return _Speech(b.speaker, event.at or event.observed_at, event.observed_at)
        case ev.AgentStateEvent(body=b) if b.identity:
            if b.state == "speaking":
                return _Speech(b.identity, event.at or record.time, None)
            if b.old_state == "speaking":
                return _Speech(b.identity, None, event.at or record.time)
        case ev.ConversationItemEvent(body=b) if b.item_type == "message" and b.role == "assistant":
            speaker = b.speaker or event.sender.identity
            if speaker:
                when = datetime.fromtimestamp(b.created_at, UTC) if b.created_at else event.at or record.time
                return _Speech(speaker, when, when, fallback=True)
    return None


class HandoffTracker:
    """Each handoff with its dead air: from the previous agent's last speech to the next one's first.

    Agent ids in a handoff are matched to speakers directly and through the identity that
    published the agent's ``agent.status`` (agent id -> participant identity). A handoff the
    source records as failed (the caller handed back, reason ``handoff failed: …``) marks the
    attempt's row ``failed`` rather than adding a row. Memory: one entry per speaker and per
    handoff, whatever the room's length.
    """

    def __init__(self) -> None:
        self.rows: list[HandoffRow] = []
        #: speaker -> (end of its latest speech, its sequence)
        self._last_end: dict[str, tuple[datetime, int]] = {}
        #: speakers with real speech markers (transcripts, agent states)
        self._marked: set[str] = set()
        #: speaker -> when it last entered "speaking"
        self._began: dict[str, datetime] = {}
        self._identity_of: dict[str, str] = {}
        self._pending: list[HandoffRow] = []
        #: rows still waiting for anyone to speak (waited_s)
        self._silent: list[HandoffRow] = []

    def _names(self, agent: str) -> set[str]:
        return {agent, self._identity_of.get(agent, agent)}

    def feed(self, record: Record) -> None:
        event = record.event
        if isinstance(event, ev.AgentStatusEvent | ev.FloorRequestEvent) and event.sender.identity:
            self._learn(event.body.agent_id, event.sender.identity)
        elif isinstance(event, ev.ParticipantJoinedEvent | ev.ParticipantAttributesEvent) and (
                name := event.body.attributes.get(protocol.ATTR_AGENT_NAME)):
            # A dispatched agent's LiveKit agent name (what handoffs name it by). Its first words can
            # reach the log before its join does (the server announces a participant late).
            self._learn(name, event.body.identity)
        speech = _speech_of(record)
        if speech is not None:
            self._speech(speech, record.seq)
            return
        if isinstance(event, ev.HandoffEvent):
            b = event.body
            if b.reason and b.reason.startswith(ev.FAILED_HANDOFF_PREFIX) and self._failed(b):
                return
            self._open(HandoffRow(record.seq, record.time, b.from_agent, b.to_agent, b.reason, "handoff"))
        elif (
            isinstance(event, ev.ConversationItemEvent)
            and event.body.item_type == "agent_handoff"
            and event.body.new_agent_id
            and event.body.old_agent_id  # none: a session starting with its first agent, not a handoff
        ):
            b2 = event.body
            self._open(HandoffRow(record.seq, record.time, b2.old_agent_id or "?", b2.new_agent_id or "?", None,
                                  "conversation.item"))

    def _open(self, row: HandoffRow) -> None:
        ends = [self._last_end[n] for n in self._names(row.from_agent) if n in self._last_end]
        if ends:
            row.last_speech, row.last_speech_seq = max(ends)
        self.rows.append(row)
        self._pending.append(row)
        self._silent.append(row)

    def _failed(self, back: ev.Handoff) -> bool:
        """The source recorded an attempt as failed: that attempt's row says so."""
        for row in reversed(self.rows):
            if row.to_agent == back.from_agent and row.from_agent == back.to_agent and row.outcome == "pending":
                row.outcome = "failed"
                row.error = (back.reason or "")[len(ev.FAILED_HANDOFF_PREFIX):]
                if row in self._pending:
                    self._pending.remove(row)
                return True
        return False

    def _speech(self, speech: _Speech, seq: int) -> None:
        speaker = speech.speaker
        if speech.fallback and speaker in self._marked:
            return  # its transcripts and states say when it spoke
        if not speech.fallback:
            self._marked.add(speaker)
        if speech.end is None:
            assert speech.start is not None
            self._began[speaker] = speech.start
            self._started(speaker, speech.start, seq)
            return
        # An end: of a turn the speaker began when it entered "speaking" (a state change), or of a
        # transcript, which knows its start (and is the first the log hears of that speech).
        began = speech.start if speech.start is not None else self._began.get(speaker)
        before = self._last_end.get(speaker)
        if before is None or speech.end >= before[0]:
            self._last_end[speaker] = (speech.end, seq)
        for row in self._pending:
            # Words the source began before the handoff (its "transferring you", recorded when they
            # end) are its last: dead air starts at their end. What it says after (a progress line,
            # a failure notice) is not.
            if (speaker in self._names(row.from_agent) and (began is None or began <= row.time)
                    and (row.last_speech is None or speech.end >= row.last_speech)):
                row.last_speech, row.last_speech_seq = speech.end, seq
        if speech.start is not None:
            self._started(speaker, speech.start, seq)

    def _started(self, speaker: str, start: datetime, seq: int) -> None:
        """``speaker`` began speaking at ``start``: a target's first words, or the caller's silence broken."""
        for row in list(self._pending):
            if start <= row.time and speaker in self._names(row.from_agent):
                continue  # the source's last words, begun before the handoff
            if speaker in self._names(row.to_agent):
                row.first_speech, row.first_speech_seq = start, seq
                row.outcome = "ok"
                self._pending.remove(row)
            else:
                row.heard.setdefault(speaker, (start, seq))
        for row in list(self._silent):
            if speaker in self._names(row.from_agent) and (
                    start <= row.time or (row.last_speech is not None
                                          and (start - row.last_speech).total_seconds() < SAME_SPEECH_GAP_S)):
                # its last words again: a second copy of their state change (the participant's
                # attribute, stamped when the bridge saw it, beside the session feed's)
                continue
            if row.last_speech is not None and start > row.last_speech:
                row.heard_again, row.heard_again_seq = start, seq
                self._silent.remove(row)
            elif row.outcome != "pending" and row.last_speech is None:
                self._silent.remove(row)

    def _learn(self, agent: str, identity: str) -> None:
        self._identity_of.setdefault(agent, identity)
        for row in list(self._pending):
            if row.to_agent == agent and identity in row.heard:
                row.first_speech, row.first_speech_seq = row.heard[identity]
                row.outcome = "ok"
                self._pending.remove(row)

    def finish(self, since_seq: int | None = None, since_time: datetime | None = None) -> list[HandoffRow]:
        """The handoffs (those at or after ``since_seq`` or ``since_time`` when given)."""
        if since_seq is None and since_time is None:
            return self.rows
        return [
            r for r in self.rows
            if (since_seq is not None and r.seq >= since_seq) or (since_time is not None and r.time >= since_time)
        ]


# --- who spoke when ----------------------------------------------------------------------------


@dataclass
class SpeechSpan:
    speaker: str
    start: datetime
    end: datetime
    text: str = ""


#: The caller's lane when the room has no single person to name it after.
CALLER_LANE: Final = "caller"


class SpeechTracker:
    """Who spoke when: per speaker, the spans of speech the log shows.

    An agent speaks while its ``agent.state`` is ``speaking`` (its playout); the caller speaks while
    an agent's session says the user is (``user_state_changed`` in the ``lk.agent.session`` feed:
    its VAD), or, without a feed, over a final transcript (stream opened to read). Spans that
    overlap on one lane (several agents reporting the same caller) are merged. Memory: the last
    ``keep`` spans.
    """

    def __init__(self, keep: int = 1000) -> None:
        self.spans: list[SpeechSpan] = []
        self.keep = keep
        self._open: dict[str, datetime] = {}
        self._state = RoomState()
        self._feeds_user_state = False

    def feed(self, record: Record) -> None:
        event = record.event
        when = event.at or record.time
        if isinstance(event, ev.ParticipantJoinedEvent | ev.ParticipantLeftEvent):
            apply_safely(self._state, record)
        match event:
            case ev.AgentStateEvent(body=b) if b.identity:
                if b.state == "speaking":
                    self._open.setdefault(b.identity, when)
                elif b.identity in self._open:
                    self._close(b.identity, when)
            case ev.DataEvent(body=b) if b.topic == protocol.TOPIC_AGENT_SESSION and b.attributes.get("event") == \
                    "user_state_changed" and isinstance(b.json, dict):
                self._feeds_user_state = True
                lane = self._caller()
                # (bridges before this printed no field at its default: no new_state is US_SPEAKING)
                new = b.json.get("new_state", "US_SPEAKING" if "old_state" in b.json else None)
                if new == "US_SPEAKING":
                    self._open.setdefault(lane, when)
                elif new is not None and lane in self._open:
                    self._close(lane, when)
            case ev.TranscriptEvent(body=b) if b.final and b.speaker and not self._feeds_user_state:
                if not self._is_agent(b.speaker):
                    self._add(SpeechSpan(b.speaker, event.at or event.observed_at, event.observed_at, b.text))

    def _caller(self) -> str:
        people = [p.identity for p in self._state.participants.values()
                  if p.present and p.kind in ("standard", "sip")]
        return people[0] if len(people) == 1 else CALLER_LANE

    def _is_agent(self, identity: str) -> bool:
        p = self._state.participants.get(identity)
        return p is not None and p.kind == "agent"

    def _close(self, lane: str, when: datetime) -> None:
        start = self._open.pop(lane)
        self._add(SpeechSpan(lane, start, max(start, when)))

    def _add(self, span: SpeechSpan) -> None:
        for other in reversed(self.spans[-8:]):
            if other.speaker == span.speaker and other.start <= span.end and span.start <= other.end:
                other.start, other.end = min(other.start, span.start), max(other.end, span.end)
                other.text = other.text or span.text
                return
        self.spans.append(span)
        if len(self.spans) > self.keep * 2:
            del self.spans[: len(self.spans) - self.keep]

    def finish(self, now: datetime | None = None) -> list[SpeechSpan]:
        """The spans, with speech still going on ending at ``now`` (the last event's time)."""
        spans = self.spans[-self.keep:]
        if now is not None:
            spans = [*spans, *(SpeechSpan(lane, start, max(start, now)) for lane, start in self._open.items())]
        return sorted(spans, key=lambda s: s.start)


async def handoffs(ledger: Ledger, room: str) -> list[HandoffRow]:
    """The room's handoffs, each with its dead air (the whole log is read)."""
    tracker = HandoffTracker()
    async for record in ledger.read(room):
        tracker.feed(record)
    return tracker.finish()
