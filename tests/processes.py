"""Agent worker processes for tests, stopped together with every process they started.

A LiveKit Agents worker starts a multiprocessing forkserver, and job processes under it. Stop only
the worker (SIGKILL, or a SIGTERM it does not handle) and those outlive it, adopted by init: each
test run left a few behind, ~350 MiB each. So each worker starts in a process group of its own
(a new session), and stopping it ends the group once the worker has had its chance to exit cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from typing import Any

#: How long a worker has to stop on SIGTERM before its whole group is killed.
STOP_GRACE_S = 20.0


async def start(*argv: str, **kwargs: Any) -> asyncio.subprocess.Process:
    """``asyncio.create_subprocess_exec`` in a process group of its own; stop it with :func:`stop`."""
    return await asyncio.create_subprocess_exec(*argv, start_new_session=True, **kwargs)


async def stop(proc: asyncio.subprocess.Process, *, grace: float = STOP_GRACE_S) -> int:
    """SIGTERM, up to ``grace`` seconds to exit, then SIGKILL to whatever is left of its group."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), grace)
    kill_group(proc.pid)
    return await proc.wait()


def stop_popen(proc: subprocess.Popen[Any], *, grace: float = STOP_GRACE_S) -> int:
    """:func:`stop` for a ``subprocess.Popen`` started with ``start_new_session=True``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    kill_group(proc.pid)
    return proc.wait()


def kill_group(pgid: int) -> None:
    """SIGKILL every process left in the group (the leader may be gone; its children may not)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
