"""``ledger up``: run the embedded NATS and PostgreSQL in the foreground until Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from typing import Any

from room_ledger import embedded
from room_ledger.cli.common import CliError
from room_ledger.settings import Settings

#: How often ``up`` checks that its servers still run (and restarts one that died).
CHECK_INTERVAL_S = 2.0


def _start(settings: Settings, which: str) -> embedded.ServerInfo:
    if which == "nats":
        return embedded.ensure_nats(settings.home, sync_always=settings.nats_sync_always)
    return embedded.ensure_postgres(settings.home)


def _stop(settings: Settings, which: str) -> bool:
    if which == "nats":
        return embedded.stop_nats(settings.home)
    return embedded.stop_postgres(settings.home)


async def up(
    settings: Settings,
    *,
    on_ready: Callable[[dict[str, Any]], None],
    on_event: Callable[[str], None],
    leave_running: bool = False,
) -> dict[str, Any]:
    """Start (or adopt) the embedded servers, watch them until SIGINT/SIGTERM, then stop them."""
    wanted = [w for w, embedded_default in (("nats", settings.embedded_nats),
                                           ("postgres", settings.embedded_postgres)) if embedded_default]
    if not wanted:
        raise CliError(
            "nothing to run: LEDGER_NATS_URL and LEDGER_DATABASE_URL are both set, so the embedded servers are not used"
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    servers: dict[str, embedded.ServerInfo] = {}
    try:
        infos = await asyncio.gather(*(asyncio.to_thread(_start, settings, w) for w in wanted))
        servers = dict(zip(wanted, infos, strict=True))
        ready = {
            "home": str(settings.home.resolve()),
            **{
                name: {"url": info.url, "pid": info.pid, "data_dir": str(info.data_dir), "adopted": not info.started_here}
                for name, info in servers.items()
            },
        }
        on_ready(ready)
        restarts = 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), CHECK_INTERVAL_S)
            if stop.is_set():
                break
            live = await asyncio.to_thread(embedded.status, settings.home)
            for name in wanted:
                if live.get(name) is None:
                    on_event(f"the embedded {name} server stopped; starting it again")
                    servers[name] = await asyncio.to_thread(_start, settings, name)
                    restarts += 1
                    on_event(f"{name} is back at {servers[name].url}")
        return {**ready, "restarts": restarts}
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        if not leave_running:
            for name in servers:
                on_event(f"stopping {name}")
                await asyncio.to_thread(_stop, settings, name)
