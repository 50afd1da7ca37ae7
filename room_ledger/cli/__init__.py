"""The ``ledger`` command (Typer)."""

from __future__ import annotations

import importlib.util
import os
import sys

SERVER_EXTRA_MISSING = (
    "ledger: the command line is part of the server extra, which is not installed here "
    "(it has only the agent side). Install it with: pip install 'room-ledger[server]'"
)


def main() -> None:
    """The ``ledger`` executable: says what to install where only the agent side is installed,
    instead of a traceback. (Alembic stands for the extra: Typer itself comes with livekit-agents.)"""
    if importlib.util.find_spec("alembic") is None:
        sys.stderr.write(SERVER_EXTRA_MISSING + "\n")
        sys.exit(1)
    from room_ledger.cli.main import app  # noqa: PLC0415 - after the check above, which is the point

    app()


def _start_without_aiohttp() -> None:
    """Keep nats-py from importing aiohttp, about 0.3-0.45 s of every ``ledger`` start.

    nats-py imports aiohttp when it is installed (livekit-agents brings it) but uses it only for
    ws:// and wss:// server URLs; a failed import leaves its WebSocket transport disabled and
    everything else as is. So unless a WebSocket URL is configured, nats-py is imported here with
    aiohttp hidden for that one import; later imports of aiohttp (``ledger bridge`` loading
    LiveKit) find it as usual.
    """
    if "nats" in sys.modules or "aiohttp" in sys.modules:
        return
    configured = " ".join([os.environ.get("LEDGER_NATS_URL", ""), *sys.argv])
    if "ws://" in configured or "wss://" in configured:
        return
    sys.modules["aiohttp"] = None  # type: ignore[assignment]  # None: "import aiohttp" raises ImportError
    try:
        import nats.aio.transport  # noqa: F401, PLC0415 - imported here on purpose, with aiohttp hidden (see above)
    finally:
        del sys.modules["aiohttp"]

