"""The bridge through the real livekit SDK and livekit-server, into real NATS (``pytest -m livekit``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from room_ledger import events as ev
from room_ledger.bridge.room import RoomBridge
from room_ledger.bridge.worker import bridge_one_room
from room_ledger.bridge.writer import BridgeWriter
from room_ledger.client import Ledger, Record
from room_ledger.settings import Settings
from room_ledger.state import fold
from room_ledger.watch import RoomWatch as Log

pytestmark = pytest.mark.livekit



@pytest.fixture
def lk_settings(settings: Settings, livekit_server: Any) -> Settings:
    return settings.replace(livekit_url=livekit_server.url, livekit_api_key=livekit_server.api_key,
                            livekit_api_secret=livekit_server.api_secret)


@contextlib.asynccontextmanager
async def running_bridge(settings: Settings, room: str) -> AsyncIterator[tuple[BridgeWriter, list[RoomBridge]]]:
    async with Ledger(settings) as ledger:
        writer = BridgeWriter(ledger, stats_interval=0)
        await writer.start()
        stop = asyncio.Event()
        connected = asyncio.Event()
        bridges: list[RoomBridge] = []

        def on_connected(bridge: RoomBridge) -> None:
            bridges.append(bridge)
            connected.set()

        task = asyncio.create_task(bridge_one_room(settings, room, writer, stop, on_connected=on_connected))
        await asyncio.wait_for(connected.wait(), 20)
        try:
            yield writer, bridges
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
            await writer.close()


def body_of(record: Record) -> Any:
    """``record.event.body``, untyped: for reading a field of the event type a test selected the
    records by (``log.of("transcript")``, ``r.type == "data"``), which mypy cannot narrow to."""
    event: Any = record.event
    return event.body


def seed_json(agent: str, status: str, lock: bool, task: str) -> bytes:
    return json.dumps({"agent_id": agent, "status": status, "action_lock": lock, "task": task}).encode()


async def test_seed_000_three_agents_take_turns(lk_settings: Settings, ledger: Ledger, room: str,
                                                livekit_connect: Any) -> None:
    log = Log(ledger, room)
    user = await livekit_connect("user", room)
    async with running_bridge(lk_settings, room):
        agents = [await livekit_connect(f"agent-{n}", room, kind="agent") for n in "abc"]
        await log.until(lambda rs: len([r for r in rs if r.type == "participant.joined"]) >= 4)
        expected: list[bytes] = []
        for turn in range(6):
            agent = agents[turn % 3]
            me = agent.local_participant.identity
            for status, lock in (("processing", True), ("resolved", False)):
                payload = seed_json(me, status, lock, f"turn-{turn}")
                expected.append(payload)
                await agent.local_participant.publish_data(payload, reliable=True, topic="agent-state")
                # take turns: the next step waits until the room's log has this one
                # python/mypy#15459: a lambda with a default argument ("n=") is not inferred
                await log.until(lambda rs, n=len(expected):  # type: ignore[misc]
                                len([r for r in rs if r.type == "agent.status"]) >= n)
        statuses = log.of("agent.status")
        assert [json.dumps(msgspec_builtins(body_of(r))) for r in statuses] == [
            json.dumps(json.loads(p)) for p in expected]
        assert all(r.event.sender.kind == "agent" for r in statuses)
        state = fold(log.records)
        history = [(t.holder, t.task, t.end_reason) for t in state.floor.history]
        assert history == [(f"agent-{'abc'[t % 3]}", f"turn-{t}", "resolved") for t in range(6)]
        assert state.floor.holder is None
        del user
    await log.until(lambda rs: rs[-1].type == "bridge.left")
    await log.close()


def msgspec_builtins(body: Any) -> dict[str, Any]:
    return {k: getattr(body, k) for k in ("agent_id", "status", "action_lock", "task")}


async def test_transcripts_chat_streams_and_session_feed(lk_settings: Settings, ledger: Ledger, room: str,
                                                         livekit_connect: Any) -> None:
    from tests.test_bridge_ingest import produce_session_bytes

    log = Log(ledger, room)
    user = await livekit_connect("caller", room)
    agent = await livekit_connect("helper", room, kind="agent",
                                  attributes={"lk.agent.state": "listening"})
    async with running_bridge(lk_settings, room):
        await log.until(lambda rs: len(log.of("participant.joined")) >= 2)
        lp = agent.local_participant
        # user transcript: interim then a final stream per segment (published by the agent for the user)
        for final in ("false", "true"):
            await lp.send_text("I need a refund" if final == "true" else "I need",
                               topic="lk.transcription",
                               attributes={"lk.segment_id": "SG_u1", "lk.transcription_final": final})
        # agent transcript: one stream, final flag in the trailer
        writer = await lp.stream_text(topic="lk.transcription", attributes={"lk.segment_id": "SG_a1"})
        await writer.write("Sure, ")
        await writer.write("let me check.")
        await writer.aclose(attributes={"lk.transcription_final": "true"})
        await user.local_participant.send_text("hello from chat", topic="lk.chat")
        await user.local_participant.send_text("x" * 20_000, topic="custom-topic")
        await lp.send_text(json.dumps({"type": "context.summary", "id": "s1", "text": "y" * 20_000,
                                       "covers_seq": 1}), topic="ledger")
        messages, item_id = await produce_session_bytes()
        for raw in messages:
            await lp.send_bytes(raw, name="AS_x", topic="lk.agent.session")
        await lp.set_attributes({"lk.agent.state": "thinking"})
        await log.until(lambda rs: len(log.of("conversation.item")) >= 3 and len(log.of("transcript")) >= 2
                        and log.of("context.summary") != [] and len(log.of("agent.state")) >= 2
                        and log.of("chat.message") != [] and log.of("data") != [])
        transcripts = [body_of(r) for r in log.of("transcript")]
        assert [(t.speaker, t.text) for t in transcripts] == [("helper", "I need a refund"),
                                                              ("helper", "Sure, let me check.")]
        (chat,) = log.of("chat.message")
        assert isinstance(chat.event, ev.ChatMessageEvent)
        assert chat.event.body.text == "hello from chat" and chat.event.sender.identity == "caller"
        (custom,) = log.of("data")
        assert isinstance(custom.event, ev.DataEvent)
        assert custom.event.body.topic == "custom-topic" and custom.event.body.size == 20_000
        items = [body_of(r) for r in log.of("conversation.item")]
        # a user message in the agent's feed: the feed names no one (not the agent that sent it), and
        # the fold credits the one person in the room
        assert items[0].item_id == item_id and items[0].role == "user" and items[0].speaker is None
        said = next(i for i in fold(log.records).conversation if i.text == "my order is late")
        assert said.speaker == "caller"
        states = [body_of(r).state for r in log.of("agent.state")]
        assert "thinking" in states
    await log.close()


async def test_reconnect_records_a_gap_and_a_fresh_snapshot(lk_settings: Settings, ledger: Ledger, room: str,
                                                            livekit_connect: Any, livekit_server: Any) -> None:
    log = Log(ledger, room)
    await livekit_connect("early", room)
    async with running_bridge(lk_settings, room) as (writer, bridges):
        await log.until(lambda rs: any(r.type == "participant.joined" and body_of(r).snapshot for r in rs))
        identity = bridges[0].room.local_participant.identity
        await livekit_server.drop_signal(room, identity)  # the SDK resumes the session
        await log.until(lambda rs: log.of("bridge.gap") != [])
        await log.until(lambda rs: len([r for r in rs if r.type == "participant.joined"
                                        and body_of(r).snapshot]) >= 2)
        gap = body_of(log.of("bridge.gap")[0])
        assert isinstance(gap, ev.BridgeGap) and gap.ended_at >= gap.started_at
        # packets keep flowing after the reconnect
        other = await livekit_connect("late", room)
        await other.local_participant.publish_data(b"after", topic="t")
        await log.until(lambda rs: any(r.type == "data" and body_of(r).text == "after" for r in rs))
        assert writer.counters.gaps >= 1
    await log.close()


async def test_two_bridges_in_one_room_store_each_event_once(lk_settings: Settings, ledger: Ledger, room: str,
                                                             livekit_connect: Any) -> None:
    log = Log(ledger, room)
    agent = await livekit_connect("solo", room, kind="agent")
    async with running_bridge(lk_settings, room), running_bridge(lk_settings, room):
        await log.until(lambda rs: len(log.of("bridge.joined")) == 2)
        for i in range(20):
            await agent.local_participant.publish_data(
                json.dumps({"type": "floor.request", "id": f"claim-{i}", "agent_id": "solo", "task": f"t{i}"}).encode(),
                topic="ledger")
        await agent.local_participant.send_text("chat once", topic="lk.chat")
        await log.until(lambda rs: len(log.of("floor.request")) >= 20 and log.of("chat.message") != [])
    ids = [r.event.id for r in log.records]
    assert len(ids) == len(set(ids))
    assert len(log.of("floor.request")) == 20 and len(log.of("chat.message")) == 1
    await log.close()
