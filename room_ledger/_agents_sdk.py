"""Every use of LiveKit Agents (``livekit.agents``) beyond its public API, in one module.

The handoff holds the caller's typing while it runs (``room_ledger.handoff``): it registers its own
text input callback on the session's ``RoomIO`` and puts the previous one back afterwards.
``RoomIO.register_text_input`` is public, but the callback in place is not readable: it is the
private ``RoomIO._text_input_cb``. tests/test_sdk.py checks that field on the installed
livekit-agents, so an upgrade that moves it fails there; here a missing field reads as "none
registered", and the handoff then restores LiveKit's default callback.

Floor-gated replies (``room_ledger.turns``) let only the floor's agent answer a user turn; the others
keep the turn in their history, as LiveKit does for a turn it commits without a reply
(``commit_user_turn(skip_reply=True)``): the message goes into the agent's ``_chat_ctx`` and is
announced through ``AgentSession._conversation_item_added`` (so it is in the session's history
and its ``lk.agent.session`` feed). There is no public way to add a user turn from
``on_user_turn_completed`` without a reply; tests/test_sdk.py checks both names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from livekit.agents import Agent, AgentSession
    from livekit.agents.llm import ChatMessage
    from livekit.agents.voice.room_io import RoomIO


def text_input_callback(room_io: RoomIO) -> Any:
    """The text input callback registered on ``room_io`` (None when none is)."""
    return getattr(room_io, "_text_input_cb", None)


def keep_user_turn(session: AgentSession[Any], agent: Agent, message: ChatMessage) -> None:
    """Put a user turn into ``agent``'s history and the session's, with no reply (LiveKit's own
    ``skip_reply`` path)."""
    agent._chat_ctx.items.append(message)
    session._conversation_item_added(message)
