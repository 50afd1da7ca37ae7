"""A call's owner for tests/test_fence_fault.py, in a process of its own so the test can pause it:
``python -m tests.fence_owner ROOM`` (LIVEKIT_URL, FENCE_OWNER_TOKEN and LEDGER_* from the environment).

It joins as agent ``triage``, claims the floor (its epoch), patches the session and reports
``{"ready": …}`` on stdout. Then it idles until a stall longer than ``STALL_S`` (the test's
SIGSTOP) and, at once, as a paused process that wakes would, writes a session patch, a floor
claim and a status, before its followed log has shown it what happened meanwhile; it reports which
went out (``{"woke": …}``). Once its followed log shows its epoch superseded, it tries each helper
again and reports what they raised (``{"superseded": …}``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable
from typing import Any

from livekit import rtc

from room_ledger.agents import LedgerAgent
from room_ledger.client import Ledger
from room_ledger.errors import Superseded
from room_ledger.settings import Settings

AGENT_ID = "triage"
#: A gap this long between two ticks of a 20 ms timer means the process was paused.
STALL_S = 2.0


def report(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def stale_writes(agent: LedgerAgent) -> dict[str, Awaitable[str]]:
    return {
        "session.patch": agent.patch_session({"caller": "Mallory"}),
        "floor.request": agent.request_floor(task="stale claim"),
        "agent.status": agent.status("processing", action_lock=True, task="stale status"),
    }


async def outcomes(writes: dict[str, Awaitable[str]]) -> dict[str, Any]:
    """kind -> the event id sent, or the exception raised, the writes started together."""
    done = await asyncio.gather(*writes.values(), return_exceptions=True)
    return dict(zip(writes, done, strict=True))


async def wait_for_stall() -> None:
    last = time.monotonic()
    while True:
        await asyncio.sleep(0.02)
        now = time.monotonic()
        if now - last > STALL_S:
            return
        last = now


async def main(room_name: str) -> None:
    # Its stderr is the test's owner.log: what the SDK did across the pause (a resume, a rejoin).
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    room = rtc.Room()
    for change in ("reconnecting", "reconnected", "disconnected", "connection_state_changed"):
        room.on(change, lambda *args, change=change: logging.info("room: %s %s", change, args))
    await room.connect(os.environ["LIVEKIT_URL"], os.environ["FENCE_OWNER_TOKEN"])
    identity = room.local_participant.identity
    async with Ledger(Settings.from_env(), name="fence-owner") as ledger:
        agent = LedgerAgent(room, ledger, agent_id=AGENT_ID)
        await agent.start()
        # Packets sent before the bridge knows the sender are recorded without its identity.
        await agent.wait_until(lambda s: identity in s.participants and s.participants[identity].present, 30)
        await agent.request_floor(task="triage")
        await agent.wait_until(lambda _: agent.epoch is not None and agent.holds_floor, 15)
        patched = await agent.patch_session({"caller": "Ana"})
        await agent.wait_for_event(patched, 15)
        report(ready={"epoch": agent.epoch, "identity": identity})

        await wait_for_stall()
        # Woken: its followed log still ends where it was paused, so its helpers still send.
        woke = await outcomes(stale_writes(agent))
        report(woke={
            "sent": {kind: result for kind, result in woke.items() if isinstance(result, str)},
            "refused": {kind: f"{type(result).__name__}: {result}" for kind, result in woke.items()
                        if not isinstance(result, str)}})

        await agent.wait_until(lambda _: agent.superseded, 30)
        again = await outcomes(stale_writes(agent))
        report(superseded={kind: f"{type(result).__name__}: {result}" for kind, result in again.items()},
               all_superseded=all(isinstance(result, Superseded) for result in again.values()))
        await agent.stop()
    await room.disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
