"""The names of the protocols the ledger reads and speaks, in one place.

LiveKit's (livekit-agents 1.8, livekit/protocol): the text and byte stream topics its sessions
publish on, the attributes they set, and the ledger's own topic. A name changed upstream is
changed here only.
"""

from __future__ import annotations

from typing import Final

#: Text streams of transcripts: the caller's words (an agent's STT, published on the caller's
#: behalf) and the agents' speech.
TOPIC_TRANSCRIPTION: Final = "lk.transcription"
#: Text streams of typed chat.
TOPIC_CHAT: Final = "lk.chat"
#: Byte streams of an ``AgentSession``'s events (protobuf ``AgentSessionMessage``).
TOPIC_AGENT_SESSION: Final = "lk.agent.session"
#: Data packets and text streams of the ledger protocol (docs/protocol.md).
TOPIC_LEDGER: Final = "ledger"
#: What the bridge records a SIP caller's DTMF digit under (as data: ``{"code", "digit"}``).
TOPIC_SIP_DTMF: Final = "lk.sip.dtmf"

#: An agent participant's state: initializing, idle, listening, thinking, speaking.
ATTR_AGENT_STATE: Final = "lk.agent.state"
#: The LiveKit agent name a dispatched agent participant runs under.
ATTR_AGENT_NAME: Final = "lk.agent_name"
#: Transcript stream attributes.
ATTR_SEGMENT_ID: Final = "lk.segment_id"
ATTR_TRANSCRIBED_TRACK_ID: Final = "lk.transcribed_track_id"
ATTR_TRANSCRIPTION_FINAL: Final = "lk.transcription_final"
ATTR_LANGUAGE: Final = "lk.language"
