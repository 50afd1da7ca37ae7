"""A LiveKit Agents worker for tests/test_roles.py, run as its own process: ``python -m tests.role_worker NAME``.

Seed 002's unified agent: every job joins its room, follows the room's log and claims
``{"customer", "support"}``; it shows the role it got (and how long the claim took) in its
participant attributes (and which worker process ran it), which the bridge records. Configuration from the environment
(LIVEKIT_*, LEDGER_*).
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from typing import Any

from livekit.agents import AgentServer, JobContext, JobExecutorType

from ledger.agents import LedgerAgent
from ledger.client import Ledger
from ledger.settings import Settings

ROLES = {"customer", "support"}


async def entry(ctx: JobContext) -> None:
    await ctx.connect()
    ledger = Ledger(Settings.from_env(), name="role-worker")
    await ledger.connect()
    agent = LedgerAgent(ctx.room, ledger)

    async def shutdown(*_: Any) -> None:
        await agent.stop()
        await ledger.close()

    ctx.add_shutdown_callback(shutdown)
    await agent.start()
    started = time.perf_counter()
    role = await agent.claim_role(ROLES)
    took_ms = (time.perf_counter() - started) * 1000
    await ctx.room.local_participant.set_attributes(
        {"test.role": role, "test.claim_ms": f"{took_ms:.1f}", "test.worker": str(os.getppid())})


async def main(agent_name: str) -> None:
    # Each job in its own process, as LiveKit Agents runs them by default (and as in the seed).
    # Load by jobs, not the host's CPU: livekit-server offers a job only to workers whose load is
    # under its target (0.7), and a busy test machine's CPU load would leave the jobs unassigned.
    server = AgentServer(job_executor_type=JobExecutorType.PROCESS, port=0, num_idle_processes=2,
                         load_threshold=math.inf, load_fnc=lambda server: min(len(server.active_jobs) / 100, 1.0))
    server.rtc_session(entry, agent_name=agent_name)
    await server.run(devmode=False)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
