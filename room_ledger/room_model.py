"""What a room's state is made of, besides the floor, roles and ownership (their own modules): the
participants, conversation items, summary, gaps, the index, and the echoes the conversation rules
remember. Plain data; :mod:`room_ledger.state` folds events into it.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any, Final

import msgspec


class Participant(msgspec.Struct, kw_only=True):
    identity: str
    kind: str = "unknown"
    name: str = ""
    sid: str = ""
    metadata: str = ""
    attributes: dict[str, str] = msgspec.field(default_factory=dict)
    present: bool = False
    #: ``lk.agent.state``: initializing, idle, listening, thinking, speaking.
    agent_state: str | None = None
    #: Coordination status (``agent.status``): processing, idle, resolved.
    status: str | None = None
    task: str | None = None
    lock: bool = False
    #: Fields of the last ``agent.status`` packet its type does not know (kept as sent).
    status_extra: dict[str, Any] = msgspec.field(default_factory=dict)
    joined_seq: int | None = None
    left_seq: int | None = None
    last_seq: int = 0

    @property
    def is_agent(self) -> bool:
        return self.kind == "agent" or self.status is not None or self.agent_state is not None


class ConversationItem(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    item_id: str
    #: message, function_call, function_call_output, agent_handoff, agent_config_update
    type: str = "message"
    #: user, assistant, system, developer (None for non-message items)
    role: str | None = None
    speaker: str | None = None
    text: str = ""
    seq: int
    time: datetime
    #: conversation.item, transcript, chat.message or tool.execution (a call still running)
    source: str = "conversation.item"
    interrupted: bool = False
    created_at: float | None = None
    name: str | None = None
    call_id: str | None = None
    arguments: str | None = None
    output: str | None = None
    is_error: bool = False
    old_agent_id: str | None = None
    new_agent_id: str | None = None
    language: str | None = None


class Summary(msgspec.Struct, kw_only=True):
    text: str
    covers_seq: int
    seq: int
    time: datetime
    author: str = ""


class Gap(msgspec.Struct, kw_only=True):
    seq: int
    bridge_id: str
    started_at: datetime
    ended_at: datetime
    reason: str = ""


class RoomIndex(msgspec.Struct, kw_only=True):
    first_seq: int | None = None
    last_seq: int = 0
    last_activity: datetime | None = None
    events: int = 0
    counts: dict[str, int] = msgspec.field(default_factory=dict)
    gaps: list[Gap] = msgspec.field(default_factory=list)
    #: Sequences of events that made a reducer raise (skipped; the projector records why).
    failed: list[int] = msgspec.field(default_factory=list)
    #: Writes rejected by the fence, ever (the latest are in ``RoomState.ownership.rejected``).
    rejected: int = 0


#: How many kept chat/transcript items wait to be matched by a feed item repeating them.
MAX_ECHOES: Final = 64
#: How late a chat or transcript copy of a user's feed message may reach the log and still be
#: taken for its copy (packets of two senders crossing in the SFU: milliseconds, not seconds).
FED_WINDOW_S: Final = 10.0
#: ... and its own timestamp may be a little earlier than the feed item's: a transcript is stamped
#: when its stream opens, on the transcribing agent's clock, the feed item when the session added it.
FED_EARLIER_S: Final = 2.0
#: Two final transcripts of one track with the same words, begun this close, are one utterance
#: transcribed twice (by two agents): their transcripts start within tens of ms of each other.
SAME_SPEECH_S: Final = 1.5


#: How many call ids the conversation remembers, to keep each call's function call once.
MAX_CALLS: Final = 256


class Echo(msgspec.Struct, kw_only=True, gc=False):
    """A kept chat or transcript item an agent session's feed may repeat."""

    role: str
    #: A digest of the stripped text: small, and safe in PostgreSQL's JSON (no NUL).
    digest: str
    item_id: str
    speaker: str | None = None
    #: A feed item repeated it already: it is not matched again.
    matched: bool = False
    #: When it was recorded (feed messages only: a later copy is matched within FED_WINDOW_S).
    at: datetime | None = None


def text_digest(text: str) -> str:
    return hashlib.blake2b(text.strip().encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()


