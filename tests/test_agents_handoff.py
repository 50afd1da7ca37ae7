"""Seed 001 end to end with the helpers of ``ledger.agents``: agent A hands off to agent B, a real
livekit-agents ``AgentServer`` worker in another process, dispatched by the real livekit-server.

B reads the dispatch's metadata (room and ledger sequence only), hydrates the conversation and
every session field, takes the floor; A leaves once it has. And when two handoffs of one caller
race, log order decides, and both processes agree on which one passed the floor.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ledger.agents import HandoffLost, LedgerAgent, handoff_from_metadata, handoff_took_effect
from ledger.client import Ledger
from ledger.settings import Settings
from ledger.watch import RoomWatch as Log
from tests.test_bridge_ingest import produce_session_bytes
from tests.test_bridge_livekit import lk_settings, running_bridge  # noqa: F401

pytestmark = pytest.mark.livekit
REPO = str(Path(__file__).resolve().parent.parent)

#: The target: an AgentServer worker (jobs in its own process) whose entrypoint takes over.
TARGET = r"""
import asyncio, json, os, sys
from livekit.agents import AgentServer, JobExecutorType
from ledger.agents import LedgerAgent, handoff_from_metadata
from ledger.client import Ledger
from ledger.settings import Settings

async def entrypoint(ctx):
    request = handoff_from_metadata(ctx.job.metadata)
    await ctx.connect()
    async with Ledger(Settings.from_env()) as ledger:
        me = LedgerAgent(ctx.room, ledger, agent_id=ctx.job.agent_name)
        snapshot = await me.take_over(request, task="billing", timeout=20)
        print(json.dumps({"metadata": ctx.job.metadata, "session": snapshot.session, "seq": snapshot.seq,
                          "items": [i.item_id for i in snapshot.conversation],
                          "holder": me.floor_holder}), flush=True)
        await me.stop()

server = AgentServer(job_executor_type=JobExecutorType.THREAD, num_idle_processes=0, port=0,
                     load_fnc=lambda s: 0.0, load_threshold=1.0)
server.rtc_session(entrypoint, agent_name=os.environ["TARGET_AGENT"])
asyncio.run(server.run(devmode=False))
"""


@dataclass
class CallData:
    caller: str = ""
    verified: bool = False
    account: dict[str, Any] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)
    api_client: Any = None


async def test_seed_001_cross_process_handoff(lk_settings: Settings, ledger: Ledger, room: str,
                                              livekit_connect: Any, livekit_server: Any) -> None:
    target = f"agent-b-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONPATH": REPO, "TARGET_AGENT": target, "LIVEKIT_URL": livekit_server.url,
           "LIVEKIT_API_KEY": livekit_server.api_key, "LIVEKIT_API_SECRET": livekit_server.api_secret,
           "LEDGER_NATS_URL": lk_settings.nats_urls[0], "LEDGER_HOME": str(lk_settings.home)}  # type: ignore[index]
    mark = livekit_server.log_mark()
    worker = await asyncio.create_subprocess_exec(sys.executable, "-c", TARGET, env=env,
                                                  stdout=asyncio.subprocess.PIPE)
    try:
        await livekit_server.worker_registered(target, 60, after=mark)
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

            async with livekit_server.api() as lk:
                seq = await a.hand_off(target, reason="billing question", livekit_api=lk, timeout=30)
                assert not a_room.isconnected()  # A left once B held the floor
                (dispatch,) = [d for d in await lk.agent_dispatch.list_dispatch(room) if d.agent_name == target]
            assert json.loads(dispatch.metadata) == {"room": room, "ledger_seq": seq}
            assert worker.stdout is not None
            seen = json.loads(await asyncio.wait_for(worker.stdout.readline(), 30))
            request = handoff_from_metadata(seen["metadata"])
            assert request is not None and (request.room, request.ledger_seq) == (room, seq)
            assert seen["session"] == {"caller": "Ana", "verified": True, "account": {"id": 7, "tier": "gold"},
                                       "steps": ["identified"]}
            assert seen["seq"] >= seq and seen["holder"] == target
            assert item_id in seen["items"] and len(seen["items"]) >= 3
            await log.until(lambda rs: any(r.type == "participant.left" and r.event.body.identity == "agent-a"  # type: ignore[union-attr]
                                           for r in rs))
            types = [r.type for r in log.records]
            handoff_at = types.index("handoff")
            b_floor = next(i for i, r in enumerate(log.records) if r.type == "floor.request"
                           and r.event.body.agent_id == target)  # type: ignore[union-attr]
            a_left = next(i for i, r in enumerate(log.records) if r.type == "participant.left"
                          and r.event.body.identity == "agent-a")  # type: ignore[union-attr]
            assert handoff_at < b_floor < a_left  # no dead air: B had the floor before A left
        await log.close()
    finally:
        if worker.returncode is None:
            worker.terminate()
        await asyncio.wait_for(worker.wait(), 30)


async def test_racing_handoffs_log_order_decides(lk_settings: Settings, ledger: Ledger, room: str,
                                                 livekit_connect: Any) -> None:
    """Two processes hand the same caller off at once (one agent id, two connections): the first
    handoff in the log passes the floor; the other passes nothing and dispatches nobody; the
    sources and a third reader all say the same, and only the winner's target gets the floor."""
    log = Log(ledger, room)
    one = await livekit_connect("triage-1", room, kind="agent")
    two = await livekit_connect("triage-2", room, kind="agent")
    targets = {name: await livekit_connect(name, room, kind="agent") for name in ("billing", "sales")}
    async with running_bridge(lk_settings, room), Ledger(lk_settings) as own, Ledger(lk_settings) as other:
        first, second = LedgerAgent(one, own, agent_id="triage"), LedgerAgent(two, other, agent_id="triage")
        await first.start()
        await second.start()
        await first.request_floor(task="triage")
        await first.wait_for_floor(timeout=15)
        await second.wait_for_floor("triage", timeout=15)
        racing = asyncio.gather(
            first.hand_off("billing", reason="bill", dispatch=False, leave=False, timeout=15),
            second.hand_off("sales", reason="upgrade", dispatch=False, leave=False, timeout=15),
            return_exceptions=True)
        await log.until(lambda rs: len(log.of("handoff")) == 2)
        handoffs = log.of("handoff")
        # a third process, reading the log afresh, finds which handoff passed the floor
        reader = LedgerAgent(targets["billing"], ledger, agent_id="reader")
        await reader.start()
        passed = [h for h in handoffs if handoff_took_effect(reader.state, h.seq, "triage")]
        assert [h.seq for h in passed] == [handoffs[0].seq]  # the first in the log
        winner = passed[0].event.body.to_agent  # type: ignore[union-attr]
        target = LedgerAgent(targets[winner], ledger, agent_id=winner)
        await target.start()
        await target.request_floor(task="taken over")
        results = await asyncio.wait_for(racing, 30)
        won = [r for r in results if isinstance(r, int)]
        lost = [r for r in results if isinstance(r, HandoffLost)]
        assert len(won) == 1 and len(lost) == 1, results
        assert won[0] == handoffs[0].seq and lost[0].seq == handoffs[1].seq
        assert lost[0].to_agent != winner
        for agent in (first, second):  # both sources agree with the reader
            assert handoff_took_effect(agent.state, handoffs[0].seq, "triage")
            assert not handoff_took_effect(agent.state, handoffs[1].seq, "triage")
            # the loser learns of its loss before its followed log has the target's claim
            await agent.wait_for_floor(winner, timeout=15)
        for agent in (first, second, reader, target):
            await agent.stop()
    await log.close()

