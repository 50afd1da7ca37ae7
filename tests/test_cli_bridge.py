"""``ledger bridge --room`` as a real process, through the loopback SFU and the livekit SDK (``-m livekit``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from typing import Any

import pytest

from ledger.client import Ledger, Record
from ledger.settings import Settings
from tests.test_cli_helpers import env_for

pytestmark = pytest.mark.livekit


async def _until(records: list[Record], changed: asyncio.Event, predicate: Any, timeout: float) -> None:
    async def wait() -> None:
        while not predicate(records):
            changed.clear()
            await changed.wait()

    try:
        await asyncio.wait_for(wait(), timeout)
    except TimeoutError:
        raise AssertionError(f"log never matched; has {[r.type for r in records]}") from None


async def test_bridge_command_records_a_room_until_ctrl_c(settings: Settings, ledger: Ledger, room: str,
                                                          livekit_server: Any, livekit_connect: Any) -> None:
    records: list[Record] = []
    changed = asyncio.Event()

    async def follow() -> None:
        async for record in ledger.follow(room):
            records.append(record)
            changed.set()

    follower = asyncio.create_task(follow())
    env = {**os.environ, **env_for(settings), "LIVEKIT_URL": livekit_server.url,
           "LIVEKIT_API_KEY": livekit_server.api_key, "LIVEKIT_API_SECRET": livekit_server.api_secret}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "bridge", "--room", room, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        await _until(records, changed, lambda rs: any(r.type == "bridge.joined" for r in rs), 60)
        agent = await livekit_connect("agent-a", room, kind="agent")
        payload = {"agent_id": "agent-a", "status": "processing", "action_lock": True, "task": "greet"}
        await _until(records, changed, lambda rs: any(r.type == "participant.joined" for r in rs), 20)
        await agent.local_participant.publish_data(json.dumps(payload).encode(), reliable=True, topic="agent-state")
        await _until(records, changed, lambda rs: any(r.type == "agent.status" for r in rs), 20)
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 30)
        _, err = await proc.communicate()
        assert code == 0, err.decode()
        assert "bridge stopped:" in err.decode() and "Traceback" not in err.decode()
        await _until(records, changed, lambda rs: rs[-1].type == "bridge.left", 20)
        status = next(r for r in records if r.type == "agent.status")
        assert status.event.sender.identity == "agent-a" and status.event.body.task == "greet"  # type: ignore[union-attr]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
