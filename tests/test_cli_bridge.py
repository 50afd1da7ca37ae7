"""``ledger bridge --room`` as a real process, through livekit-server and the livekit SDK (``-m livekit``)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

import pytest

from room_ledger.client import Ledger
from room_ledger.settings import Settings
from room_ledger.watch import watch
from tests.test_cli_helpers import env_for

pytestmark = pytest.mark.livekit


async def test_bridge_command_records_a_room_until_ctrl_c(settings: Settings, ledger: Ledger, room: str,
                                                          livekit_server: Any, livekit_connect: Any) -> None:
    log = watch(ledger, room)
    env = {**os.environ, **env_for(settings), "LIVEKIT_URL": livekit_server.url,
           "LIVEKIT_API_KEY": livekit_server.api_key, "LIVEKIT_API_SECRET": livekit_server.api_secret}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "room_ledger.cli.main", "bridge", "--room", room, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        await log.until(lambda rs: any(r.type == "bridge.joined" for r in rs), 60)
        agent = await livekit_connect("agent-a", room, kind="agent")
        payload = {"agent_id": "agent-a", "status": "processing", "action_lock": True, "task": "greet"}
        await log.until(lambda rs: any(r.type == "participant.joined" for r in rs), 20)
        await agent.local_participant.publish_data(json.dumps(payload).encode(), reliable=True, topic="agent-state")
        await log.until(lambda rs: any(r.type == "agent.status" for r in rs), 20)
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 30)
        _, err = await proc.communicate()
        assert code == 0, err.decode()
        assert "bridge stopped:" in err.decode() and "Traceback" not in err.decode()
        await log.until(lambda rs: rs[-1].type == "bridge.left", 20)
        status = next(r for r in log.records if r.type == "agent.status")
        assert status.event.sender.identity == "agent-a" and status.event.body.task == "greet"  # type: ignore[union-attr]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await log.close()


async def test_bridge_says_when_rooms_can_dispatch_it(settings: Settings, ledger: Ledger, room: str,
                                                      livekit_server: Any) -> None:
    """One line on stderr a person can wait for, and the same moment as a JSON event with --json."""
    agent_name = f"bridge-{room}"
    env = {**os.environ, **env_for(settings), "LIVEKIT_URL": livekit_server.url,
           "LIVEKIT_API_KEY": livekit_server.api_key, "LIVEKIT_API_SECRET": livekit_server.api_secret,
           "LEDGER_BRIDGE_AGENT_NAME": agent_name}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "room_ledger.cli.main", "bridge", "--json", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    log = watch(ledger, room)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        event = json.loads(line)
        assert event["event"] == "registered" and event["agent_name"] == agent_name and event["worker_id"]
        # registered means registered: a dispatch made right now reaches it
        async with livekit_server.api() as lk:
            from livekit import api

            await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(agent_name=agent_name, room=room))
        await log.until(lambda rs: any(r.type == "bridge.joined" for r in rs), 30, what="the bridge joining")
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert f"bridge: registered as '{agent_name}'" in err.decode()
        assert json.loads(out.decode().splitlines()[-1])["event"] == "stopped"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await log.close()
