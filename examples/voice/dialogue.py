"""Seed 002 by voice: a customer agent and a support agent talk to each other, no human in the room.

    LIVEKIT_URL=ws://localhost:7880 LIVEKIT_API_KEY=devkey LIVEKIT_API_SECRET=secret \\
    LEDGER_NATS_URL=nats://127.0.0.1:4222 DIALOGUE_AGENT=dialogue \\
        python examples/voice/dialogue.py

then dispatch the agent ``DIALOGUE_AGENT`` twice into one room (and the bridge, which records the
room and carries the role claims). One worker, unified as in the seed: each job joins the room,
follows the room's log and claims ``{"customer", "support"}`` (:meth:`LedgerAgent.claim_role`:
decided by log order, so two jobs dispatched at the same instant get different roles), then runs an
``AgentSession`` for that role with the offline voice stack of ``offline.py``: Silero VAD,
PocketSphinx with a grammar of every line of :data:`SCRIPT`, espeak-ng with a voice per role, and a
scripted LLM that answers with the role's next line. Support speaks first; each agent says its
lines in turn, hearing the other through the room.

What makes an agent hear an agent: LiveKit Agents links a session's RoomIO to the first
*standard* participant (``DEFAULT_PARTICIPANT_KINDS``); another agent is never linked, so it is
never heard. Here ``RoomOptions(participant_kinds=[AGENT], participant_identity=<the other
role's holder>)`` links each session to the other agent, whose identity the log gives (the holder
of the other role). Support waits until the customer says it is listening (a participant
attribute, set once the customer's RoomIO has the support's microphone track) before its first
line, so the first line is not spoken to no one.

The room: livekit-server closes a room that no standard participant has joined once its
``empty_timeout`` has passed, agents in it or not (and the bridge is hidden). A call between agents
outlasts the default, so create the room first with a longer one
(``CreateRoomRequest(name=..., empty_timeout=...)``), as tests/test_voice_dialogue.py does.

Environment: ``LIVEKIT_*``, ``LEDGER_*`` (``Settings.from_env``), ``DIALOGUE_AGENT`` (the agent name,
default ``dialogue``), ``DIALOGUE_EXECUTOR`` (``process``, the default, as LiveKit runs jobs in
production: each job in a child process, two kept warm; ``thread``: jobs in the worker's process;
two rooms connecting at the same instant there were seen to hang one of them in the livekit FFI,
"timed out waiting for ReadyForRoomEventRequest"), ``DIALOGUE_LOG_LEVEL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

# Run as a script: the repository (ledger, examples.voice) and the handoff example's helpers (common).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "handoff"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from common import Say, Script, ScriptedLLM, Step
from livekit import rtc
from livekit.agents import (
    Agent,
    AgentServer,
    AgentSession,
    JobContext,
    JobExecutorType,
    JobProcess,
    llm,
    room_io,
    stt,
)

from examples.voice.offline import EspeakTTS, EspeakVoice, SphinxSTT, load_vad
from room_ledger.agents import LedgerAgent
from room_ledger.client import Ledger
from room_ledger.settings import Settings

log = logging.getLogger("voice-dialogue")

AGENT_NAME = os.environ.get("DIALOGUE_AGENT", "dialogue")
ROLES = ("customer", "support")

#: The conversation, in order: (role, line). One sentence per line (the TTS speaks a line as one
#: utterance: no pause between sentences for the listener's VAD to end the turn at), words only
#: (the PocketSphinx dictionary has no digits).
SCRIPT: tuple[tuple[str, str], ...] = (
    ("support", "Hello, this is the support desk, how can I help you today?"),
    ("customer", "Hi, my internet has been down since this morning."),
    ("support", "I am sorry to hear that, what is your account number?"),
    ("customer", "It is four seven two nine."),
    ("support", "Thank you, I can see an outage in your area."),
    ("customer", "How long will it take to fix?"),
    ("support", "Our team expects it to be back within two hours."),
    ("customer", "Can I get a credit for the lost time?"),
    ("support", "Yes, I have added a credit of ten dollars to your bill."),
    ("customer", "Great, thank you for your help, goodbye."),
)
#: Every line: the grammar both agents' STT decodes with.
PHRASES: tuple[str, ...] = tuple(line for _, line in SCRIPT)

#: One voice per role (espeak-ng voice, pitch, words per minute).
VOICES = {
    "support": EspeakVoice("en-gb+f3", pitch=70, speed=165),
    "customer": EspeakVoice("en-us+m3", pitch=35, speed=165),
}
#: The participant attribute each agent sets: its role, and (customer) that it hears the support.
ATTR_ROLE = "dialogue.role"
ATTR_LISTENING = "dialogue.listening"

#: Seconds to wait for the other agent (its role claim, its microphone, its readiness).
WAIT_S = float(os.environ.get("DIALOGUE_WAIT_S", "30"))


def lines_of(role: str) -> list[str]:
    return [line for who, line in SCRIPT if who == role]


def other_role(role: str) -> str:
    return "support" if role == "customer" else "customer"


def said(chat_ctx: llm.ChatContext) -> int:
    """How many lines this agent has said (its assistant messages)."""
    return sum(1 for item in chat_ctx.items if item.type == "message" and item.role == "assistant")


def script_for(role: str) -> Script:
    """The role's scripted LLM: its next line, whatever it heard (the STT's job is measured, not relied
    on). Once the role's lines are all said, nothing: the session then keeps what it heard (the user
    message) and says nothing (an empty reply adds no assistant message). A ``StopResponse`` from
    ``on_user_turn_completed`` would drop the heard message as well, and the last line would never
    reach the listener's feed."""
    lines = lines_of(role)

    def answer(chat_ctx: llm.ChatContext) -> Step:
        n = said(chat_ctx)
        if n >= len(lines):
            log.info("[%s] the script is over", role)
            return Say("")
        return Say(lines[n])

    return answer


class DialogueAgent(Agent):
    def __init__(self, role: str) -> None:
        super().__init__(instructions=f"You are the {role} in a support call. Say your next line.")
        self.role = role


# --- prewarm: what every job needs, loaded before a job arrives ------------------------------------


def prewarm(proc: JobProcess) -> None:
    """Silero's model and the PocketSphinx decoder with the script's grammar (each ~0.1-0.3 s)."""
    proc.userdata["vad"] = load_vad()
    proc.userdata["sphinx"] = SphinxSTT(PHRASES)


# --- waiting on the room -----------------------------------------------------------------------------


async def wait_room(room: rtc.Room, ready: Any, what: str, timeout: float = WAIT_S) -> None:
    """Wait until ``ready()`` holds, re-checking on every room event that can change it."""
    changed = asyncio.Event()

    def on_change(*_: Any) -> None:
        changed.set()

    events: tuple[Any, ...] = ("participant_connected", "participant_attributes_changed", "track_subscribed", "track_published")
    for name in events:
        room.on(name, on_change)
    try:
        async with asyncio.timeout(timeout):
            while not ready():
                changed.clear()
                await changed.wait()
    except TimeoutError:
        raise TimeoutError(f"{room.local_participant.identity}: no {what} within {timeout:g}s") from None
    finally:
        for name in events:
            room.off(name, on_change)


def hears(room: rtc.Room, identity: str) -> bool:
    """Whether we are subscribed to ``identity``'s microphone track."""
    participant = room.remote_participants.get(identity)
    return participant is not None and any(
        pub.source == rtc.TrackSource.SOURCE_MICROPHONE and pub.subscribed and pub.track is not None
        for pub in participant.track_publications.values())


def listening(room: rtc.Room, identity: str) -> bool:
    participant = room.remote_participants.get(identity)
    return participant is not None and participant.attributes.get(ATTR_LISTENING) == "true"


# --- the job -----------------------------------------------------------------------------------------


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    me = ctx.room.local_participant.identity
    ledger = Ledger(Settings.from_env(), name="voice-dialogue")
    await ledger.connect()
    agent = LedgerAgent(ctx.room, ledger)

    async def shutdown(*_: Any) -> None:
        await agent.stop()
        await ledger.close()

    ctx.add_shutdown_callback(shutdown)
    await agent.start()
    role = await agent.claim_role(ROLES, timeout=WAIT_S)
    # The other agent's identity: the holder of the other role, as the log says.
    await agent.wait_until(lambda s: other_role(role) in s.roles.assignment(), timeout=WAIT_S)
    other = agent.state.roles.assignment()[other_role(role)]
    await ctx.room.local_participant.set_attributes({ATTR_ROLE: role})
    log.info("[ROLE] %s is %s; it talks with %s", me, role, other)

    vad = ctx.proc.userdata.get("vad") or load_vad()
    sphinx = ctx.proc.userdata.get("sphinx") or SphinxSTT(PHRASES)
    session: AgentSession[None] = AgentSession(
        vad=vad,
        stt=stt.StreamAdapter(stt=sphinx, vad=vad),
        tts=EspeakTTS(VOICES[role]),
        llm=ScriptedLLM(f"{AGENT_NAME}-{role}", script_for(role)),
        turn_handling={
            # end of turn from the VAD (the default is LiveKit's turn-detector model: a download)
            "turn_detection": "vad",
            "endpointing": {"min_delay": 0.3},
            # each speaks in turn: no barging in, nothing heard while speaking
            "interruption": {"enabled": False},
        },
    )

    @session.on("conversation_item_added")
    def _said_or_heard(event: Any) -> None:
        item = event.item
        if item.type == "message":
            marker = "SAID" if item.role == "assistant" else "HEARD"
            log.info("[%s] [%s] %s", marker, role, item.text_content)

    options = room_io.RoomOptions(
        # hear the other agent, and only it (by default a session links to a standard participant)
        participant_kinds=[rtc.ParticipantKind.PARTICIPANT_KIND_AGENT],
        participant_identity=other,
    )
    await session.start(DialogueAgent(role), room=ctx.room, room_options=options)
    await session.room_io.wait_for_ready()  # linked to the other agent, our microphone published
    if role == "customer":
        await wait_room(ctx.room, lambda: hears(ctx.room, other), f"microphone track of {other}")
        await ctx.room.local_participant.set_attributes({ATTR_LISTENING: "true"})
        log.info("[customer] listening to %s", other)
    else:
        await wait_room(ctx.room, lambda: listening(ctx.room, other), f"{ATTR_LISTENING} from {other}")
        log.info("[support] %s listens: first line", other)
        session.generate_reply()


# --- the worker ---------------------------------------------------------------------------------------


def main() -> None:
    logging.basicConfig(level=os.environ.get("DIALOGUE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    in_processes = os.environ.get("DIALOGUE_EXECUTOR", "process") == "process"
    server = AgentServer(
        job_executor_type=JobExecutorType.PROCESS if in_processes else JobExecutorType.THREAD,
        # two warm runners: both jobs of a room start with their VAD and decoder loaded
        num_idle_processes=2, port=0, setup_fnc=prewarm,
        # load counts jobs, not the host's CPU: a busy host would refuse dispatches otherwise,
        # and LiveKit does not offer a refused job again
        load_fnc=lambda server: min(len(server.active_jobs) / 50, 1.0), load_threshold=1.0,
    )
    server.rtc_session(entrypoint, agent_name=AGENT_NAME)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        running = asyncio.create_task(server.run(devmode=False))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({running, stopped}, return_when=asyncio.FIRST_COMPLETED)
        with contextlib.suppress(Exception):
            await server.aclose()
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await running
        if running.done() and not running.cancelled() and running.exception() is not None and not stop.is_set():
            raise SystemExit(f"{AGENT_NAME}: the worker stopped: {running.exception()}")

    asyncio.run(run())


if __name__ == "__main__":
    main()
