"""Helpers for LiveKit agents: publish coordination state to the ledger without writing JSON.

(The helper class is added below the protocol constants.)
"""

from __future__ import annotations

from typing import Final

from ledger.events import derived_event_id

#: The data topic of the ledger protocol.
LEDGER_TOPIC: Final = "ledger"
#: Event types agents may publish on the ledger topic.
AGENT_EVENT_TYPES: Final = frozenset(
    {"agent.status", "floor.request", "floor.release", "handoff", "session.patch", "context.summary",
     "conversation.item"}
)
#: Largest payload sent as one reliable data packet; larger ones go as a text stream.
MAX_PACKET_BYTES: Final = 15 * 1024


def protocol_event_id(room: str, payload_id: str) -> str:
    """The log id of an event an agent published with its own ``id`` (the same on every bridge)."""
    return derived_event_id(room, "ledger", payload_id)
