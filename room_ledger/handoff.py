"""Cross-process handoff of a LiveKit Agents ``AgentSession``: one tool on the source, one call on the target.

In-process, an ``Agent`` hands the caller to another by returning it from a function tool. Across
processes the other agent runs in another worker, so this module does the same through the
room's log and LiveKit's agent dispatch::

    # both workers: one link per job, then the session as usual
    async def entrypoint(ctx: JobContext) -> None:
        link = await LedgerLink.open(ctx)                  # Ledger from the LEDGER_* environment
        resumed = await link.resume(CallData)              # target: None unless dispatched by a handoff
        session = AgentSession(llm=..., userdata=resumed.userdata if resumed else CallData())
        agent = Billing() if resumed else Triage()
        if resumed:                                        # function calls and their outputs kept
            await agent.update_chat_ctx(resumed.chat_ctx, exclude_invalid_function_calls=False)
        await ctx.connect()
        await session.start(agent, room=ctx.room, room_options=...)
        await link.attach(session)                        # userdata published per turn; the floor

    class Triage(Agent):
        def __init__(self) -> None:
            super().__init__(instructions="...", tools=[transfer_tool(agents=["billing"])])

``transfer_to(agent_name, reason)`` returns at once (the LLM tells the caller it is transferring);
then, in the background: the tool's call and output reach the log (from the session's own
``lk.agent.session`` feed), the userdata is published, the ``handoff`` is appended and its
sequence known, the target is dispatched with metadata ``{"room", "ledger_seq"}``, and the source
keeps the caller (it ignores their typing meanwhile, so no message is answered twice) until the
target holds the floor, then its job shuts down. If the target never takes the floor (no worker
under that name, a crash, a timeout) or the handoff lost a race (another handoff released the
floor first: log order decides), the dispatch is deleted, the failure is recorded as the caller
handed back (``handoff`` from the target to the source, reason ``handoff failed: …``), the source
claims the floor again, says so and goes on.

The target's :meth:`LedgerLink.resume` hydrates to the handoff's sequence and returns the
conversation as a ``ChatContext`` (function calls, outputs and timestamps kept), the typed
userdata and the reason; :meth:`LedgerLink.attach` takes the floor, which is what the source
waits for.

Fencing (:mod:`room_ledger.ownership`): the target owns the call from the handoff's sequence (its
epoch, which its session patches, floor claims and status carry), and the source's epoch is
superseded there; the record of a failed handoff gives the source the call back at a new one. A
process whose epoch the log has superseded (paused while its successor took over) gets
:class:`~room_ledger.errors.Superseded` from the link's helpers, and its writes count for nothing.

Warm standby: :meth:`LedgerLink.warm_up` dispatches the target when the call starts; its job
starts its session and calls :meth:`LedgerLink.standby`, which follows the room's log, announces
the standby (``agent.status`` idle, task ``standby``) and returns at the first handoff naming it
that passes the floor, from the state it already follows. A source that sees the announcement
dispatches nothing (after ``STANDBY_GRACE_S`` without the standby taking the floor, it
dispatches after all). A standby takes only handoffs made after it announced itself: for an
earlier one the source has dispatched a cold target already.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec
from livekit import api
from livekit.agents import AgentSession, RunContext, ToolError, function_tool
from livekit.agents.llm import FunctionTool

from room_ledger import events as ev
from room_ledger import handoff_input as caller_side
from room_ledger import state as rd
from room_ledger import tracing
from room_ledger.agents import HandoffRequest, LedgerAgent, handoff_from_metadata, handoff_took_effect
from room_ledger.client import Ledger
from room_ledger.errors import SettingsError, Superseded
from room_ledger.handoff_results import HandoffFailed, HandoffOutcome, Resumed
from room_ledger.hydrate import Snapshot, hydrate  # (and the reducers: loaded now, not on a job's event loop)
from room_ledger.livekit_api import livekit_api
from room_ledger.settings import Settings
from room_ledger.turns import TurnGate, TurnPolicy

if TYPE_CHECKING:
    from livekit import rtc
    from livekit.agents import JobContext
    from livekit.agents.voice.events import AgentStateChangedEvent, UserStateChangedEvent

    from room_ledger.client import Record

log = logging.getLogger("ledger.handoff")

T = TypeVar("T")

#: The reason of the ``handoff`` that records a failed one (the caller handed back to the source).
FAILED_PREFIX: Final = ev.FAILED_HANDOFF_PREFIX
#: Dispatch metadata of a warm standby: ``{"standby": true, "room": ...}``.
STANDBY_KEY: Final = "standby"
#: The ``agent.status`` task a standby announces itself with.
STANDBY_TASK: Final = "standby"
#: The longest the source's reply to the transfer may play before the handoff goes ahead anyway.
LAST_WORDS_WAIT_S: Final = 10.0
#: How long a source waits for a standby to take the floor before dispatching the target after all.
STANDBY_GRACE_S: Final = 3.0
#: How long the target has to take the floor before a transfer fails and the source keeps the caller.
#: A cold dispatch takes over in 0.5-1.5 s here (bench/handoff.py; a job in a new process, the
#: slowest, up to about 3 s): 10 s is several times the worst seen, and short enough for a caller.
DEFAULT_TRANSFER_TIMEOUT_S: Final = 10.0
#: Seconds of waiting, once the handoff is in the log, before the caller hears a progress line.
DEFAULT_PROGRESS_AFTER_S: Final = 4.0
DEFAULT_PROGRESS_MESSAGE: Final = "I'm still connecting you to {agent}. Thank you for waiting."
DEFAULT_FAILURE_MESSAGE: Final = "Sorry, I could not reach {agent} just now. I'm still here with you."
#: The longest a failure notice may play before the caller's held messages are answered anyway.
NOTICE_WAIT_S: Final = 20.0
#: The longest a voice source waits, before leaving, for the caller to finish a turn and for it to be kept.
CALLER_QUIET_S: Final = 6.0
#: How long a handoff's target treats its own hearing of words it caught up on as the same turn.
CATCH_UP_ECHO_S: Final = 5.0
#: How long the source waits for its tool's call and output to reach the log before handing off.
TOOL_OUTPUT_WAIT_S: Final = 5.0
#: How long a source taking the call back waits to see its failed handoff's record in the log: the
#: record is its new epoch, which its floor claim must carry (a claim stamped with the epoch it
#: handed off would be fenced). A packet reaches the log in milliseconds.
RECLAIM_WAIT_S: Final = 5.0
#: Agent states that end a turn (the session waits for the user again).
_TURN_OVER: Final = frozenset({"listening", "idle"})
_IN_TURN: Final = frozenset({"thinking", "speaking"})

_links: weakref.WeakKeyDictionary[AgentSession[Any], LedgerLink] = weakref.WeakKeyDictionary()


class LedgerLink:
    """One job's link to the room's log: userdata published per turn, the floor, handoffs both ways."""

    def __init__(self, room: rtc.Room, ledger: Ledger, *, agent_id: str, owns_ledger: bool = False,
                 job: JobContext | None = None, livekit_api: api.LiveKitAPI | None = None,
                 metadata: str = "") -> None:
        self.room = room
        self.ledger = ledger
        self.agent_id = agent_id
        self.agent = LedgerAgent(room, ledger, agent_id=agent_id)
        self.session: AgentSession[Any] | None = None
        #: Every transfer this link started, in order.
        self.transfers: list[HandoffOutcome] = []
        self._owns_ledger = owns_ledger
        self._job = job
        self._api = livekit_api
        self._metadata = metadata
        self._resumed: Resumed[Any] | None = None
        #: A handoff's target, until its first reply: the resume's trace context and when it began.
        self._reply_trace: tuple[str | None, float] | None = None
        self._sync_wanted = asyncio.Event()
        self._sync_task: asyncio.Task[None] | None = None
        self._transfer_task: asyncio.Task[None] | None = None
        self._attached = asyncio.Event()
        self._handed_seq = 0
        #: What the caller types or says while this agent hands off (held, then the target's).
        self._input = caller_side.HeldInput(agent_id)
        self._replays: set[asyncio.Future[Any]] = set()
        self._progress = caller_side.ProgressLine(None, "")
        #: A handoff's source, by participant identity (a target defers to its hearing until it left).
        self._source_identity = ""
        #: time.time() of the caller's last start of speech, and of this link's last transfer.
        self._user_spoke_at = 0.0
        self._transfer_started_at = 0.0
        #: Floor-gated replies, when attached with ``floor=``.
        self.turn_gate: TurnGate | None = None
        self._closed = False

    # --- setting up -------------------------------------------------------------------------------

    @classmethod
    async def open(cls, ctx: JobContext, ledger: Ledger | None = None, *, agent_id: str | None = None) -> LedgerLink:
        """The link of a worker job; closed when the job shuts down.

        ``ledger``: one you opened (kept open); by default one is opened from the ``LEDGER_*``
        environment and closed with the job. ``agent_id``: the name the floor and handoffs know
        this agent by (default: the job's agent name, which is what another worker dispatches).
        """
        owns = ledger is None
        if ledger is None:
            ledger = Ledger(Settings.from_env(), name=f"ledger-agent-{ctx.job.agent_name or 'agent'}")
            await ledger.connect()
        link = cls(ctx.room, ledger, agent_id=agent_id or ctx.job.agent_name or "agent", owns_ledger=owns,
                   job=ctx, metadata=ctx.job.metadata)
        ctx.add_shutdown_callback(link.aclose)
        return link

    async def resume(self, userdata_type: type[T], *, timeout: float = 10.0) -> Resumed[T] | None:
        """The target side: None unless this job was dispatched by a handoff; else the context.

        Hydrates the room to the handoff's sequence (read-your-writes: everything the source
        published before handing off is in), and returns the conversation, the userdata as
        ``userdata_type`` and the handoff's reason. Needs no room connection.
        """
        request = handoff_from_metadata(self._metadata)
        if request is None:
            return None
        handoff, traceparent, self._source_identity = await self._handoff_at(request)
        # The source's trace goes on here: this hydration, then the first reply (_on_agent_state).
        started = time.time()
        with tracing.span("ledger.handoff.resume", {"ledger.agent": self.agent_id, "ledger.seq": request.ledger_seq},
                          traceparent=traceparent) as trace:
            snapshot = await hydrate(self.ledger, request.room, min_seq=request.ledger_seq, timeout=timeout)
        self._reply_trace = (trace.get("traceparent"), started) if trace else None
        resumed: Resumed[T] = Resumed(
            chat_ctx=snapshot.chat_ctx(), userdata=snapshot.session_as(userdata_type),
            reason=handoff.reason if handoff else None, from_agent=handoff.from_agent if handoff else "",
            seq=request.ledger_seq, snapshot=snapshot)
        self._resumed = resumed
        self._own_from(snapshot.state, request.ledger_seq)
        return resumed

    def _own_from(self, state: rd.RoomState, seq: int) -> None:
        """This process owns the call from the handoff at ``seq``, if the log says that handoff made
        this agent the owner (it passed the floor): its writes carry that epoch from now on."""
        owner = state.ownership.owners.get(self.agent_id)
        if owner is not None and owner.epoch == seq:
            self.agent.adopt_epoch(seq)

    async def _handoff_at(self, request: HandoffRequest) -> tuple[ev.Handoff | None, str | None, str]:
        """The handoff at the request's sequence, the trace context its source sent with it, and the
        source's participant identity."""
        for record in await self.ledger.read_recent(request.room, after=request.ledger_seq - 1, batch=1):
            if record.seq == request.ledger_seq and isinstance(record.event, ev.HandoffEvent):
                traceparent = ev.extra_fields(record.event).get("traceparent")
                return (record.event.body, traceparent if isinstance(traceparent, str) else None,
                        record.event.sender.identity)
            break
        return None, None, ""

    async def attach(self, session: AgentSession[Any], *, task: str | None = None, floor_timeout: float = 10.0,
                     floor: TurnPolicy | None = None) -> None:
        """Follow the room's log for ``session``; publish its userdata; take the floor.

        Call after ``session.start`` (the room is connected then). On a handoff's target this is
        the take-over the source waits for. The session's userdata is published now (a source)
        and then once per turn, as one change of what changed.

        ``floor``: in a room of several agents, who answers each user turn (:mod:`room_ledger.turns`:
        ``RoundRobin()``, ``Addressed()``, ``Router(choose)``); the others keep listening and
        answer nothing. The floor is claimed without waiting for it then (agents queue).
        """
        self.session = session
        _links[session] = self
        resumed = self._resumed
        log.debug("%s: attaching (hydrating %s)", self.agent_id, "no" if resumed else "yes")
        await self.agent.start(snapshot=resumed.snapshot if resumed else None)
        log.debug("%s: following the log from %d", self.agent_id, self.agent.seq)
        self._attached.set()
        if resumed is not None:
            self.agent.adopt_session(resumed.snapshot.session)
        await self._publish_userdata(session)
        if floor is not None:
            self.turn_gate = TurnGate(session, self.agent, floor)
            self.turn_gate.install()
        if resumed is not None:
            await self._catch_up(session, resumed)
            if session.input.audio is not None and self._source_identity:
                self._defer_to_source(session, resumed)
        # A handoff's target does not wait to hear its claim back: the handoff freed the floor
        # and the claim is in the log before anything it says (the source waits for it).
        await self._take_floor(task, floor_timeout, wait=resumed is None and floor is None)

    async def _catch_up(self, session: AgentSession[Any], resumed: Resumed[Any]) -> None:
        """What the caller said after the snapshot the target resumed from, before it listened.

        By voice, the source keeps hearing the caller until the target takes over (its turns
        held, :class:`room_ledger.turns.TurnGate`), and its session's feed puts them in the log; the
        target hears the caller only from its own ``session.start``. Turns in between are in the
        followed log now: they join the agent's history, so its first reply answers them, once.
        """
        known = {item.id for item in resumed.chat_ctx.items}
        since = [item for item in self.agent.state.conversation
                 if item.seq > resumed.seq and item.type == "message" and item.role == "user"
                 and item.item_id not in known and item.text]
        agent = session.current_agent
        current = {item.id for item in agent.chat_ctx.items}
        # The same words heard by this session too (it started listening while the source held)
        # are one turn: its own copy stands.
        recent = caller_side.recent_user_texts(agent.chat_ctx)
        missed = [item for item in since if item.item_id not in current and item.text.strip() not in recent]
        if not missed:
            return
        ctx = agent.chat_ctx.copy()
        for item in missed:
            ctx.add_message(role="user", content=item.text, id=item.item_id,
                            created_at=item.created_at if item.created_at is not None else item.time.timestamp())
        await agent.update_chat_ctx(ctx)
        if session.input.audio is not None:
            # This session may be hearing the same words itself, a moment later: one turn, not two.
            gate = self.turn_gate
            if gate is None:
                gate = self.turn_gate = TurnGate(session, self.agent, None)
                gate.install()
            deadline = time.monotonic() + CATCH_UP_ECHO_S
            gate.already_heard.update({item.text.strip().lower(): deadline for item in missed})
        log.info("%s: %d turn(s) the caller said during the handoff joined the history", self.agent_id, len(missed))

    def _defer_to_source(self, session: AgentSession[Any], resumed: Resumed[Any]) -> None:
        """By voice, until the source has left: its hearing of the caller counts, not this session's.

        The source keeps hearing the caller until it leaves (and waits for the caller to finish
        first). This session would start hearing mid-way, and the end of a turn heard alone is
        a wrong turn (and a wrong transcript in the log). So its audio input is off, and each
        turn the source kept (its feed, in the log) joins this session's history and is
        answered, once. When the source has left, this session hears the caller itself.
        """
        gate = self.turn_gate
        if gate is None:
            gate = self.turn_gate = TurnGate(session, self.agent, None)
            gate.install()
        gate.deferring = True
        muted = session.input.audio_enabled
        if muted:
            session.input.set_audio_enabled(False)
        source = self._source_identity
        seen = {item.item_id for item in self.agent.state.conversation}

        def watch(record: Record) -> None:
            event = record.event
            if isinstance(event, ev.ParticipantLeftEvent) and event.body.identity == source:
                gate.deferring = False
                if muted:
                    session.input.set_audio_enabled(True)
                undo()
                log.debug("%s: the source left; hearing the caller ourselves", self.agent_id)
            elif (isinstance(event, ev.ConversationItemEvent) and event.sender.identity == source
                  and event.body.item_type == "message" and event.body.role == "user" and event.body.text
                  and record.seq > resumed.seq and event.body.item_id not in seen):
                seen.add(event.body.item_id)
                task = asyncio.ensure_future(self._answer_held(session, event.body))
                self._replays.add(task)
                task.add_done_callback(self._replays.discard)

        undo = self.agent.on_record(watch)

    async def _answer_held(self, session: AgentSession[Any], said: ev.ConversationItem) -> None:
        """A turn the source heard during the switch: into this agent's history, then answered."""
        agent = session.current_agent
        if said.text.strip() in caller_side.recent_user_texts(agent.chat_ctx):
            return  # caught up already
        ctx = agent.chat_ctx.copy()
        ctx.add_message(role="user", content=said.text, id=said.item_id,
                        created_at=said.created_at if said.created_at is not None else time.time())
        await agent.update_chat_ctx(ctx)
        log.info("%s: answering what the caller said during the handoff", self.agent_id)
        session.generate_reply()

    async def _publish_userdata(self, session: AgentSession[Any]) -> None:
        session.on("agent_state_changed", self._on_agent_state)
        session.on("user_state_changed", self._on_user_state)
        self._sync_task = asyncio.create_task(self._sync_loop(), name=f"ledger-userdata-{self.agent_id}")
        await self.sync_userdata()

    async def _take_floor(self, task: str | None, timeout: float, *, wait: bool = True) -> None:
        await self.agent.request_floor(task=task)
        log.debug("%s: floor requested", self.agent_id)
        if not wait:
            return
        try:
            await self.agent.wait_for_floor(timeout=timeout)
        except TimeoutError:
            log.warning("%s: the floor is still held by %r; queued behind it", self.agent_id, self.agent.floor_holder)

    # --- warm standby -------------------------------------------------------------------------------

    @property
    def is_standby(self) -> bool:
        """Whether this job was dispatched as a warm standby (:meth:`warm_up`), not by a handoff."""
        try:
            data = msgspec.json.decode(self._metadata or "{}")
        except msgspec.DecodeError:
            return False
        return isinstance(data, dict) and data.get(STANDBY_KEY) is True

    async def warm_up(self, agent_name: str) -> str:
        """Dispatch ``agent_name`` into this room as a warm standby; returns the dispatch id.

        Its job starts its session now and follows the room's log (:meth:`standby`), so a later
        ``transfer_to(agent_name)`` needs no dispatch and no hydration: the standby sees the
        handoff in the log it already follows and takes over.
        """
        metadata = msgspec.json.encode({STANDBY_KEY: True, "room": self.room.name}).decode()
        dispatch = await self._livekit_api().agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(
            agent_name=agent_name, room=self.room.name, metadata=metadata))
        await self.agent.record_dispatch(dispatch, by="warm_up")
        return str(dispatch.id)

    async def standby(self, session: AgentSession[Any], userdata_type: type[T], *, task: str | None = None,
                      floor_timeout: float = 10.0) -> Resumed[T]:
        """A warm standby's side: wait, session started and silent, until a handoff names this agent.

        Call after ``session.start``. Follows the room's log (the caller's typing is left to the
        agent holding the floor), announces itself (``agent.status`` idle, task ``standby``), and
        returns when a handoff to this agent passes the floor: the conversation and userdata as
        of the handoff, from the state already followed (no hydration). The session's userdata
        is set to it, published per turn from then on, and the floor taken. Load
        ``resumed.chat_ctx`` into the agent (``update_chat_ctx``) and speak.
        """
        self.session = session
        _links[session] = self
        self._hold_input()
        if self.turn_gate is not None:
            # A standby's own hearing is dropped, not kept: the agent holding the call hears and
            # keeps every turn (a second copy in the log would be a second turn to answer).
            self.turn_gate.holding = False
            self.turn_gate.deferring = True
            self._input.muted = False
        handed: asyncio.Future[ev.Handoff] = asyncio.get_running_loop().create_future()

        def watch(record: Record) -> None:
            event = record.event
            if (isinstance(event, ev.HandoffEvent) and event.body.to_agent == self.agent_id and not handed.done()
                    and handoff_took_effect(self.agent.state, record.seq, event.body.from_agent)):
                handed.set_result(event.body)
                self._handed_seq = record.seq
                self._source_identity = event.sender.identity

        undo = self.agent.on_record(watch)
        try:
            await self.agent.start()
            self._attached.set()
            await self.agent.status("idle", task=STANDBY_TASK)
            log.info("%s: standing by in %s", self.agent_id, self.room.name)
            handoff = await handed
            log.debug("%s: handed the caller at %d", self.agent_id, self._handed_seq)
        finally:
            undo()
        state = self.agent.state
        snapshot = Snapshot(room=self.room.name, seq=self._handed_seq, state=state,
                            conversation=list(state.conversation), full_conversation=True,
                            source="followed")
        resumed: Resumed[T] = Resumed(chat_ctx=snapshot.chat_ctx(), userdata=snapshot.session_as(userdata_type),
                                      reason=handoff.reason, from_agent=handoff.from_agent, seq=self._handed_seq,
                                      snapshot=snapshot)
        self._resumed = resumed
        self._own_from(state, self._handed_seq)
        session.userdata = resumed.userdata
        self.agent.adopt_session(dict(state.session))
        self._release_input(replay=False)  # what the caller typed meanwhile was the source's to answer
        if session.input.audio is not None and self._source_identity:
            # By voice, as a dispatched target: the source's hearing counts until it has left
            # (what it keeps reaches this agent through the log), then this session's own.
            self._defer_to_source(session, resumed)
        # No longer a standby (before the claim: a status without the lock withdraws claims).
        await self.agent.status("processing", task=task or "taken over")
        await self._take_floor(task, floor_timeout, wait=False)
        await self._publish_userdata(session)
        log.debug("%s: took over", self.agent_id)
        return resumed

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.session is not None:
            self.session.off("agent_state_changed", self._on_agent_state)
            self.session.off("user_state_changed", self._on_user_state)
        for task in (self._sync_task, self._transfer_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self.agent.stop()
        if self._api is not None:
            with contextlib.suppress(Exception):
                await self._api.aclose()
        if self._owns_ledger:
            await self.ledger.close()

    # --- userdata -----------------------------------------------------------------------------------

    def _on_agent_state(self, event: AgentStateChangedEvent) -> None:
        # A turn ends when the agent goes back to waiting for the user: what its tools changed
        # during the turn goes out as one patch.
        if event.old_state in _IN_TURN and event.new_state in _TURN_OVER:
            self._sync_wanted.set()
            if self._reply_trace is not None:  # a handoff's target: its first reply ends the trace
                traceparent, started = self._reply_trace
                self._reply_trace = None
                tracing.record("ledger.handoff.first_reply", time.time() - started,
                               {"ledger.agent": self.agent_id}, traceparent=traceparent)

    async def _sync_loop(self) -> None:
        while True:
            await self._sync_wanted.wait()
            self._sync_wanted.clear()
            try:
                await self.sync_userdata()
            except Superseded as exc:
                # Another process has the call (this one handed it off, or was paused past its
                # successor's take-over): nothing it writes would count. Not an end: a failed
                # handoff's record gives the call back, and the next turn publishes again.
                log.info("%s: userdata not published: %s", self.agent_id, exc)
            except Exception:
                log.warning("%s: publishing the userdata failed; retried at the end of the next turn",
                            self.agent_id, exc_info=True)

    async def sync_userdata(self) -> str | None:
        """Publish what changed in the session's userdata now (the event id, or None: no change)."""
        if self.session is None or not self.room.isconnected():
            return None
        try:
            userdata = self.session.userdata
        except ValueError:  # the session has no userdata
            return None
        return await self.agent.sync_userdata(userdata)

    # --- the source's side of a handoff -------------------------------------------------------------

    @property
    def transferring(self) -> bool:
        return self._transfer_task is not None and not self._transfer_task.done()

    def start_transfer(self, to_agent: str, reason: str | None, *, call_id: str | None = None,
                       timeout: float = DEFAULT_TRANSFER_TIMEOUT_S, failure_message: str | None = None,
                       progress_after: float | None = DEFAULT_PROGRESS_AFTER_S,
                       progress_message: str | None = None) -> asyncio.Task[None]:
        """Hand the caller to ``to_agent`` in the background (what ``transfer_to`` calls).

        ``progress_after``: seconds of waiting (from the handoff reaching the log) before the
        caller hears ``progress_message`` once (None: never)."""
        if self.transferring:
            raise HandoffFailed(to_agent, "another transfer is in progress")
        outcome = HandoffOutcome(to_agent=to_agent, reason=reason)
        self.transfers.append(outcome)
        self._transfer_started_at = time.time()
        self._hold_input()
        self._progress = caller_side.ProgressLine(progress_after, progress_message or DEFAULT_PROGRESS_MESSAGE)
        self._transfer_task = asyncio.create_task(
            self._transfer(outcome, call_id, timeout, failure_message), name=f"ledger-handoff-{to_agent}")
        self._transfer_task.add_done_callback(_log_crash)
        return self._transfer_task

    async def _transfer(self, outcome: HandoffOutcome, call_id: str | None, timeout: float,
                        failure_message: str | None) -> None:
        started = time.perf_counter()
        to_agent = outcome.to_agent
        try:
            # A tool can run before attach() has hydrated (the caller was quick): wait for it.
            await asyncio.wait_for(self._attached.wait(), timeout)
            # The handoff carries its trace context: the target's resume continues this trace.
            with tracing.span("ledger.handoff", {"ledger.from": self.agent_id, "ledger.to": to_agent}) as trace:
                await self._handoff(outcome, call_id, timeout, trace)
        except Exception as exc:
            why = exc.reason if isinstance(exc, HandoffFailed) else caller_side.describe_failure(exc, to_agent, timeout)
            outcome.error = why
            outcome.elapsed_s = time.perf_counter() - started
            log.warning("%s: handoff to %r failed: %s", self.agent_id, to_agent, why)
            await self._progress.stop(interrupt=False)  # the notice follows it, not over it
            await self._recover(outcome, failure_message)
            return
        # The target has the floor and speaks: the source says nothing more.
        await self._progress.stop(interrupt=True)
        outcome.ok = True
        outcome.elapsed_s = time.perf_counter() - started
        log.info("%s: handed off to %r in %.2fs", self.agent_id, to_agent, outcome.elapsed_s)
        await self._leave(f"handed off to {to_agent}")

    async def _handoff(self, outcome: HandoffOutcome, call_id: str | None, timeout: float,
                       trace: dict[str, str] | None = None) -> None:
        agent = self.agent
        to_agent = outcome.to_agent
        if call_id is not None:
            # The target resumes with the tool call and its output: wait until the session's
            # own feed has put them in the log (they are emitted once the tool has returned).
            try:
                await agent.wait_until(lambda s: any(i.call_id == call_id and i.type == "function_call_output"
                                                     for i in s.conversation), TOOL_OUTPUT_WAIT_S)
            except TimeoutError:
                log.warning("%s: the transfer's tool output is not in the log after %gs (no bridge, or the "
                            "session does not publish lk.agent.session); handing off without it",
                            self.agent_id, TOOL_OUTPUT_WAIT_S)
        log.debug("%s: handing off to %r: the tool's output is in the log", self.agent_id, to_agent)
        await self._last_words(timeout)
        patch_id = await self.sync_userdata()
        try:
            if patch_id is not None and agent.last_streamed:
                # In the log before the handoff: a patch too big for a packet went as a text
                # stream, which the bridge records when it ends (a packet sent after could land
                # first). A packet is recorded before the handoff's packet anyway.
                await agent.wait_for_event(patch_id, timeout)
            event_id = await agent.publish("handoff", ev.Handoff(from_agent=self.agent_id, to_agent=to_agent,
                                                                 reason=outcome.reason), extra=trace)
            outcome.seq = seq = await agent.wait_for_event(event_id, timeout)
        except TimeoutError:
            raise HandoffFailed(to_agent, f"the room's log did not record the handoff within {timeout:g}s (is a "
                                          "ledger bridge in the room?)") from None
        log.debug("%s: handoff to %r at sequence %d", self.agent_id, to_agent, seq)
        # The caller's silence starts about now (the source's last words have played).
        self._progress.start(self.session, to_agent)
        if not handoff_took_effect(agent.state, seq, self.agent_id):
            holder = agent.floor_holder
            raise HandoffFailed(to_agent, f"{self.agent_id!r} did not hold the floor at the handoff (log order: "
                                          f"another handoff or release came first; the holder is {holder!r})")
        if self._standing_by(to_agent):
            # A warm standby follows the log: it has seen the handoff already. Dispatch only if it
            # does not take the floor soon (it may have died since it announced itself).
            outcome.via = "standby"
            try:
                await agent.wait_for_floor(to_agent, min(STANDBY_GRACE_S, timeout))
                return
            except TimeoutError:
                log.warning("%s: the standby %r did not take the floor within %gs; dispatching it", self.agent_id,
                            to_agent, min(STANDBY_GRACE_S, timeout))
                outcome.via = "dispatch"
        outcome.dispatch_id = await self._dispatch(to_agent, seq)
        log.debug("%s: dispatched %r (%s)", self.agent_id, to_agent, outcome.dispatch_id)
        try:
            await agent.wait_for_floor(to_agent, timeout)
        except TimeoutError:
            raise HandoffFailed(to_agent, await self._why_not(outcome, timeout)) from None

    async def _last_words(self, timeout: float) -> None:
        """Let the source finish its reply to the transfer (generated after the tool returned, in the
        same speech) before the handoff is in the log: a warm standby takes over within tens of ms,
        and would greet the caller over "one moment, I'm transferring you" from an LLM slower than that."""
        session = self.session
        speech = session.current_speech if session is not None else None
        if speech is None or speech.done():
            return
        try:
            await asyncio.wait_for(speech.wait_for_playout(), min(timeout, LAST_WORDS_WAIT_S))
        except TimeoutError:
            log.warning("%s: still speaking after %gs; handing off anyway", self.agent_id,
                        min(timeout, LAST_WORDS_WAIT_S))

    def _standing_by(self, agent_name: str) -> bool:
        return standing_by(self.agent.state, agent_name)

    async def _why_not(self, outcome: HandoffOutcome, timeout: float) -> str:
        """Why the target never took the floor, as far as LiveKit knows."""
        try:
            dispatches = await self._livekit_api().agent_dispatch.list_dispatch(self.room.name)
        except Exception:
            dispatches = []
        jobs = [j for d in dispatches if d.id == outcome.dispatch_id for j in d.state.jobs]
        if not jobs:
            return (f"no worker registered as {outcome.to_agent!r} took the job within {timeout:g}s "
                    "(is that worker running?)")
        return (f"{outcome.to_agent!r} got the job but did not take the floor within {timeout:g}s "
                "(it failed or is too slow; see its log)")

    async def _dispatch(self, agent_name: str, seq: int) -> str:
        lk = self._livekit_api()
        metadata = HandoffRequest(room=self.room.name, ledger_seq=seq)
        with tracing.span("ledger.dispatch", {"ledger.agent_name": agent_name, "ledger.seq": seq}):
            dispatch = await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(
                agent_name=agent_name, room=self.room.name,
                metadata=msgspec.json.encode({"room": metadata.room, "ledger_seq": metadata.ledger_seq}).decode()))
        await self.agent.record_dispatch(dispatch, by="transfer_to")
        return str(dispatch.id)

    def _livekit_api(self) -> api.LiveKitAPI:
        if self._api is None:
            try:
                self._api = livekit_api(self.ledger.settings, needed_for="a handoff's dispatch")
            except SettingsError as exc:
                raise HandoffFailed("?", str(exc)) from None
        return self._api

    async def _recover(self, outcome: HandoffOutcome, failure_message: str | None) -> None:
        """Keep the caller: withdraw the dispatch, record the failure, take the floor, say so."""
        agent = self.agent
        if outcome.dispatch_id is not None:
            with contextlib.suppress(Exception):
                await self._livekit_api().agent_dispatch.delete_dispatch(outcome.dispatch_id, self.room.name)
        try:
            if outcome.seq is not None:
                # The caller handed back: releases the target's floor if it got it, and shows in
                # `ledger replay --handoffs` as what it was.
                record_id = await agent.publish("handoff", ev.Handoff(
                    from_agent=outcome.to_agent, to_agent=self.agent_id, reason=f"{FAILED_PREFIX}{outcome.error}",
                    min_seq=outcome.seq))
                # The record gives this process the call back at a new epoch (room_ledger.ownership),
                # which the claim below must carry: the epoch it handed off is superseded.
                with contextlib.suppress(TimeoutError):
                    await agent.wait_for_event(record_id, RECLAIM_WAIT_S)
            await agent.request_floor(task=f"{FAILED_PREFIX}{outcome.to_agent}")
        except Exception:
            log.warning("%s: recording the failed handoff failed", self.agent_id, exc_info=True)
        session = self.session
        if session is not None:
            text = failure_message or DEFAULT_FAILURE_MESSAGE
            # Said first and played out, then what the caller typed meanwhile is answered: a reply
            # to a held message interrupts whatever is playing, the notice included.
            try:
                notice = session.say(text.format(agent=outcome.to_agent, reason=outcome.error))
                await asyncio.wait_for(notice.wait_for_playout(), NOTICE_WAIT_S)
            except Exception:
                log.warning("%s: saying the failure notice failed", self.agent_id, exc_info=True)
        self._release_input(replay=True)

    async def _leave(self, reason: str) -> None:
        session = self.session
        if session is not None and session.current_speech is not None:
            # Let the last words (the "transferring you" reply) finish.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.current_speech.wait_for_playout(), 10.0)
        self._input.messages.clear()
        if session is not None and session.input.audio is not None:
            await self._caller_quiet(session)
        if self._job is not None:
            self._job.shutdown(reason)
            return
        if session is not None:
            await session.aclose()
        await self.room.disconnect()

    async def _caller_quiet(self, session: AgentSession[Any]) -> None:
        await caller_side.caller_quiet(session, lambda: self._heard_lately(session), self.agent_id, CALLER_QUIET_S)

    def _hold_input(self) -> None:
        if self.session is not None:
            self.turn_gate = self._input.hold(self.session, self.turn_gate, self.agent)

    def _release_input(self, *, replay: bool) -> None:
        self._input.release(self.session, self.turn_gate, replay=replay)

    def _heard_lately(self, session: AgentSession[Any]) -> bool:
        """Whether the caller spoke after the last turn this session ended (a turn is on its way)."""
        gate = self.turn_gate
        return gate is not None and self._user_spoke_at > max(gate.last_turn_at, self._transfer_started_at)

    def _on_user_state(self, event: UserStateChangedEvent) -> None:
        if event.new_state == "speaking":
            self._user_spoke_at = time.time()



def standing_by(state: rd.RoomState, agent_name: str) -> bool:
    """Whether ``agent_name`` is a warm standby of the room (:meth:`LedgerLink.standby` announced
    it and it has not taken over): ``standing_by(fold(records), "billing")``."""
    announced = state.participants.get(agent_name)
    return announced is not None and announced.status == "idle" and announced.task == STANDBY_TASK


def transfer_tool(*, agents: Sequence[str] | None = None, timeout: float = DEFAULT_TRANSFER_TIMEOUT_S,
                  failure_message: str | None = None, name: str = "transfer_to",
                  description: str | None = None, progress_after: float | None = DEFAULT_PROGRESS_AFTER_S,
                  progress_message: str | None = None) -> FunctionTool[..., Awaitable[str]]:
    """A function tool ``transfer_to(agent_name, reason)`` that hands the caller to an agent in another worker.

    ``agents``: the agent names it may hand to (listed to the LLM; others are refused).
    ``timeout``: how long the target has to take the floor before the handoff fails and the
    caller stays. ``failure_message``: what the source says then (``{agent}``, ``{reason}``),
    before it answers anything the caller said meanwhile. ``progress_after``: seconds of waiting
    before the caller hears ``progress_message`` (``{agent}``) once; None for never.
    The session must be attached (:meth:`LedgerLink.attach`).
    """
    allowed = list(agents) if agents is not None else None
    text = description or (
        "Transfer the caller to another agent, who continues the conversation with everything said so far. "
        + (f"agent_name is one of: {', '.join(allowed)}. " if allowed else "")
        + "reason: why, in a few words.")

    async def transfer_to(context: RunContext[Any], agent_name: str, reason: str) -> str:
        link = _links.get(context.session)
        if link is None:
            raise ToolError("transfers are not set up for this session (LedgerLink.attach was not called)")
        if allowed is not None and agent_name not in allowed:
            raise ToolError(f"unknown agent {agent_name!r}; choose one of {', '.join(allowed)}")
        try:
            link.start_transfer(agent_name, reason or None, call_id=context.function_call.call_id,
                                timeout=timeout, failure_message=failure_message,
                                progress_after=progress_after, progress_message=progress_message)
        except HandoffFailed as exc:
            raise ToolError(str(exc)) from exc
        return f"Transferring the caller to {agent_name}. Tell them briefly; the other agent takes over."

    tool: FunctionTool[..., Awaitable[str]] = function_tool(transfer_to, name=name, description=text)
    return tool


def link_of(session: AgentSession[Any]) -> LedgerLink | None:
    """The link attached to ``session`` (None if none)."""
    return _links.get(session)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("the handoff task failed: %r", exc, exc_info=exc)


__all__ = ["DEFAULT_PROGRESS_AFTER_S", "DEFAULT_TRANSFER_TIMEOUT_S", "FAILED_PREFIX", "STANDBY_GRACE_S", "STANDBY_KEY", "STANDBY_TASK", "HandoffFailed", "HandoffOutcome",
           "LedgerLink", "Resumed", "handoff_took_effect", "link_of", "standing_by",
           "transfer_tool"]
