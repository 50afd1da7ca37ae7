"""bench/handoff's baseline worker: LiveKit's own in-process handoff, same scripted LLMs as examples/handoff.

One worker, one ``AgentSession``: triage's ``transfer_to`` says the same "One moment" and returns
the billing ``Agent`` (LiveKit switches agents inside the session). Run by ``bench/handoff.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "handoff"))

import billing as billing_example
import triage as triage_example
from common import ROOM_OPTIONS, VOICE, CallBase, CallData, Say, ScriptedLLM, fill_account, serve, session_io
from livekit.agents import Agent, AgentSession, JobContext, RunContext, function_tool


def billing_script() -> Any:
    """Billing's script, but it greets first whatever the last item (here the caller's message is)."""
    greeted = False

    def script(chat_ctx: Any) -> Any:
        nonlocal greeted
        if not greeted:
            greeted = True
            return Say("Hi Ana, billing here. I have your account and what you told triage.")
        return billing_example.script(chat_ctx)

    return script


class Billing(Agent):
    def __init__(self, userdata: CallBase, reason: str, chat_ctx: Any) -> None:
        # By voice, billing's own voice (as the cross-process billing speaks), from the same TTS.
        voice = {"tts": session_io(billing_example.BILLING_VOICE)["tts"]} if VOICE else {}
        super().__init__(instructions=billing_example.instructions(userdata, reason), chat_ctx=chat_ctx,
                         llm=ScriptedLLM("inproc-billing", billing_script()), **voice)

    async def on_enter(self) -> None:
        self.session.generate_reply()


class Triage(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are the triage agent.",
                         llm=ScriptedLLM("inproc-triage", triage_example.script))

    @function_tool
    async def look_up_account(self, context: RunContext[Any], account_id: str) -> str:
        """Look up the caller's account by its number."""
        fill_account(context.userdata, account_id)
        return f"account {account_id}: Ana, gold tier, verified"

    @function_tool
    async def transfer_to(self, context: RunContext[Any], agent_name: str, reason: str) -> Agent:
        """Transfer the caller to another agent."""
        context.session.say("One moment, I'm transferring you now.")
        return Billing(context.userdata, reason, self.chat_ctx.copy())

    async def on_enter(self) -> None:
        self.session.generate_reply()


async def entrypoint(ctx: JobContext) -> None:
    session: AgentSession[CallBase] = AgentSession(userdata=CallData(), **session_io())
    await ctx.connect()
    await session.start(Triage(), room=ctx.room, room_options=ROOM_OPTIONS)


if __name__ == "__main__":
    serve(os.environ["HANDOFF_TRIAGE_AGENT"], entrypoint)
