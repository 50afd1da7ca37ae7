"""A tool call in flight, on the real livekit-server (issue 23): a real ``AgentSession`` in an agent
worker (``tests/tool_worker.py``) whose tool takes about 2 s, and the bridge recording the room.

While the tool runs, the log already holds its ``tool.execution`` start (LiveKit Agents puts the
call in its feed's conversation only with the output), the folded conversation shows the call, and
a resumed agent's view closes it as interrupted when asked. After the tool ends, the call and its
output are in the conversation once each, the call where it started.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from livekit import api

from room_ledger import events as ev
from room_ledger.chat import INTERRUPTED_OUTPUT
from room_ledger.client import Ledger, Record
from room_ledger.hydrate import hydrate
from room_ledger.settings import Settings
from room_ledger.state import fold
from room_ledger.watch import RoomWatch as Log
from tests import processes
from tests.handoff_example import REPO, Replies
from tests.livekit.server import http_url
from tests.test_bridge_livekit import body_of, lk_settings, running_bridge  # noqa: F401

pytestmark = pytest.mark.livekit

TOOL_SECONDS = 2.0
#: What tests/tool_worker.py's agent says once the tool has returned (its ANSWER).
ANSWER = "Your order 42 has shipped."


@pytest.fixture
async def tool_worker(livekit_server: Any, tmp_path: Path) -> AsyncIterator[str]:
    """The worker, registered under a name of this test's own; its agent name."""
    name = f"tool-worker-{uuid.uuid4().hex[:8]}"
    env = {"LIVEKIT_URL": livekit_server.url, "LIVEKIT_API_KEY": livekit_server.api_key,
           "LIVEKIT_API_SECRET": livekit_server.api_secret, "TOOL_WORKER_AGENT": name,
           "TOOL_WORKER_SECONDS": str(TOOL_SECONDS), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    mark = livekit_server.log_mark()
    output = tmp_path / "worker.log"
    with output.open("ab") as log:
        # as a module: a script's own folder comes first on its path, and tests/livekit is not livekit
        proc = await processes.start(sys.executable, "-m", "tests.tool_worker", env={**os.environ, **env},
                                     stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        registered = asyncio.ensure_future(livekit_server.worker_registered(name, 60, after=mark))
        while not registered.done():
            await asyncio.wait({registered}, timeout=0.5)
            if proc.returncode is not None and not registered.done():
                registered.cancel()
                raise AssertionError(f"the worker exited with {proc.returncode}:\n{output.read_text()[-4000:]}")
        registered.result()
        yield name
    finally:
        await processes.stop(proc)


def call_items(records: list[Record], call_id: str) -> list[tuple[str, str]]:
    """The conversation's items of one call, folded from ``records``: (type, source)."""
    return [(i.type, i.source) for i in fold(records).conversation if i.call_id == call_id]


async def test_a_running_tool_call_is_in_the_log_and_the_conversation(
        lk_settings: Settings, ledger: Ledger, room: str, livekit_connect: Any, livekit_server: Any,
        tool_worker: str) -> None:
    log = Log(ledger, room)
    async with running_bridge(lk_settings, room):
        caller = await livekit_connect("caller", room)
        replies = Replies(caller)
        async with api.LiveKitAPI(http_url(livekit_server.url), livekit_server.api_key,
                                  livekit_server.api_secret) as lk:
            await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(agent_name=tool_worker, room=room))
        greeting = await replies.next(timeout=30)  # the session, and its text input, are up
        assert greeting.text == "How can I help?"
        await caller.local_participant.send_text("where is my order?", topic="lk.chat")

        def started(records: list[Record]) -> bool:
            return any(r.type == "tool.execution" and body_of(r).stage == "started" for r in records)

        await log.until(started, timeout=30, what="the tool's start")
        running = list(log.records)
        (start,) = [r for r in running if r.type == "tool.execution"]
        body = body_of(start)
        assert isinstance(start.event, ev.ToolExecutionEvent)
        assert (body.name, body.arguments, start.event.sender.kind) == ("look_up_order", '{"order": "42"}', "agent")
        call_id = body.call_id
        # the tool is still running: neither its end nor its output has reached the log
        assert not [r for r in running if r.type == "conversation.item" and body_of(r).call_id == call_id]
        assert call_items(running, call_id) == [("function_call", "tool.execution")]
        # what a resumed agent would be given now (hydrated from the log: no projection here)
        snapshot = await hydrate(ledger, room)
        assert [i.type for i in snapshot.chat_ctx().items if getattr(i, "call_id", None) == call_id] == [
            "function_call"]
        closed = [i for i in snapshot.chat_ctx(close_open_calls=INTERRUPTED_OUTPUT).items
                  if getattr(i, "call_id", None) == call_id]
        assert [(i.type, getattr(i, "output", None)) for i in closed] == [
            ("function_call", None), ("function_call_output", INTERRUPTED_OUTPUT)]

        answer = await replies.next(timeout=30)
        assert answer.text == ANSWER

        def finished(records: list[Record]) -> bool:
            return any(r.type == "conversation.item" and body_of(r).item_type == "function_call_output"
                       and body_of(r).call_id == call_id for r in records)

        await log.until(finished, timeout=30, what="the tool's output")
        records = list(log.records)
    await log.close()

    steps = [(body_of(r).stage, body_of(r).status) for r in records if r.type == "tool.execution"]
    assert steps[0] == ("started", None) and ("ended", "done") in steps
    ended = next(r for r in records if r.type == "tool.execution" and body_of(r).stage == "ended")
    output = next(r for r in records if r.type == "conversation.item" and body_of(r).item_type == "function_call_output")
    # the start was recorded before the tool ended, and about the tool's time before it
    assert start.seq < ended.seq < output.seq
    assert (ended.event.at - start.event.at).total_seconds() >= TOOL_SECONDS - 0.2  # type: ignore[operator]
    # one call and one output, the call completed where it started
    assert call_items(records, call_id) == [("function_call", "conversation.item"),
                                            ("function_call_output", "conversation.item")]
    (call,) = [i for i in fold(records).conversation if i.call_id == call_id and i.type == "function_call"]
    assert call.seq == start.seq and call.item_id == f"call:{call_id}"
    snapshot_items = (await hydrate(ledger, room)).chat_ctx(close_open_calls=INTERRUPTED_OUTPUT).items
    outputs = [i for i in snapshot_items if i.type == "function_call_output" and i.call_id == call_id]
    assert [o.output for o in outputs] == ["order 42: shipped"]  # nothing synthetic once it returned
