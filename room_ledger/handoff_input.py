"""The caller's side of a handoff in progress: what they type or say while the call switches
(held for the target, or answered here if the transfer fails), and the progress line they hear
when the wait runs long. Used by :class:`room_ledger.handoff.LedgerLink`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from livekit import api
from livekit.agents import AgentSession
from livekit.agents.llm import ChatContext
from livekit.agents.voice.room_io.types import TextInputOptions

from room_ledger._agents_sdk import text_input_callback
from room_ledger.turns import TurnGate

if TYPE_CHECKING:
    from livekit.agents.voice.room_io.types import TextInputEvent

    from room_ledger.agents import LedgerAgent

log = logging.getLogger("ledger.handoff")


class HeldInput:
    """While this agent hands off, the caller's messages are not answered here: the target answers
    them from the log. Typed messages are held (replayed here if the transfer fails); by voice
    the session keeps hearing the caller (who can still interrupt the last words) but answers
    nothing: each turn is kept in the history and the log, where the target finds it, or
    answered here if the transfer fails."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        #: Typed messages held since :meth:`hold`.
        self.messages: list[TextInputEvent] = []
        #: Voice turns are heard and kept, not answered.
        self.muted = False
        self._holding = False
        self._saved_callback: Any = None
        self._replays: set[asyncio.Future[Any]] = set()

    def hold(self, session: AgentSession[Any], gate: TurnGate | None, agent: LedgerAgent) -> TurnGate | None:
        """Start holding; returns the session's turn gate (made here, by voice, when it had none)."""
        if self._holding:
            return gate
        with contextlib.suppress(RuntimeError):  # a session without room I/O has no text input
            room_io = session.room_io
            self._saved_callback = text_input_callback(room_io)
            room_io.register_text_input(self._held)
            self._holding = True
        if session.input.audio is not None:
            if gate is None:
                gate = TurnGate(session, agent, None)
                gate.install()
            gate.holding = True
            self.muted = True
        return gate

    async def _held(self, session: AgentSession[Any], event: TextInputEvent) -> None:
        self.messages.append(event)

    def release(self, session: AgentSession[Any] | None, gate: TurnGate | None, *, replay: bool) -> None:
        """Stop holding; with ``replay``, answer here what was held (the transfer failed)."""
        if session is not None and self.muted and gate is not None:
            self.muted = False
            gate.holding = False
            heard, gate.held = gate.held, []
            if replay and heard:
                # The held turns are in the history already: one reply answers them.
                with contextlib.suppress(Exception):
                    session.generate_reply()
        if session is None or not self._holding:
            return
        self._holding = False
        callback = self._saved_callback
        if callback is None:
            callback = TextInputOptions().text_input_cb
        session.room_io.register_text_input(callback)
        held, self.messages = self.messages, []
        if replay:
            for event in held:
                result = callback(session, event)
                if asyncio.iscoroutine(result):
                    task = asyncio.ensure_future(result)
                    self._replays.add(task)
                    task.add_done_callback(self._replays.discard)


class ProgressLine:
    """The progress line a waiting caller hears once, ``after`` seconds into a transfer's wait."""

    def __init__(self, after: float | None, message: str) -> None:
        self.after = after
        self.message = message
        self.said: Any = None  # the SpeechHandle, once said
        self._task: asyncio.Task[None] | None = None

    def start(self, session: AgentSession[Any] | None, to_agent: str) -> None:
        if self.after is None or session is None or self._task is not None:
            return
        self._task = asyncio.create_task(self._say(session, self.after, self.message.format(agent=to_agent)),
                                         name="ledger-handoff-progress")

    async def _say(self, session: AgentSession[Any], after: float, text: str) -> None:
        # A deadline, not a wait for a condition: the caller is to hear something after this long.
        await asyncio.sleep(after)
        self.said = session.say(text)

    async def stop(self, *, interrupt: bool) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if interrupt and self.said is not None and not self.said.done():
            with contextlib.suppress(Exception):
                self.said.interrupt()


async def caller_quiet(session: AgentSession[Any], heard_lately: Callable[[], bool], agent_id: str,
                       limit_s: float) -> None:
    """By voice, before the source leaves: let the caller finish a turn begun while the call
    switched, and keep it (its words reach the log, where the target takes them). At most
    ``limit_s``; ``heard_lately``: the caller spoke after the session's last turn ended."""
    changed = asyncio.Event()

    def on_change(_: Any) -> None:
        changed.set()

    session.on("user_state_changed", on_change)
    try:
        async with asyncio.timeout(limit_s):
            while session.user_state == "speaking":
                changed.clear()
                await changed.wait()
            # The turn ends after the endpointing delay and the recogniser: wait for it (the
            # gate notes each turn's end; no event says "no turn is coming").
            while heard_lately():
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), 0.1)
    except TimeoutError:
        log.debug("%s: the caller still speaking after %gs; leaving anyway", agent_id, limit_s)
    finally:
        session.off("user_state_changed", on_change)


def recent_user_texts(chat_ctx: ChatContext, last: int = 8) -> set[str]:
    """The caller's last ``last`` messages in ``chat_ctx``, as text (to skip what it already holds)."""
    users = [item for item in chat_ctx.items if item.type == "message" and item.role == "user"]
    return {(item.text_content or "").strip() for item in users[-last:]}


def describe_failure(exc: BaseException, to_agent: str, timeout: float) -> str:
    """Why a transfer failed, as the failure notice and the LLM's tool output read it."""
    if isinstance(exc, TimeoutError):
        return f"{to_agent!r} did not take the floor within {timeout:g}s (no worker took the job, or it failed)"
    if isinstance(exc, api.TwirpError):
        return f"LiveKit refused the dispatch: {exc.code} {exc.message}"
    return f"{type(exc).__name__}: {exc}"
