"""Seed 000 by voice: several agent processes on one caller's audio, one floor, one answer per turn.

Run one process per agent (each its own LiveKit agent name), dispatch all of them into the
caller's room, and talk::

    FLOOR_AGENT=sales-1 python examples/voice/floor.py &
    FLOOR_AGENT=billing-1 python examples/voice/floor.py &
    FLOOR_AGENT=support-1 python examples/voice/floor.py &

Every agent hears every turn (its STT runs, its history stays current), but only the agent the
floor policy names answers (``link.attach(session, floor=...)``, :mod:`room_ledger.turns`):
``FLOOR_POLICY=round_robin`` (the seed's: the floor's holder answers and passes the floor on) or
``addressed`` (the agent the caller names answers, "billing, what is my balance"; unnamed turns
go round-robin). The voice stack is the offline one (``offline.py``): swap in real providers and
nothing else changes. The LLM is scripted: each agent says who it is and what it heard.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples" / "handoff"))  # its common.py, as the handoff workers import it

from common import Say, ScriptedLLM, Step, last_item, serve, text_of  # noqa: E402
from livekit.agents import Agent, AgentSession, JobContext, llm, room_io  # noqa: E402

from examples.voice.offline import EspeakTTS, EspeakVoice, load_vad, offline_stt  # noqa: E402
from room_ledger.handoff import LedgerLink  # noqa: E402
from room_ledger.turns import Addressed, RoundRobin, TurnPolicy  # noqa: E402

AGENT = os.environ.get("FLOOR_AGENT", "sales")
POLICY = os.environ.get("FLOOR_POLICY", "round_robin")

#: What callers say in the tests (the recogniser's grammar: words of its dictionary only).
PHRASES = (
    "hello is anyone there",
    "i need help with my order",
    "what is the status",
    "thank you very much",
    "billing what is my balance",
    "support can you help me",
    "sales do you have a discount",
)

#: Each agent its own voice, so a listener can tell them apart.
VOICES = (EspeakVoice("en-us", 50), EspeakVoice("en-gb+f3", 70), EspeakVoice("en-us+m7", 40))

# Loaded once per worker process, before it registers: no job waits for a model (the prewarm).
VAD = load_vad()
STT = offline_stt(PHRASES, vad=VAD)


def policy() -> TurnPolicy:
    if POLICY == "addressed":
        return Addressed(rotate=True)
    return RoundRobin()


def name_of(agent_id: str) -> str:
    return agent_id.split("-")[0]


def script(chat_ctx: llm.ChatContext) -> Step:
    item = last_item(chat_ctx)
    heard = text_of(item) if item is not None and item.type == "message" and item.role == "user" else ""
    return Say(f"{name_of(AGENT)} here. You said {heard}." if heard else f"{name_of(AGENT)} here.")


async def entrypoint(ctx: JobContext) -> None:
    link = await LedgerLink.open(ctx)
    voice = VOICES[sum(map(ord, AGENT)) % len(VOICES)]
    session: AgentSession[None] = AgentSession(vad=VAD, stt=STT, tts=EspeakTTS(voice), llm=ScriptedLLM(AGENT, script))
    await ctx.connect()
    await session.start(Agent(instructions=f"You are {name_of(AGENT)}, one of several agents on this call."),
                        room=ctx.room, room_options=room_io.RoomOptions(audio_input=True, audio_output=True,
                                                                        text_input=True, text_output=True))
    await link.attach(session, task=name_of(AGENT), floor=policy())


if __name__ == "__main__":
    serve(AGENT, entrypoint)
