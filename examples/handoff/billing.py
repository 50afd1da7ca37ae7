"""The billing agent: dispatched by a handoff, it resumes the call with the whole conversation.

    LIVEKIT_URL=ws://localhost:7880 LIVEKIT_API_KEY=devkey LIVEKIT_API_SECRET=secret \\
        python examples/handoff/billing.py

``LedgerLink.resume`` reads the dispatch, hydrates the room to the handoff's sequence and returns
the conversation (function calls and outputs kept), the userdata as ``CallData`` and the reason.
The agent then speaks first, with all of it in its LLM's first request. It can refund the
duplicate charge (a change to the userdata) and send the caller back to triage with the same
``transfer_to`` tool triage used: triage is dispatched again and resumes with everything.
"""

from __future__ import annotations

import asyncio
import json
import os
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
    last_item,
    serve,
    session_io,
    text_of,
)
from livekit.agents import Agent, AgentSession, JobContext, RunContext, function_tool, llm

from room_ledger.agents import userdata_document
from room_ledger.handoff import LedgerLink, transfer_tool

#: Billing's voice by voice mode (the offline TTS), so the caller hears two agents apart.
BILLING_VOICE = "en-gb+f3"


def script(chat_ctx: llm.ChatContext) -> Step:
    item = last_item(chat_ctx)
    told_triage = [i for i in chat_ctx.items if _resumed(i) and i.type == "message" and i.role == "user"]
    if item is not None and item.type == "function_call_output" and not _resumed(item, chat_ctx):
        if item.name == "refund_duplicate":
            return Say("Done: I refunded the duplicate charge.")
        if item.name == "transfer_to":
            return Say("Sorry, I can't transfer you right now." if item.is_error
                       else "I'm sending you back to triage now.")
    if item is not None and item.type == "message" and item.role == "user" and (
            not _resumed(item) or _said_during_the_switch(item, chat_ctx)):
        text = text_of(item).lower()
        if "refund" in text:
            return Call("refund_duplicate", {})
        if "back to triage" in text:
            # a round trip across processes: triage is dispatched again and resumes the call
            return Call("transfer_to", {"agent_name": TRIAGE, "reason": "billing is done"})
        return Say(f"Billing here: about {text_of(item)!r}, I'm on it.")
    return Say(f"Hi Ana, billing here. I have your account and the {len(told_triage)} things you told triage.")


def _said_during_the_switch(item: llm.ChatItem, chat_ctx: llm.ChatContext) -> bool:
    """Whether the caller said ``item`` after triage's transfer call (while the call switched): the
    history has it (the source kept it), and the first reply answers it."""
    items = list(chat_ctx.items)
    transfers = [n for n, i in enumerate(items) if i.type == "function_call_output" and i.name == "transfer_to"]
    return bool(transfers) and items.index(item) > transfers[-1]


def _resumed(item: llm.ChatItem, chat_ctx: llm.ChatContext | None = None) -> bool:
    """Whether ``item`` came with the handoff (hydrated from the log) rather than to this agent.
    Hydrated items carry the log sequence in ``extra``; a function's output (which has no ``extra``)
    goes by its call's."""
    if item.type == "function_call_output" and chat_ctx is not None:
        return any(i.type == "function_call" and i.call_id == item.call_id and _resumed(i) for i in chat_ctx.items)
    extra = getattr(item, "extra", None) or {}
    return "ledger_seq" in extra


def instructions(userdata: CallBase, reason: str | None) -> str:
    # The typed userdata the handoff brought (the api_client is this process's own, not handed over).
    facts = json.dumps({k: v for k, v in userdata_document(userdata).items() if k != "api_client"}, sort_keys=True)
    return (f"You are the billing agent. The caller was handed to you by triage ({reason or 'no reason given'}). "
            f"What we know about the caller: {facts}")


class Billing(Agent):
    def __init__(self, userdata: CallBase, reason: str | None) -> None:
        super().__init__(instructions=instructions(userdata, reason),
                         tools=[transfer_tool(agents=[TRIAGE], timeout=HANDOFF_TIMEOUT_S,
                                                progress_after=HANDOFF_PROGRESS_S)])

    @function_tool
    async def refund_duplicate(self, context: RunContext[Any]) -> str:
        """Refund a charge made twice."""
        context.userdata.steps = [*(context.userdata.steps or []), "refunded"]  # published at the turn's end
        return "refunded the duplicate charge"


async def entrypoint(ctx: JobContext) -> None:
    # Joining the room (WebRTC) and reading the log (NATS) are independent: both at once.
    connecting = asyncio.ensure_future(ctx.connect())
    link = await LedgerLink.open(ctx)
    if link.is_standby:
        await connecting
        await warm_standby(ctx, link)
        return
    resumed = await link.resume(CallData)
    if os.environ.get("HANDOFF_CRASH_AFTER_HYDRATE") == "1":
        os._exit(70)  # the failure test: a target that dies once it has the context
    userdata: CallBase = resumed.userdata if resumed else CallData()
    agent = Billing(userdata, resumed.reason if resumed else None)
    if resumed is not None:
        # Function calls of tools this agent does not declare are kept (they are history).
        await agent.update_chat_ctx(resumed.chat_ctx, exclude_invalid_function_calls=False)
    session: AgentSession[CallBase] = AgentSession(llm=ScriptedLLM(BILLING, script), userdata=userdata,
                                                   **session_io(BILLING_VOICE))
    await connecting  # before the session starts: its first words need the room
    await session.start(agent, room=ctx.room, room_options=ROOM_OPTIONS)
    await link.attach(session, task="billing")
    session.generate_reply()


async def warm_standby(ctx: JobContext, link: LedgerLink) -> None:
    """Dispatched ahead (``link.warm_up("billing")`` in triage): session up and silent, log followed."""
    userdata: CallBase = CallData()
    agent = Billing(userdata, None)
    session: AgentSession[CallBase] = AgentSession(llm=ScriptedLLM(BILLING, script), userdata=userdata,
                                                   **session_io(BILLING_VOICE))
    await session.start(agent, room=ctx.room, room_options=ROOM_OPTIONS)
    resumed = await link.standby(session, CallData, task="billing")
    await agent.update_instructions(instructions(resumed.userdata, resumed.reason))
    await agent.update_chat_ctx(resumed.chat_ctx, exclude_invalid_function_calls=False)
    session.generate_reply()


if __name__ == "__main__":
    serve(BILLING, entrypoint)
