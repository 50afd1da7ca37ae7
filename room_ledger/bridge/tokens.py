"""Tokens and dispatches for the bridge, from ``LIVEKIT_API_KEY``/``LIVEKIT_API_SECRET``."""

from __future__ import annotations

import datetime
import json
import os
import socket
from typing import Any

from livekit import api

from room_ledger.livekit_api import livekit_api as _livekit_api
from room_ledger.livekit_api import livekit_credentials
from room_ledger.settings import Settings


def _credentials(settings: Settings) -> tuple[str, str, str]:
    return livekit_credentials(settings, needed_for="the bridge")


def bridge_identity(bridge_id: str) -> str:
    return f"ledger-bridge-{socket.gethostname()[:40]}-{os.getpid()}-{bridge_id}"


def bridge_token(settings: Settings, room: str, identity: str, *, ttl_s: float = 6 * 3600) -> str:
    """A hidden, subscribe-only token (it receives data and streams, never publishes)."""
    _, key, secret = _credentials(settings)
    grants = api.VideoGrants(room_join=True, room=room, hidden=True, can_publish=False, can_publish_data=False,
                             can_subscribe=True, can_update_own_metadata=False, agent=True)
    return (api.AccessToken(key, secret).with_identity(identity).with_name("ledger bridge").with_kind("agent")
            .with_grants(grants).with_ttl(datetime.timedelta(seconds=ttl_s)).to_jwt())


def livekit_api(settings: Settings) -> api.LiveKitAPI:
    return _livekit_api(settings, needed_for="the bridge")


async def create_dispatch(settings: Settings, room: str, *, agent_name: str | None = None,
                          metadata: dict[str, Any] | str | None = None) -> api.AgentDispatch:
    """Dispatch an agent (by default the bridge, ``LEDGER_BRIDGE_AGENT_NAME``) into ``room``."""
    name = agent_name or settings.bridge_agent_name
    text = metadata if isinstance(metadata, str) else json.dumps(metadata or {}, separators=(",", ":"))
    lkapi = livekit_api(settings)
    try:
        return await lkapi.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name=name, room=room, metadata=text))
    finally:
        await lkapi.aclose()


def room_configuration(settings: Settings) -> api.RoomConfiguration:
    """Put this in user tokens (``with_room_config``) so every room created by them gets the bridge."""
    return api.RoomConfiguration(agents=[api.RoomAgentDispatch(agent_name=settings.bridge_agent_name)])
