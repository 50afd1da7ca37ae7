"""One way from settings to LiveKit's server API: the bridge, the handoff and the dispatch helpers use it.

``LIVEKIT_URL`` may be the WebSocket URL clients connect to (``ws://``, ``wss://``) or the HTTP
one; the server API is spoken over HTTP(S) at the same host, so the scheme is mapped here, once.
A missing variable is a :class:`~room_ledger.errors.SettingsError` that names it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from room_ledger.errors import SettingsError
from room_ledger.settings import Settings

if TYPE_CHECKING:
    from livekit import api


def livekit_credentials(settings: Settings, *, needed_for: str = "the LiveKit server API") -> tuple[str, str, str]:
    """``(url, key, secret)`` from the settings, else ``LIVEKIT_URL``/``_API_KEY``/``_API_SECRET``."""
    values = {
        "LIVEKIT_URL": settings.livekit_url or os.environ.get("LIVEKIT_URL") or "",
        "LIVEKIT_API_KEY": settings.livekit_api_key or os.environ.get("LIVEKIT_API_KEY") or "",
        "LIVEKIT_API_SECRET": settings.livekit_api_secret or os.environ.get("LIVEKIT_API_SECRET") or "",
    }
    missing = [name for name, value in values.items() if not value]
    if missing:
        raise SettingsError(f"{', '.join(missing)} not set: {needed_for} needs the LiveKit server's URL and API key "
                            "(set them in the environment)")
    return values["LIVEKIT_URL"], values["LIVEKIT_API_KEY"], values["LIVEKIT_API_SECRET"]


def http_url(url: str) -> str:
    """The server API's URL for a LiveKit URL (``ws://h:7880`` -> ``http://h:7880``)."""
    if url.startswith("ws://"):
        return "http://" + url[len("ws://"):]
    if url.startswith("wss://"):
        return "https://" + url[len("wss://"):]
    return url


def livekit_api(settings: Settings, *, needed_for: str = "the LiveKit server API") -> api.LiveKitAPI:
    """A ``livekit.api.LiveKitAPI`` for the configured server (close it with ``aclose``)."""
    from livekit import api  # noqa: PLC0415 - the LiveKit SDK: loaded by the processes that talk to LiveKit

    url, key, secret = livekit_credentials(settings, needed_for=needed_for)
    return api.LiveKitAPI(http_url(url), key, secret)
