"""The ``ledger`` command (Typer)."""

from __future__ import annotations

import os
import sys


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

