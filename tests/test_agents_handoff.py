"""Seed 001 end to end: agent A hands off to agent B in another process, through the bridge's log.

B hydrates the conversation and every session field, takes the floor; A leaves once it has.
The dispatch is the one A builds (metadata: room and ledger sequence only); the loopback SFU has
no agent dispatch service, so the stand-in API starts B's process with that request.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ledger.agents import LedgerAgent, handoff_from_metadata
from ledger.client import Ledger
from ledger.settings import Settings
from tests.test_bridge_ingest import produce_session_bytes
from tests.test_bridge_livekit import Log, lk_settings, running_bridge  # noqa: F401

pytestmark = pytest.mark.livekit
REPO = str(Path(__file__).resolve().parent.parent)

TARGET = r"""
import asyncio, json, os, sys
from livekit import rtc
from ledger.agents import LedgerAgent, handoff_from_metadata
from ledger.client import Ledger
from ledger.settings import Settings

async def main():
    request = handoff_from_metadata(os.environ["DISPATCH_METADATA"])
    settings = Settings(nats_urls=(os.environ["NATS_URL"],), home=os.environ["LEDGER_HOME"])
    room = rtc.Room()
    await room.connect(os.environ["LK_URL"], os.environ["LK_TOKEN"])
    async with Ledger(settings) as ledger:
        me = LedgerAgent(room, ledger)
        snapshot = await me.take_over(request, task="billing", timeout=20)
        print(json.dumps({"session": snapshot.session, "seq": snapshot.seq,
                          "items": [i.item_id for i in snapshot.conversation],
                          "holder": me.floor_holder}), flush=True)
        left = asyncio.Event()
        room.on("participant_disconnected", lambda p: p.identity == "agent-a" and left.set())
        if "agent-a" in room.remote_participants:
            await asyncio.wait_for(left.wait(), 20)
        await me.stop()
    await room.disconnect()

asyncio.run(main())
"""


@dataclass
class CallData:
    caller: str = ""
    verified: bool = False
    account: dict[str, Any] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)
    api_client: Any = None


class DispatchStandIn:
    """Takes A's CreateAgentDispatchRequest and starts the target agent's process with it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.requests: list[Any] = []
        self.process: asyncio.subprocess.Process | None = None
        self.agent_dispatch = self

    async def create_dispatch(self, request: Any) -> None:
        self.requests.append(request)
        env = {**os.environ, **self.env, "DISPATCH_METADATA": request.metadata,
               "PYTHONPATH": REPO}
        self.process = await asyncio.create_subprocess_exec(sys.executable, "-c", TARGET, env=env,
                                                            stdout=asyncio.subprocess.PIPE)


async def test_seed_001_cross_process_handoff(lk_settings: Settings, ledger: Ledger, room: str,  # noqa: F811
                                              livekit_connect: Any, livekit_server: Any) -> None:
    log = Log(ledger, room)
    await livekit_connect("caller", room)
    a_room = await livekit_connect("agent-a", room, kind="agent")
    async with running_bridge(lk_settings, room):
        a = LedgerAgent(a_room, ledger)
        await a.start()
        await a.request_floor(task="identify caller")
        await a.wait_for_floor(timeout=15)
        data = CallData(caller="Ana", account={"id": 7, "tier": "gold"}, api_client=object())
        await a.sync_userdata(data)
        data.verified = True
        data.steps.append("identified")
        await a.sync_userdata(data)
        messages, item_id = await produce_session_bytes()
        for raw in messages:
            await a_room.local_participant.send_bytes(raw, name="AS", topic="lk.agent.session")
        await log.until(lambda rs: len(log.of("conversation.item")) >= 3 and len(log.of("session.patch")) >= 2)

        api = DispatchStandIn({"NATS_URL": lk_settings.nats_urls[0], "LEDGER_HOME": str(lk_settings.home),  # type: ignore[index]
                               "LK_URL": livekit_server.url, "LK_TOKEN": livekit_server.token("agent-b", room,
                                                                                              kind="agent")})
        seq = await a.hand_off("agent-b", reason="billing question", livekit_api=api, timeout=30)
        assert not a_room.isconnected()  # A left once B held the floor
        (request,) = api.requests
        assert request.agent_name == "agent-b" and request.room == room
        assert json.loads(request.metadata) == {"room": room, "ledger_seq": seq}
        assert handoff_from_metadata(request.metadata) is not None
        assert api.process is not None and api.process.stdout is not None
        line = await asyncio.wait_for(api.process.stdout.readline(), 30)
        assert await asyncio.wait_for(api.process.wait(), 30) == 0
        seen = json.loads(line)
        assert seen["session"] == {"caller": "Ana", "verified": True, "account": {"id": 7, "tier": "gold"},
                                   "steps": ["identified"]}
        assert seen["seq"] >= seq and seen["holder"] == "agent-b"
        assert item_id in seen["items"] and len(seen["items"]) >= 3
        await log.until(lambda rs: any(r.type == "participant.left" and r.event.body.identity == "agent-a"  # type: ignore[union-attr]
                                       for r in rs))
        types = [r.type for r in log.records]
        handoff_at = types.index("handoff")
        b_floor = next(i for i, r in enumerate(log.records) if r.type == "floor.request"
                       and r.event.body.agent_id == "agent-b")  # type: ignore[union-attr]
        a_left = next(i for i, r in enumerate(log.records) if r.type == "participant.left"
                      and r.event.body.identity == "agent-a")  # type: ignore[union-attr]
        assert handoff_at < b_floor < a_left  # no dead air: B had the floor before A left
    await log.close()
