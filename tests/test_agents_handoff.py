"""When two handoffs of one caller race, log order decides, and every process agrees which one passed
the floor (the rule ``room_ledger.handoff`` applies to every transfer: ``handoff_took_effect``).

The handoff itself, across processes with real ``AgentSession``s, is tested in
``tests/test_handoff_example.py`` (and by voice in ``tests/test_voice_handoff.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from room_ledger import events as ev
from room_ledger.agents import LedgerAgent, handoff_took_effect
from room_ledger.client import Ledger
from room_ledger.settings import Settings
from room_ledger.watch import RoomWatch as Log
from tests.test_bridge_livekit import lk_settings, running_bridge  # noqa: F401

pytestmark = pytest.mark.livekit


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
        # both at once, as LedgerLink's transfer publishes one (room_ledger/handoff.py)
        ids = await asyncio.gather(
            first.publish("handoff", ev.Handoff(from_agent="triage", to_agent="billing", reason="bill")),
            second.publish("handoff", ev.Handoff(from_agent="triage", to_agent="sales", reason="upgrade")))
        seqs = await asyncio.gather(first.wait_for_event(ids[0], 15), second.wait_for_event(ids[1], 15))
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
        # each source learns from its own followed log whether its handoff passed the floor
        took = [handoff_took_effect(agent.state, seq, "triage") for agent, seq in zip((first, second), seqs,
                                                                                        strict=True)]
        assert sorted(took) == [False, True] and seqs[took.index(True)] == handoffs[0].seq
        for agent in (first, second):  # both sources agree with the reader
            assert handoff_took_effect(agent.state, handoffs[0].seq, "triage")
            assert not handoff_took_effect(agent.state, handoffs[1].seq, "triage")
            # the loser learns of its loss before its followed log has the target's claim
            await agent.wait_for_floor(winner, timeout=15)
        for agent in (first, second, reader, target):
            await agent.stop()
    await log.close()

