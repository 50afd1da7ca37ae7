"""What a handoff gives back: :class:`Resumed` to its target, :class:`HandoffOutcome` (or
:class:`HandoffFailed`) to its source. Used and re-exported by :mod:`room_ledger.handoff`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from livekit.agents.llm import ChatContext

from room_ledger.errors import LedgerError
from room_ledger.hydrate import Snapshot

T = TypeVar("T")


class HandoffFailed(LedgerError):
    """A handoff did not complete: the source keeps the caller (``reason`` says why)."""

    def __init__(self, to_agent: str, reason: str) -> None:
        super().__init__(f"handoff to {to_agent!r} failed: {reason}")
        self.to_agent = to_agent
        self.reason = reason


@dataclass
class Resumed(Generic[T]):
    """What the target of a handoff resumes with."""

    #: The conversation so far: messages, function calls and outputs, handoffs, with timestamps.
    chat_ctx: ChatContext
    #: The shared session document as the developer's userdata type.
    userdata: T
    reason: str | None
    from_agent: str
    #: The handoff's log sequence; the snapshot covers at least this.
    seq: int
    snapshot: Snapshot


@dataclass
class HandoffOutcome:
    """How a transfer ended (``LedgerLink.transfers`` keeps them, newest last)."""

    to_agent: str
    reason: str | None
    seq: int | None = None
    ok: bool = False
    error: str | None = None
    dispatch_id: str | None = None
    #: Seconds from the tool call to the target holding the floor (or to the failure).
    elapsed_s: float = 0.0
    #: "dispatch" (the target was dispatched) or "standby" (a warm standby took over).
    via: str = "dispatch"
