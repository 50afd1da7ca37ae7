"""Faults on the LiveKit side, against the real livekit-server (``pytest -m "livekit and fault"``).

* livekit-server SIGKILLed mid-room and started again on the same ports: briefly (the SDK's
  resume fails, its full reconnect succeeds) and for longer than the SDK retries (~20 s: every
  client ends up disconnected, and the server has forgotten its rooms and dispatches). Either
  way the bridge comes back, the blind spot is one ``bridge.gap``, and later events are logged.
* 5% loss and 50 ms delay each way on the server's WebRTC UDP port (``tc netem``, or where the
  kernel has no netem an NFQUEUE delay line: ``tests/livekit/impair.py``) while agents publish
  reliable data: every packet is logged once, in each sender's order.

The server is shared by the whole session: every test leaves it running and healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from livekit import rtc

from room_ledger import events as ev
from room_ledger.bridge.tokens import create_dispatch
from room_ledger.bridge.worker import run_bridge
from room_ledger.client import Ledger, Record
from room_ledger.settings import Settings
from room_ledger.watch import RoomWatch as Log
from tests.livekit import impair
from tests.test_bridge_livekit import running_bridge

pytestmark = [pytest.mark.livekit, pytest.mark.fault]


@pytest.fixture
def restore_environ() -> Iterator[None]:
    """``AgentServer.run`` writes ``LIVEKIT_*`` into ``os.environ``: put it back afterwards."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def lk_settings(settings: Settings, livekit_server: Any, restore_environ: None) -> Settings:
    if not livekit_server.local:
        pytest.skip("needs the local livekit-server (LIVEKIT_URL is set)")
    return settings.replace(livekit_url=livekit_server.url, livekit_api_key=livekit_server.api_key,
                            livekit_api_secret=livekit_server.api_secret,
                            bridge_agent_name=f"ledger-bridge-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def server_down(livekit_server: Any) -> Iterator[None]:
    """SIGKILL livekit-server; start it again (same ports) on leaving, whatever happened inside."""
    livekit_server.kill()
    try:
        yield
    finally:
        livekit_server.start()


def connection_states(lk_room: rtc.Room) -> asyncio.Queue[int]:
    states: asyncio.Queue[int] = asyncio.Queue()
    lk_room.on("connection_state_changed", states.put_nowait)
    return states


async def reaches(states: asyncio.Queue[int], state: int, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while await states.get() != state:
            pass


def data_text(record: Record) -> str:
    body = record.event.body  # type: ignore[union-attr]
    return str(getattr(body, "text", "") or "")


def texts(log: Log) -> list[str]:
    return [r.event.body.text or "" for r in log.of("data")]  # type: ignore[union-attr]


def joined_after(log: Log, identity: str, after: Record) -> bool:
    return any(r.seq > after.seq and r.type == "participant.joined" and r.event.body.identity == identity  # type: ignore[union-attr]
               for r in log.records)


async def test_server_killed_briefly_bridge_reconnects_and_records_the_gap(
        lk_settings: Settings, ledger: Ledger, room: str, livekit_connect: Any, livekit_server: Any) -> None:
    log = Log(ledger, room)
    agent = await livekit_connect("agent-k", room, kind="agent")
    async with running_bridge(lk_settings, room) as (_, bridges):
        await log.until(lambda rs: any(r.type == "participant.joined" and r.event.body.identity == "agent-k"  # type: ignore[union-attr]
                                       for r in rs))
        await agent.local_participant.publish_data(b"before the crash", topic="t")
        await log.until(lambda rs: "before the crash" in texts(log))
        agent_states = connection_states(agent)
        bridge_states = connection_states(bridges[0].room)
        with server_down(livekit_server):
            # down until both clients noticed, then straight back: within the SDK's retries
            await reaches(bridge_states, rtc.ConnectionState.CONN_RECONNECTING, 15)
            await reaches(agent_states, rtc.ConnectionState.CONN_RECONNECTING, 15)
        # The signal resume fails (the new server knows no one); the SDK's full reconnect joins anew.
        await reaches(bridge_states, rtc.ConnectionState.CONN_CONNECTED, 30)
        await reaches(agent_states, rtc.ConnectionState.CONN_CONNECTED, 30)
        await log.until(lambda rs: log.of("bridge.gap") != [], timeout=30)
        (gap,) = log.of("bridge.gap")
        await log.until(lambda rs: joined_after(log, "agent-k", gap))
        await agent.local_participant.publish_data(b"after the restart", topic="t")
        await log.until(lambda rs: "after the restart" in texts(log))
        assert len(bridges) == 1, "the SDK's own reconnect kept the same connection object"
    body = gap.event.body  # type: ignore[union-attr]
    assert isinstance(body, ev.BridgeGap) and body.reason == "livekit reconnect"
    assert body.ended_at > body.started_at
    before = next(r for r in log.of("data") if data_text(r) == "before the crash")
    after = next(r for r in log.of("data") if data_text(r) == "after the restart")
    assert before.seq < gap.seq < after.seq
    assert texts(log) == ["before the crash", "after the restart"]
    await log.close()


class _LogLine(logging.Handler):
    """Sets ``seen`` when a record of ``logger`` says ``text`` (from whichever thread logs it)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


@contextlib.contextmanager
def watch_log(logger: str, text: str) -> Iterator[_LogLine]:
    handler = _LogLine(text)
    target = logging.getLogger(logger)
    old_level = target.level
    target.addHandler(handler)
    target.setLevel(min(old_level or logging.WARNING, logging.WARNING))
    try:
        yield handler
    finally:
        target.removeHandler(handler)
        target.setLevel(old_level)


async def test_server_down_longer_than_sdk_retries_worker_bridge_rejoins_and_records_the_gap(
        lk_settings: Settings, ledger: Ledger, room: str, livekit_connect: Callable[..., Awaitable[rtc.Room]],
        livekit_server: Any) -> None:
    """A worker-mode (dispatched) bridge whose job's SDK gave up while the server was down.

    The restarted server has no room and no dispatch: nothing would put the bridge back. The
    worker rejoins the room itself and records the blind spot as one ``bridge.gap``."""
    log = Log(ledger, room)
    agent = await livekit_connect("agent-w", room, kind="agent")
    stop = asyncio.Event()
    mark = livekit_server.log_mark()
    worker = asyncio.create_task(run_bridge(lk_settings, room=None, stop=stop, flush_deadline=2.0))
    try:
        await livekit_server.worker_registered(lk_settings.bridge_agent_name, 30, after=mark)
        await create_dispatch(lk_settings, room)
        await log.until(lambda rs: log.of("bridge.joined") != [] and any(
            r.type == "participant.joined" and r.event.body.identity == "agent-w" for r in rs))  # type: ignore[union-attr]
        await agent.local_participant.publish_data(b"before the crash", topic="t")
        await log.until(lambda rs: "before the crash" in texts(log))
        agent_states = connection_states(agent)
        with watch_log("bridge.worker", "job lost its LiveKit connection") as job_lost, server_down(livekit_server):
            # down until the SDK gives up, in our agent and in the bridge's job
            await reaches(agent_states, rtc.ConnectionState.CONN_DISCONNECTED, 60)
            assert await asyncio.to_thread(job_lost.seen.wait, 30), "the bridge's job never gave up"
        await log.until(lambda rs: log.of("bridge.gap") != [], timeout=60)
        (gap,) = log.of("bridge.gap")
        agent = await livekit_connect("agent-w", room, kind="agent")  # the SDK gave up: a new connection
        await log.until(lambda rs: joined_after(log, "agent-w", gap))
        await agent.local_participant.publish_data(b"after the restart", topic="t")
        await log.until(lambda rs: "after the restart" in texts(log))
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)
    body = gap.event.body  # type: ignore[union-attr]
    assert isinstance(body, ev.BridgeGap) and body.reason == "livekit connection lost"
    assert body.ended_at > body.started_at
    # the job did not leave: the blind spot is the gap, not a departure
    before = next(r for r in log.of("data") if data_text(r) == "before the crash")
    assert [r.type for r in log.records if before.seq < r.seq < gap.seq and r.type.startswith("bridge.")] == []
    assert texts(log) == ["before the crash", "after the restart"]
    await log.until(lambda rs: rs[-1].type == "bridge.left")
    await log.close()


async def test_a_burst_of_dispatches_to_an_idle_worker_bridges_every_room(
        lk_settings: Settings, ledger: Ledger, livekit_connect: Callable[..., Awaitable[rtc.Room]],
        livekit_server: Any) -> None:
    """Rooms dispatched together to a worker with no job yet: each one is bridged.

    livekit-agents counted an accepted job of an idle worker as its whole load threshold, so the
    worker refused the rest of the burst and livekit-server dropped them for good."""
    rooms = [f"test-{uuid.uuid4().hex[:12]}" for _ in range(6)]
    logs = [Log(ledger, room) for room in rooms]
    for room in rooms:
        await livekit_connect("agent-b", room, kind="agent")
    stop = asyncio.Event()
    mark = livekit_server.log_mark()
    worker = asyncio.create_task(run_bridge(lk_settings, room=None, stop=stop, flush_deadline=2.0))
    try:
        await livekit_server.worker_registered(lk_settings.bridge_agent_name, 30, after=mark)
        await asyncio.gather(*(create_dispatch(lk_settings, room) for room in rooms))
        for log in logs:
            await log.until(lambda rs: any(r.type == "participant.joined" for r in rs), timeout=60)
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)
    for log in logs:
        assert [r.type for r in log.records][:2] == ["bridge.joined", "participant.joined"]
        await log.close()


async def test_loss_and_delay_on_the_servers_udp_port_every_reliable_packet_logged_once_in_order(
        lk_settings: Settings, ledger: Ledger, room: str, livekit_connect: Callable[..., Awaitable[rtc.Room]],
        livekit_server: Any) -> None:
    if reason := impair.why_not():
        pytest.skip(reason)
    per_agent = 200
    log = Log(ledger, room)
    agents = [await livekit_connect(f"agent-{n}", room, kind="agent") for n in "xyz"]
    async with running_bridge(lk_settings, room):
        await log.until(lambda rs: {r.event.body.identity for r in log.of("participant.joined")}  # type: ignore[union-attr]
                        >= {"agent-x", "agent-y", "agent-z"})

        async def publish(agent: rtc.Room) -> None:
            me = agent.local_participant.identity
            for i in range(per_agent):
                payload = {"agent_id": me, "status": "processing", "action_lock": False, "task": f"{me}#{i}"}
                await agent.local_participant.publish_data(json.dumps(payload).encode(), reliable=True,
                                                           topic="agent-state")

        with impair.impaired_udp_port(livekit_server.udp_port, loss=0.05, delay_s=0.05) as impairment:
            await asyncio.gather(*(publish(agent) for agent in agents))
            await log.until(lambda rs: log.count("agent.status") >= 3 * per_agent, timeout=120)
    # the impairment applied, both ways, to this traffic
    assert impairment.dropped > 0 and impairment.seen > 3 * per_agent, impairment
    if impairment.method != "tc netem":
        assert impairment.to_port > 0 and impairment.from_port > 0, impairment
    logged: dict[str, list[int]] = {}
    for record in log.of("agent.status"):
        agent_id, counter = record.event.body.task.split("#")  # type: ignore[union-attr]
        assert record.event.sender.identity == agent_id
        logged.setdefault(agent_id, []).append(int(counter))
    assert logged == {f"agent-{n}": list(range(per_agent)) for n in "xyz"}
    await log.close()
