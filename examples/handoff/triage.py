"""The triage agent: identifies the caller, then hands billing questions to the billing worker.

    LIVEKIT_URL=ws://localhost:7880 LIVEKIT_API_KEY=devkey LIVEKIT_API_SECRET=secret \\
        python examples/handoff/triage.py

Its LLM is scripted (see ``common.py``): "my account is 7" looks the account up (filling the
120 userdata fields), a message about a bill calls ``transfer_to("billing", ...)``, "transfer me
to NAME" transfers to NAME. Dispatched by a handoff (billing sending the caller back), it resumes
the call with the conversation and userdata so far and welcomes the caller back.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BILLING,
    HANDOFF_PROGRESS_S,
    HANDOFF_TIMEOUT_S,
    ROOM_OPTIONS,
    TRIAGE,
    Call,
    CallBase,
    CallData,
    Say,
    ScriptedLLM,
    Step,
    fill_account,
    last_item,
    serve,
    session_io,
    spoken_numbers,
    text_of,
)
from livekit.agents import Agent, AgentSession, JobContext, RunContext, function_tool, llm

from room_ledger.handoff import LedgerLink, transfer_tool

#: Dispatch billing as a warm standby when the call starts (HANDOFF_WARM=1).
WARM = os.environ.get("HANDOFF_WARM") == "1"


def script(chat_ctx: llm.ChatContext) -> Step:
    item = last_item(chat_ctx)
    if item is None:
        return Say("Hi, this is triage. How can I help?")
    if item.type == "function_call_output":
        if item.name == "look_up_account":
            return Say("Thanks Ana, I found your account.")
        if item.name == "transfer_to":
            return Say("Sorry, I can't transfer you right now." if item.is_error
                       else "One moment, I'm transferring you now.")
    text = spoken_numbers(text_of(item).lower()) if item.type == "message" and item.role == "user" else ""
    if match := re.search(r"transfer me to ([\w-]+)", text):
        return Call("transfer_to", {"agent_name": match.group(1), "reason": "the caller asked"})
    if "bill" in text or "charge" in text:
        return Call("transfer_to", {"agent_name": BILLING, "reason": "billing question"})
    if match := re.search(r"account (?:is )?(\d+)", text):
        return Call("look_up_account", {"account_id": match.group(1)})
    if text:
        return Say(f"Triage here: you said {text!r}.")
    return Say("Triage here. How can I help?")


def welcome_back(userdata: CallBase, chat_ctx: llm.ChatContext, handoff_seq: int) -> Step:
    text = f"Welcome back {userdata.caller}, triage here. So far: {', '.join(userdata.steps or [])}."
    item = last_item(chat_ctx)
    # Words the caller said during the switch (after the handoff in the log, or heard by no log
    # yet: no sequence): the first reply answers them.
    if (item is not None and item.type == "message" and item.role == "user"
            and int(item.extra.get("ledger_seq", handoff_seq + 1)) > handoff_seq):
        text += f" You said: {text_of(item)}."
    return Say(text)


class Triage(Agent):
    def __init__(self, *, greets: bool = True) -> None:
        self.greets = greets
        super().__init__(instructions="You are the triage agent of a call centre. Identify the caller; transfer "
                                      "billing questions to billing.",
                         tools=[transfer_tool(timeout=HANDOFF_TIMEOUT_S, progress_after=HANDOFF_PROGRESS_S)])

    @function_tool
    async def look_up_account(self, context: RunContext[Any], account_id: str) -> str:
        """Look up the caller's account by its number."""
        fill_account(context.userdata, account_id)
        return f"account {account_id}: Ana, gold tier, verified"

    async def on_enter(self) -> None:
        if self.greets:  # a new call; a resumed one speaks once attached (with what was said meanwhile)
            self.session.generate_reply()


async def entrypoint(ctx: JobContext) -> None:
    link = await LedgerLink.open(ctx)
    # A new call, or the caller handed back (by billing): then resume with everything so far.
    resumed = await link.resume(CallData)
    agent = Triage(greets=resumed is None)
    userdata: CallBase = resumed.userdata if resumed else CallData()
    welcomed = resumed is None
    if resumed is not None:
        await agent.update_chat_ctx(resumed.chat_ctx, exclude_invalid_function_calls=False)

    def answer(chat_ctx: llm.ChatContext) -> Step:
        nonlocal welcomed
        if not welcomed:  # the first words of a resumed call
            welcomed = True
            return welcome_back(userdata, chat_ctx, resumed.seq if resumed else 0)
        return script(chat_ctx)

    session: AgentSession[CallBase] = AgentSession(llm=ScriptedLLM(TRIAGE, answer), userdata=userdata,
                                                   **session_io())
    await ctx.connect()  # before the session starts: its first words need the room
    await session.start(agent, room=ctx.room, room_options=ROOM_OPTIONS)
    await link.attach(session, task="triage")
    if resumed is not None:
        session.generate_reply()  # the target speaks first
    if WARM and resumed is None:
        await link.warm_up(BILLING)  # billing's worker joins now and follows the log: no dispatch at the handoff


if __name__ == "__main__":
    serve(TRIAGE, entrypoint)
