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

from livekit.agents import AgentServer, JobContext, JobExecutorType, JobRequest

from room_ledger.agents import LedgerAgent
from room_ledger.client import Ledger
from room_ledger.settings import Settings

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


#: ROLE_WORKER_ONE_PER_ROOM=1: a worker refuses a second job in a room it already has a job in, so
#: LiveKit gives a room's two jobs to two worker processes (a refused job is offered to another).
ONE_PER_ROOM = os.environ.get("ROLE_WORKER_ONE_PER_ROOM") == "1"


async def main(agent_name: str) -> None:
    # Each job in its own process, as LiveKit Agents runs them by default (and as in the seed).
    # Load by jobs, not the host's CPU: livekit-server offers a job only to workers whose load is
    # under its target (0.7), and a busy test machine's CPU load would leave the jobs unassigned.
    server = AgentServer(job_executor_type=JobExecutorType.PROCESS, port=0, num_idle_processes=2,
                         load_threshold=math.inf,
                         load_fnc=lambda server: min(len(server.active_jobs) / 100, 0.5))
    # Accepted jobs show in active_jobs only once launched: count those on their way too, or two
    # requests arriving together would both see a worker without a job in the room.
    launching: dict[str, str] = {}  # job id -> room
    hooked = False

    def launched(proc: Any) -> None:
        if proc.running_job is not None:
            launching.pop(proc.running_job.job.id, None)

    async def accept(request: JobRequest) -> None:
        nonlocal hooked
        if not hooked:  # the process pool exists once the server runs (private API: a test worker only)
            server._proc_pool.on("process_job_launched", launched)
            hooked = True
        room = request.room.name
        busy = room in launching.values() or any(job.job.room.name == room for job in server.active_jobs)
        if ONE_PER_ROOM and busy:
            await request.reject(terminate=False)
            return
        launching[request.id] = room
        await request.accept()

    server.rtc_session(entry, agent_name=agent_name, on_request=accept)
    await server.run(devmode=False)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
