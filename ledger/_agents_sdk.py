"""Every use of LiveKit Agents (``livekit.agents``) beyond its public API, in one module.

The handoff holds the caller's typing while it runs (``ledger.handoff``): it registers its own
text input callback on the session's ``RoomIO`` and puts the previous one back afterwards.
``RoomIO.register_text_input`` is public, but the callback in place is not readable: it is the
private ``RoomIO._text_input_cb``. tests/test_sdk.py checks that field on the installed
livekit-agents, so an upgrade that moves it fails there; here a missing field reads as "none
registered", and the handoff then restores LiveKit's default callback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from livekit.agents.voice.room_io import RoomIO


def text_input_callback(room_io: RoomIO) -> Any:
    """The text input callback registered on ``room_io`` (None when none is)."""
    return getattr(room_io, "_text_input_cb", None)
