"""``ledger dispatch`` records its dispatches; ``ledger dispatches <room>`` puts LiveKit's list beside
the agents that joined for them, on the real livekit-server with real agent workers (``-m livekit``)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from room_ledger import events as ev
from room_ledger.client import Ledger
from room_ledger.settings import Settings
from room_ledger.watch import RoomWatch as Log
from tests.livekit import sees
from tests.test_bridge_worker import lk_settings, registered, restore_environ, worker_bridge
from tests.test_cli_helpers import invoke, json_of, ok

pytestmark = pytest.mark.livekit
__all__ = ["lk_settings", "restore_environ"]  # fixtures used by name


@contextlib.asynccontextmanager
async def agent_worker(livekit_server: Any, agent_name: str) -> AsyncIterator[list[str]]:
    """A LiveKit Agents worker registered under ``agent_name`` whose jobs join their room as an
    agent participant and stay; yields the rooms it was given, as they come."""
    from livekit.agents import AgentServer, JobExecutorType

    rooms: list[str] = []

    async def entry(ctx: Any) -> None:
        rooms.append(ctx.job.room.name)
        await ctx.connect()

    server = AgentServer(ws_url=livekit_server.url, api_key=livekit_server.api_key,
                         api_secret=livekit_server.api_secret, job_executor_type=JobExecutorType.THREAD,
                         port=0, num_idle_processes=0, load_threshold=math.inf,
                         # by jobs, not the host's CPU: livekit-server offers jobs only to workers
                         # under its target load (0.7), which a busy test machine's CPU exceeds
                         load_fnc=lambda server: min(len(server.active_jobs) / 100, 0.5))
    server.rtc_session(entry, agent_name=agent_name)
    mark = livekit_server.log_mark()
    run = asyncio.ensure_future(server.run(devmode=False))
    try:
        await registered(livekit_server, agent_name, run, after=mark)
        yield rooms
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.aclose(), 20)
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await run


def body_of(record: Any) -> Any:
    return record.event.body


def cli_env(settings: Settings) -> dict[str, str]:
    return {"LIVEKIT_URL": settings.livekit_url or "", "LIVEKIT_API_KEY": settings.livekit_api_key or "",
            "LIVEKIT_API_SECRET": settings.livekit_api_secret or "",
            "LEDGER_BRIDGE_AGENT_NAME": settings.bridge_agent_name}


async def test_dispatches_beside_the_agents_that_joined(lk_settings: Settings, ledger: Ledger, room: str,
                                                        livekit_server: Any, livekit_connect: Any) -> None:
    helper = f"helper-{uuid.uuid4().hex[:8]}"
    env = cli_env(lk_settings)
    log = Log(ledger, room)
    caller = await livekit_connect("caller", room)  # the room exists: the server made its automatic dispatch
    async with worker_bridge(lk_settings, livekit_server), agent_worker(livekit_server, helper) as helped:
        bridge_dispatch = json_of(await asyncio.to_thread(ok, lk_settings, ["dispatch", room, "--json"], **env))
        await log.until(lambda rs: any(r.type == "bridge.joined" for r in rs), timeout=30)
        helper_dispatch = json_of(await asyncio.to_thread(
            ok, lk_settings, ["dispatch", room, "--agent-name", helper, "--json"], **env))
        await log.until(lambda rs: any(r.type == "participant.joined" and body_of(r).kind == "agent"
                                       for r in rs), timeout=30)
        assert helped == [room]
        agent_identity = next(body_of(r).identity for r in log.records
                              if r.type == "participant.joined" and body_of(r).kind == "agent")
        await sees(caller, agent_identity)

        view = json_of(await asyncio.to_thread(ok, lk_settings, ["dispatches", room, "--json"], **env))
        table = (await asyncio.to_thread(ok, lk_settings, ["dispatches", room], **env)).stdout
    await log.close()

    created = [r for r in log.records if r.type == "dispatch.created"]
    assert [body_of(r).dispatch_id for r in created] == [bridge_dispatch["dispatch_id"],
                                                           helper_dispatch["dispatch_id"]]
    assert isinstance(created[1].event, ev.DispatchCreatedEvent)
    assert (body_of(created[1]).agent_name, body_of(created[1]).by) == (helper, "ledger dispatch")

    assert view["room"] == room and view["server_note"] == ""
    rows = {row["dispatch_id"]: row for row in view["dispatches"]}
    # livekit-server v1.13.5 also lists the dispatch it made for automatic dispatch (no agent name).
    automatic = [row for row in view["dispatches"] if row["automatic"]]
    assert len(automatic) == 1 and automatic[0]["agent_name"] == "" and automatic[0]["joined"] is None
    assert len(rows) == 3

    bridge_row = rows[bridge_dispatch["dispatch_id"]]
    assert bridge_row["agent_name"] == lk_settings.bridge_agent_name and bridge_row["on_server"]
    assert bridge_row["created_by"] == "ledger dispatch" and bridge_row["logged_seq"] == created[0].seq
    assert bridge_row["joined"]["identity"].startswith("bridge:")
    helper_row = rows[helper_dispatch["dispatch_id"]]
    assert helper_row["joined"]["identity"] == agent_identity and helper_row["joined"]["agent_name"] == helper
    for row in (bridge_row, helper_row):
        assert 0 <= row["after_s"] < 30, row
    assert view["unexplained_joins"] == []
    assert helper in table and agent_identity in table and "(automatic dispatch)" in table


async def test_dispatches_without_livekit_settings_show_the_log(settings: Settings, ledger: Ledger,
                                                                 room: str) -> None:
    await ledger.append(ev.make_event(room, ev.ParticipantJoined(
        identity="agent-AJ_1", kind="agent", attributes={"lk.agent_name": "triage"})))
    env = {"LIVEKIT_URL": "", "LIVEKIT_API_KEY": "", "LIVEKIT_API_SECRET": ""}
    view = json_of(await asyncio.to_thread(ok, settings, ["dispatches", room, "--json"], **env))
    assert "unset" in view["server_note"] and view["dispatches"] == []
    assert [(j["identity"], j["agent_name"]) for j in view["unexplained_joins"]] == [("agent-AJ_1", "triage")]
    missing = await asyncio.to_thread(invoke, settings, ["dispatches", f"nothing-{uuid.uuid4().hex[:6]}"], **env)
    assert missing.exit_code == 1 and "no events for room" in missing.output


async def test_an_agent_records_the_dispatch_it_creates(lk_settings: Settings, ledger: Ledger, room: str,
                                                        livekit_server: Any, livekit_connect: Any) -> None:
    """What the handoff helpers do after dispatching a target: ``dispatch.created`` through the room."""
    from livekit import api as lkapi

    from room_ledger.agents import LedgerAgent

    helper = f"helper-{uuid.uuid4().hex[:8]}"
    log = Log(ledger, room)
    triage_room = await livekit_connect("triage", room, kind="agent")
    async with worker_bridge(lk_settings, livekit_server), agent_worker(livekit_server, helper):
        await asyncio.to_thread(ok, lk_settings, ["dispatch", room], **cli_env(lk_settings))
        await log.until(lambda rs: any(r.type == "bridge.joined" for r in rs), timeout=30)
        triage = LedgerAgent(triage_room, ledger)
        await triage.start()
        async with livekit_server.api() as lk:
            dispatch = await lk.agent_dispatch.create_dispatch(
                lkapi.CreateAgentDispatchRequest(agent_name=helper, room=room))
        event_id = await triage.record_dispatch(dispatch, by="transfer_to")
        assert event_id is not None and await triage.wait_for_event(event_id) > 0
        await log.until(lambda rs: any(r.type == "participant.joined" and body_of(r).kind == "agent"
                                       and body_of(r).attributes.get("lk.agent_name") == helper for r in rs),
                        timeout=30)
        view = json_of(await asyncio.to_thread(ok, lk_settings, ["dispatches", room, "--json"],
                                               **cli_env(lk_settings)))
        await triage.stop()
    await log.close()
    row = next(r for r in view["dispatches"] if r["dispatch_id"] == dispatch.id)
    assert (row["created_by"], row["on_server"], row["joined"]["agent_name"]) == ("transfer_to", True, helper)
    recorded = next(r for r in log.records if r.type == "dispatch.created" and body_of(r).by == "transfer_to")
    assert recorded.event.sender.identity == "triage"
