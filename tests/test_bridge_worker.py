"""The bridge in worker mode, end to end: a real ``livekit-agents`` ``AgentServer`` registers with
livekit-server's agent service, its dispatcher puts it into a room (``create_dispatch``,
``ledger dispatch``, or the room configuration of a user's token), and real ``rtc.Room`` agents'
seed-000 packets land in the log (``-m livekit``).

LiveKit offers a job only to workers registered at that moment and never retries, so every test
dispatches after the server's log says the worker registered (a ``LIVEKIT_URL`` server, whose log
we cannot read, skips these tests); everything else waits on the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from livekit import api, rtc

from room_ledger.bridge.tokens import bridge_token, create_dispatch, livekit_api, room_configuration
from room_ledger.bridge.worker import run_bridge
from room_ledger.client import Ledger, Record
from room_ledger.settings import Settings
from room_ledger.watch import RoomWatch as Log
from tests.livekit import Events, sees
from tests.test_cli_helpers import env_for

pytestmark = pytest.mark.livekit



@pytest.fixture
def restore_environ() -> Iterator[None]:
    """``AgentServer.run`` writes ``LIVEKIT_URL``/``LIVEKIT_API_KEY``/... into ``os.environ``:
    put it back so later tests (``LIVEKIT_URL not set`` errors) see the session's environment."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def lk_settings(settings: Settings, livekit_server: Any, restore_environ: None) -> Settings:
    """The session's NATS, livekit-server, and an agent name of this test's own."""
    return settings.replace(livekit_url=livekit_server.url, livekit_api_key=livekit_server.api_key,
                            livekit_api_secret=livekit_server.api_secret,
                            bridge_agent_name=f"ledger-bridge-{uuid.uuid4().hex[:8]}")


async def registered(livekit_server: Any, agent_name: str, runner: asyncio.Future[Any] | None = None,
                     timeout: float = 30.0, *, after: int = 0) -> None:
    """Wait until the server registered a worker under ``agent_name`` (fail early if ``runner`` ends)."""
    waiter = asyncio.ensure_future(livekit_server.worker_registered(agent_name, timeout, after=after))
    watched = {waiter} if runner is None else {waiter, runner}
    done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        raise AssertionError(f"the bridge ended before registering: {runner!r}")
    waiter.result()


@contextlib.asynccontextmanager
async def worker_bridge(settings: Settings, livekit_server: Any) -> AsyncIterator[asyncio.Event]:
    """``run_bridge(settings, room=None)`` in a task, registered; yields its stop event."""
    stop = asyncio.Event()
    mark = livekit_server.log_mark()
    task = asyncio.create_task(run_bridge(settings, room=None, stop=stop, flush_deadline=2.0))
    try:
        await registered(livekit_server, settings.bridge_agent_name, task, after=mark)
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def seed(agent: str, status: str, lock: bool, task: str) -> bytes:
    return json.dumps({"agent_id": agent, "status": status, "action_lock": lock, "task": task}).encode()


async def take_turns(log: Log, agents: list[rtc.Room], turns: int) -> list[dict[str, Any]]:
    """Seed 000: each agent in turn claims (processing, lock) and resolves; each packet is in the
    log before the next is sent.  Returns the payloads in the order sent."""
    sent: list[dict[str, Any]] = []
    for turn in range(turns):
        agent = agents[turn % len(agents)]
        me = agent.local_participant.identity
        for status, lock in (("processing", True), ("resolved", False)):
            payload = seed(me, status, lock, f"turn-{turn}")
            sent.append(json.loads(payload))
            await agent.local_participant.publish_data(payload, reliable=True, topic="agent-state")
            # python/mypy#15459: a lambda with a default argument ("n=") is not inferred
            await log.until(lambda rs, n=len(sent):  # type: ignore[misc]
                            sum(r.type == "agent.status" for r in rs) >= n)
    return sent


def body(record: Record) -> dict[str, Any]:
    event: Any = record.event  # an agent.status record
    b = event.body
    return {"agent_id": b.agent_id, "status": b.status, "action_lock": b.action_lock, "task": b.task}


async def read_all(ledger: Ledger, room: str) -> list[Record]:
    return [r async for r in ledger.read(room)]


async def test_dispatched_worker_bridge_records_seed_000(lk_settings: Settings, ledger: Ledger, room: str,
                                                         livekit_server: Any, livekit_connect: Any) -> None:
    name = lk_settings.bridge_agent_name
    log = Log(ledger, room)
    async with worker_bridge(lk_settings, livekit_server):
        agents = [await livekit_connect(f"agent-{n}", room, kind="agent") for n in "abc"]
        dispatch = await create_dispatch(lk_settings, room)
        assert dispatch.id.startswith("AD_") and dispatch.agent_name == name and dispatch.room == room
        await log.until(lambda rs: any(r.type == "bridge.joined" for r in rs))
        await log.until(lambda rs: sum(r.type == "participant.joined" for r in rs) >= 3)

        sent = await take_turns(log, agents, turns=3)
        # the job runs without livekit-agents' event-loop monitor (a watchdog thread per job,
        # waking every 20 ms: most of a many-room bridge's CPU, for audio it does not have)
        assert not [t.name for t in threading.enumerate() if t.name.startswith("livekit-loop-monitor-job")]

        # the bridge is in the room, hidden: listed by the server API only
        async with livekit_api(lk_settings) as lk:
            listed = (await lk.room.list_participants(api.ListParticipantsRequest(room=room))).participants
            # a room also lists the dispatch with no agent name that LiveKit makes for automatic dispatch
            listed_dispatches = [d.id for d in await lk.agent_dispatch.list_dispatch(room) if d.agent_name]
        bridges = [p for p in listed if p.identity not in {"agent-a", "agent-b", "agent-c"}]
        assert len(bridges) == 1
        bridge = bridges[0]
        assert bridge.permission.hidden and not bridge.permission.can_publish_data
        assert bridge.kind == api.ParticipantInfo.Kind.AGENT  # = rtc's PARTICIPANT_KIND_AGENT
        assert bridge.attributes["lk.agent_name"] == name
        assert listed_dispatches == [dispatch.id]
        for agent in agents:
            others = {a.local_participant.identity for a in agents} - {agent.local_participant.identity}
            await sees(agent, *others)
            assert set(agent.remote_participants) == others  # never the hidden bridge

    await log.until(lambda rs: rs[-1].type == "bridge.left")
    await log.close()
    records = await read_all(ledger, room)
    statuses = [r for r in records if r.type == "agent.status"]
    assert [body(r) for r in statuses] == sent
    assert [r.event.sender.identity for r in statuses] == [s["agent_id"] for s in sent]
    assert [r.seq for r in records] == sorted(r.seq for r in records)
    assert records[0].type == "bridge.joined" and records[-1].type == "bridge.left"


async def test_deleting_the_dispatch_ends_the_job_and_a_new_one_rejoins(
        lk_settings: Settings, ledger: Ledger, room: str, livekit_server: Any, livekit_connect: Any) -> None:
    log = Log(ledger, room)
    async with worker_bridge(lk_settings, livekit_server):
        agent = await livekit_connect("agent-a", room, kind="agent")
        first = await create_dispatch(lk_settings, room)
        await log.until(lambda rs: log.count("bridge.joined") == 1)
        async with livekit_api(lk_settings) as lk:
            await lk.agent_dispatch.delete_dispatch(first.id, room)
            await log.until(lambda rs: log.count("bridge.left") == 1)
            assert [d for d in await lk.agent_dispatch.list_dispatch(room) if d.agent_name] == []
            # the worker is still registered: a new dispatch brings the bridge back
            await create_dispatch(lk_settings, room)
            await log.until(lambda rs: log.count("bridge.joined") == 2)
            await agent.local_participant.publish_data(seed("agent-a", "processing", True, "again"), reliable=True)
            await log.until(lambda rs: any(r.type == "agent.status" for r in rs))
    await log.until(lambda rs: log.count("bridge.left") == 2)
    await log.close()


async def test_ledger_bridge_and_ledger_dispatch_commands(lk_settings: Settings, ledger: Ledger, room: str,
                                                         livekit_server: Any, livekit_connect: Any) -> None:
    """``ledger bridge`` (worker mode) and ``ledger dispatch <room>`` as real processes."""
    name = lk_settings.bridge_agent_name
    env = {**os.environ, **env_for(lk_settings), "LIVEKIT_URL": livekit_server.url,
           "LIVEKIT_API_KEY": livekit_server.api_key, "LIVEKIT_API_SECRET": livekit_server.api_secret,
           "LEDGER_BRIDGE_AGENT_NAME": name}
    log = Log(ledger, room)
    mark = livekit_server.log_mark()
    bridge = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "room_ledger.cli.main", "bridge", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await registered(livekit_server, name, asyncio.ensure_future(bridge.wait()), timeout=60, after=mark)
        agents = [await livekit_connect(f"agent-{n}", room, kind="agent") for n in "ab"]
        dispatch = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "room_ledger.cli.main", "dispatch", room, "--json", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(dispatch.communicate(), 60)
        assert dispatch.returncode == 0, err.decode()
        result = json.loads(out)
        assert result["room"] == room and result["agent_name"] == name and result["dispatch_id"].startswith("AD_")
        await log.until(lambda rs: any(r.type == "bridge.joined" for r in rs))
        await log.until(lambda rs: sum(r.type == "participant.joined" for r in rs) >= 2)
        sent = await take_turns(log, agents, turns=2)

        bridge.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(bridge.wait(), 30)
        _, err = await bridge.communicate()
        assert code == 0, err.decode()
        assert "bridge stopped:" in err.decode() and "Traceback" not in err.decode()
    finally:
        if bridge.returncode is None:
            bridge.kill()
            await bridge.wait()
    await log.until(lambda rs: rs[-1].type == "bridge.left")
    await log.close()
    statuses = [r for r in await read_all(ledger, room) if r.type == "agent.status"]
    assert [body(r) for r in statuses] == sent


async def test_room_configuration_in_a_user_token_dispatches_the_bridge(
        lk_settings: Settings, ledger: Ledger, room: str, livekit_server: Any) -> None:
    """``bridge.tokens.room_configuration`` in the first user's token: creating the room dispatches
    the bridge (LiveKit ignores a token's room configuration when the room already exists)."""
    log = Log(ledger, room)
    async with worker_bridge(lk_settings, livekit_server):
        token = (api.AccessToken(livekit_server.api_key, livekit_server.api_secret)
                 .with_identity("caller").with_grants(api.VideoGrants(room_join=True, room=room))
                 .with_room_config(room_configuration(lk_settings)).to_jwt())
        caller = rtc.Room()
        await caller.connect(livekit_server.url, token)
        try:
            await log.until(lambda rs: any(r.type == "bridge.joined" for r in rs))
            await caller.local_participant.publish_data(seed("caller", "processing", True, "t"), reliable=True)
            await log.until(lambda rs: any(r.type == "agent.status" for r in rs))
            async with livekit_api(lk_settings) as lk:
                dispatches = await lk.agent_dispatch.list_dispatch(room)
            assert [d.agent_name for d in dispatches if d.agent_name] == [lk_settings.bridge_agent_name]
        finally:
            await caller.disconnect()
    await log.until(lambda rs: rs[-1].type == "bridge.left")
    await log.close()


async def test_the_server_holds_the_bridge_to_its_token(
        lk_settings: Settings, ledger: Ledger, room: str, livekit_server: Any, livekit_connect: Any) -> None:
    """The bridge's token: hidden, subscribe-only, an agent.  The server lists it to no one and
    drops, silently, anything it tries to publish."""
    log = Log(ledger, room)
    caller = await livekit_connect("caller", room)
    got = Events(caller, "data_received", "participant_connected")
    async with worker_bridge(lk_settings, livekit_server):
        await create_dispatch(lk_settings, room)
        await log.until(lambda rs: any(r.type == "bridge.joined" for r in rs))
        async with livekit_api(lk_settings) as lk:
            listed = (await lk.room.list_participants(api.ListParticipantsRequest(room=room))).participants
        (bridge,) = [p for p in listed if p.identity != "caller"]
        grants = bridge.permission
        assert grants.hidden and grants.can_subscribe
        assert not grants.can_publish and not grants.can_publish_data
        assert bridge.kind == api.ParticipantInfo.Kind.AGENT  # = rtc's PARTICIPANT_KIND_AGENT
        assert "caller" in {p.identity for p in listed} and bridge.identity not in caller.remote_participants

        # what the token forbids, the server refuses: a packet from the bridge's identity never arrives
        forged = rtc.Room()
        await forged.connect(livekit_server.url, bridge_token(lk_settings, room, f"{bridge.identity}-probe"))
        try:
            await forged.local_participant.publish_data(b"from the bridge", topic="t")
            await forged.local_participant.set_attributes({"x": "y"})  # refused too: no can_update_own_metadata
        except Exception as exc:
            assert "permission" in str(exc).lower() or "denied" in str(exc).lower(), exc
        finally:
            await forged.disconnect()
        other = await livekit_connect("other", room)
        await other.local_participant.publish_data(b"allowed", topic="t")
        (packet,) = await got.next("data_received")
        assert packet.data == b"allowed"
        assert [name for name, _ in got.pending() if name == "data_received"] == []
        assert all(p.identity in {"caller", "other"} for p in caller.remote_participants.values())
    await log.until(lambda rs: rs[-1].type == "bridge.left")
    await log.close()
