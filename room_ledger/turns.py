"""Floor-gated replies: in a room with several agents, on each user turn only one agent answers.

Every agent in the room hears the caller (its session transcribes every turn, so its history
stays current), but only the agent the policy names runs its LLM; the others keep the turn in
their history and say nothing. Each agent decides alone, from the same inputs: the turn's text
and the room's state folded from the log (the floor), so no message has to travel between them
before a reply::

    await link.attach(session, floor=RoundRobin())            # seed 000: agents take turns
    await link.attach(session, floor=Addressed())             # "billing, what's my balance?"
    await link.attach(session, floor=Router(choose))          # choose(text, state) -> agent id

* :class:`RoundRobin`: the floor's holder answers, and passes the floor on as it starts its
  reply (a release and a new claim: the next claim in log order takes the floor, and this agent
  queues again at the end). The caller's next turn comes after the reply has played, by which
  time every agent has folded the change.
* :class:`Addressed`: the agent whose name the turn says answers; a turn that names no one goes
  to the floor's holder (rotating as round-robin does with ``rotate=True``).
* :class:`Router`: a function of the turn's text and the room's state names the agent (None: the
  floor's holder).

The decision uses each agent's own transcript of the turn: agents running the same speech
recognizer on the same audio agree; with different recognizers, route on something all of them
hear the same way (or use the floor alone, :class:`RoundRobin`). Typed turns (``lk.chat``) are
gated the same way.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from livekit.agents import StopResponse

from room_ledger._agents_sdk import keep_user_turn, text_input_callback
from room_ledger.state import RoomState

if TYPE_CHECKING:
    from livekit.agents import Agent, AgentSession
    from livekit.agents.llm import ChatContext, ChatMessage
    from livekit.agents.voice.room_io.types import TextInputEvent

    from room_ledger.agents import LedgerAgent

log = logging.getLogger("ledger.turns")


class TurnPolicy(Protocol):
    """Who answers a user turn: an agent id, or None for the floor's holder."""

    @property
    def rotate(self) -> bool:
        """Whether the floor's holder passes the floor on when it answers."""
        ...

    def route(self, text: str, state: RoomState) -> str | None: ...


@dataclass(frozen=True)
class RoundRobin:
    """The floor's holder answers, then the floor goes to the next agent in log order (seed 000)."""

    rotate: bool = True

    def route(self, text: str, state: RoomState) -> str | None:
        return None


@dataclass(frozen=True)
class Addressed:
    """The agent the turn names answers; otherwise the floor's holder.

    ``names``: spoken name -> agent id. By default every agent that claimed the floor is known by
    its id and by the id's first word (``billing-7f3a`` is "billing"); matching ignores case
    and punctuation, whole words only.
    """

    names: Mapping[str, str] = field(default_factory=dict)
    rotate: bool = False

    def route(self, text: str, state: RoomState) -> str | None:
        words = _words(text)
        if not words:
            return None
        names = dict(self.names) or _floor_names(state)
        # The earliest name said wins ("billing, or sales" goes to billing).
        best: tuple[int, str] | None = None
        for name, agent_id in names.items():
            spoken = _words(name)
            for i in range(len(words) - len(spoken) + 1):
                if words[i:i + len(spoken)] == spoken:
                    if best is None or i < best[0]:
                        best = (i, agent_id)
                    break
        return best[1] if best else None


@dataclass(frozen=True)
class Router:
    """``choose(text, state)`` names the agent that answers (None: the floor's holder)."""

    choose: Callable[[str, RoomState], str | None]
    rotate: bool = False

    def route(self, text: str, state: RoomState) -> str | None:
        return self.choose(text, state)


def answerer(policy: TurnPolicy, text: str, state: RoomState, said_at: datetime | None = None) -> str | None:
    """The agent that answers a turn of ``text`` in ``state`` (None: nobody holds the floor).

    ``said_at``: when the caller began the turn. The floor's holder *then* answers: agents end
    the same turn up to seconds apart (each its own VAD and endpointing), and the floor may have
    passed on meanwhile (round-robin passes it as the answer starts), but every agent agrees on
    who held it when the caller began to speak.
    """
    return policy.route(text, state) or holder_at(state, said_at)


def holder_at(state: RoomState, when: datetime | None) -> str | None:
    """Who held the floor at ``when`` (now when None), from the floor's history in the log."""
    floor = state.floor
    if when is None:
        return floor.holder
    for tenure in reversed(floor.history):
        if tenure.start_time <= when:
            return tenure.holder if tenure.end_time is None or when < tenure.end_time else None
    return None if floor.history else floor.holder


def _words(text: str) -> list[str]:
    return re.findall(r"[\w']+", text.lower())


def _floor_names(state: RoomState) -> dict[str, str]:
    agents = [c.agent_id for c in state.floor.queue]
    if state.floor.holder:
        agents.insert(0, state.floor.holder)
    names: dict[str, str] = {}
    for agent_id in agents:
        names[agent_id] = agent_id
        first = _words(agent_id.replace("-", " ").replace("_", " "))
        if first:
            names.setdefault(first[0], agent_id)
    return names


class TurnGate:
    """Decides, at each user turn of a session, whether its agent answers.

    Installed by :meth:`room_ledger.handoff.LedgerLink.attach` with ``floor=`` (a policy), and by a
    voice transfer or standby (``holding``): while holding, every turn is heard and kept in the
    history and the log, and none is answered (the target of the handoff answers it).
    """

    def __init__(self, session: AgentSession[Any], ledger_agent: LedgerAgent, policy: TurnPolicy | None) -> None:
        self.session = session
        self.ledger_agent = ledger_agent
        self.policy = policy
        #: Turns this agent answered and turns it kept silent through, in order (text, answered).
        self.turns: list[tuple[str, bool]] = []
        #: While True no turn is answered (a transfer or a standby); the turns held meanwhile.
        self.holding = False
        self.held: list[ChatMessage] = []
        #: Words already in the history from another copy (a handoff's target catching up on what
        #: the source heard), with a deadline: this session's own hearing of them is not a new turn.
        self.already_heard: dict[str, float] = {}
        #: A handoff's target while its source still hears the caller: the source's turns count
        #: (they come through the log), this session's own are dropped.
        self.deferring = False
        #: When the last turn ended here (time.time()), answered or not.
        self.last_turn_at = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._undo: list[Callable[[], None]] = []

    def install(self) -> None:
        agent = self.session.current_agent
        own = agent.on_user_turn_completed

        async def on_user_turn_completed(turn_ctx: ChatContext, new_message: ChatMessage) -> None:
            if not self._mine(new_message.text_content or "", agent, new_message, _said_at(new_message)):
                raise StopResponse()
            await own(turn_ctx, new_message)

        # An instance attribute: LiveKit calls ``agent.on_user_turn_completed`` at each turn.
        agent.on_user_turn_completed = on_user_turn_completed  # type: ignore[method-assign]
        self._undo.append(lambda: vars(agent).pop("on_user_turn_completed", None))
        if self.policy is not None:
            self._gate_typing(agent)

    def _gate_typing(self, agent: Agent) -> None:
        try:
            room_io = self.session.room_io
        except RuntimeError:  # started without a room
            return
        typed_cb = text_input_callback(room_io)
        if typed_cb is None:
            from livekit.agents.voice.room_io.types import TextInputOptions  # noqa: PLC0415 - only with a room

            typed_cb = TextInputOptions().text_input_cb

        def on_typed(session: AgentSession[Any], event: TextInputEvent) -> Any:
            from livekit.agents.llm import ChatMessage  # noqa: PLC0415 - livekit-agents is loaded by now

            if self._mine(event.text, agent, ChatMessage(role="user", content=[event.text]), None):
                return typed_cb(session, event)
            return None

        room_io.register_text_input(on_typed)
        self._undo.append(lambda: room_io.register_text_input(typed_cb))

    def _mine(self, text: str, agent: Agent, message: ChatMessage, said_at: datetime | None) -> bool:
        state = self.ledger_agent.state
        me = self.ledger_agent.agent_id
        self.last_turn_at = time.time()
        if self.deferring:
            log.debug("%s: %r heard while the source still hears the caller: its copy counts", me, text)
            return False
        heard = self.already_heard.pop(text.strip().lower(), None)
        if heard is not None and time.monotonic() < heard:
            log.debug("%s: %r is in the history already (heard by the source during the handoff)", me, text)
            return False
        if self.holding:
            self.turns.append((text, False))
            self.held.append(message)
            log.debug("%s: %r heard while holding; kept for whoever answers next", me, text)
            keep_user_turn(self.session, agent, message)
            return False
        if self.policy is None:
            return True
        who = answerer(self.policy, text, state, said_at)
        mine = who == me
        self.turns.append((text, mine))
        log.debug("%s: %r is %s's to answer (floor now: %s, log at #%d)", me, text, "mine" if mine else who,
                  state.floor.holder, state.seq)
        if not mine:
            keep_user_turn(self.session, agent, message)
            return False
        if self.policy.rotate and state.floor.holder == me:
            self._spawn(self._pass_floor())
        return True

    async def _pass_floor(self) -> None:
        # Release, then claim again: the next claim in log order takes the floor and this agent
        # queues behind the others (both packets on one reliable channel, in this order).
        await self.ledger_agent.release_floor(reason="answered")
        await self.ledger_agent.request_floor()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def _said_at(message: ChatMessage) -> datetime | None:
    """When the caller began the turn (LiveKit's VAD), if the message says."""
    started = (message.metrics or {}).get("started_speaking_at")
    return datetime.fromtimestamp(started, UTC) if isinstance(started, int | float) else None


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("passing the floor on failed: %r", exc)


__all__ = ["Addressed", "RoundRobin", "Router", "TurnGate", "TurnPolicy", "answerer"]
