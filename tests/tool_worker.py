"""An agent worker whose one tool takes a while (``tests/test_tool_execution_livekit.py``).

A real ``AgentSession`` in text mode with the handoff example's scripted LLM. The agent greets
the caller ("How can I help?"); "where is my order" calls ``look_up_order``, which takes
``TOOL_WORKER_SECONDS`` (default 2) before it returns; its output is answered with "Your order 42
has shipped.". Registered under ``TOOL_WORKER_AGENT``; LIVEKIT_URL/_API_KEY/_API_SECRET as for
any worker. Run it as a module (``python -m tests.tool_worker`` from the repository): as a script,
its folder would come first on the path, and ``tests/livekit`` would shadow ``livekit``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "handoff"))

from common import TEXT_ONLY, Call, Say, ScriptedLLM, Step, last_item, serve, text_of
from livekit.agents import Agent, AgentSession, JobContext, RunContext, function_tool, llm

AGENT_NAME = os.environ.get("TOOL_WORKER_AGENT", "tool-worker")
TOOL_SECONDS = float(os.environ.get("TOOL_WORKER_SECONDS", "2"))
ANSWER = "Your order 42 has shipped."


def script(chat_ctx: llm.ChatContext) -> Step:
    item = last_item(chat_ctx)
    if item is not None and item.type == "function_call_output":
        return Say(ANSWER)
    if "order" in text_of(item).lower():
        return Call("look_up_order", {"order": "42"})
    return Say("How can I help?")


class OrderDesk(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You answer questions about orders.")

    @function_tool
    async def look_up_order(self, context: RunContext[Any], order: str) -> str:
        """Look an order up by its number (slow: a remote system)."""
        await asyncio.sleep(TOOL_SECONDS)
        return f"order {order}: shipped"

    async def on_enter(self) -> None:
        # A greeting: the caller's cue that the session (and its text input) is up.
        self.session.generate_reply()


async def entrypoint(ctx: JobContext) -> None:
    session: AgentSession[None] = AgentSession(llm=ScriptedLLM(AGENT_NAME, script))
    await ctx.connect()
    await session.start(OrderDesk(), room=ctx.room, room_options=TEXT_ONLY)


if __name__ == "__main__":
    serve(AGENT_NAME, entrypoint)
