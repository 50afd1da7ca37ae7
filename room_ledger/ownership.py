"""Who owns a call, by epoch, decided by log order: the fence that keeps a paused owner from writing
after its successor took over (issue 23, "Fence"). Pure functions over :class:`Ownership`, no I/O,
no clock: the fold (:mod:`room_ledger.state`) calls them, as it calls :mod:`room_ledger.floor`.

Ownership is per agent id (the name the floor and handoffs know an agent by), so several agents
sharing a room (the floor's rules, round-robin turns) never fence one another; only an agent id
that handed its call on, or was handed it again, fences its own older processes.

* An **epoch** is the log sequence of the event that made an agent the owner: :func:`grant_of`
  is the one place that decides which events grant (a recovery event joins it there).
* A ``handoff`` from A to B (A ≠ B) that passes the floor (A held it at that point of the log,
  as :func:`room_ledger.agents.handoff_took_effect` tells) makes B the owner at its sequence and
  supersedes A. The record of a failed handoff (reason ``handoff failed: …``, from B back to A)
  gives A the call back at its sequence and supersedes B, if B is the one that superseded A and
  has not passed the call on.
* An agent id's first claim on the floor (``floor.request``, or ``agent.status`` with
  ``action_lock`` true and a status other than ``resolved``) makes it an owner at that claim;
  later claims of an id that has an epoch grant nothing (a process's own claim must never fence
  the writes it sent just before, stamped with its epoch).
* A **fenced write** (``session.patch``, ``floor.request``, ``floor.release``, ``agent.status``)
  naming agent X and carrying epoch E is rejected when E is older than X's latest grant, or when
  X was superseded after it: it changes nothing and is recorded (:class:`Rejection`). A write
  without an epoch (or, for a session patch, without an agent id) is never rejected, so events
  stored before epochs existed, and agents that do not stamp them, fold exactly as before.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

import msgspec

from room_ledger import events as ev

#: Rejected writes kept in the room state (``Ownership.rejected``; the index counts them all).
REJECTIONS_KEPT: Final = 50

#: What made an owner: "claim", "handoff", "handoff failed" (a recovery event adds its own).
GrantKind = str


class Owner(msgspec.Struct, kw_only=True, gc=False):
    """One agent id's ownership of its call."""

    agent_id: str
    #: The sequence of the event that made it the owner (its writes carry this).
    epoch: int
    granted_by: GrantKind
    #: The sequence at which another agent took the call from it (None: it still owns it).
    superseded_at: int | None = None
    successor: str | None = None


class Rejection(msgspec.Struct, kw_only=True, gc=False):
    """A write the fold ignored because its epoch was superseded."""

    seq: int
    time: datetime
    agent_id: str
    #: The event type (session.patch, floor.request, floor.release, agent.status).
    kind: str
    epoch: int
    reason: str


class Ownership(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Every owner of the room's calls, and the latest writes rejected by the fence."""

    owners: dict[str, Owner] = msgspec.field(default_factory=dict)
    rejected: list[Rejection] = msgspec.field(default_factory=list)

    def epoch_of(self, agent_id: str) -> int | None:
        """The agent's current epoch (None: it owns nothing now)."""
        owner = self.owners.get(agent_id)
        return owner.epoch if owner is not None and owner.superseded_at is None else None


class Grant(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    to_agent: str
    kind: GrantKind
    #: The owner it takes the call from (superseded at the grant's sequence), if any.
    from_agent: str | None = None


#: Event types that may grant ownership (a recovery event's type joins them).
GRANTING_TYPES: Final[frozenset[type]] = frozenset({ev.HandoffEvent, ev.FloorRequestEvent, ev.AgentStatusEvent})
#: Event types whose epoch is checked.
FENCED_TYPES: Final[frozenset[type]] = frozenset(
    {ev.SessionPatchEvent, ev.FloorRequestEvent, ev.FloorReleaseEvent, ev.AgentStatusEvent})


def claimant(event: ev.Event) -> str | None:
    """The agent an event claims the floor for (None: it claims nothing)."""
    if isinstance(event, ev.FloorRequestEvent):
        return event.body.agent_id
    if isinstance(event, ev.AgentStatusEvent) and event.body.status != "resolved" and ev.status_lock(event):
        return event.body.agent_id
    return None


def grant_of(ownership: Ownership, floor_holder: str | None, event: ev.Event) -> Grant | None:
    """The ownership ``event`` grants, given the state before it (``floor_holder``: the floor's
    holder then); None when it grants none. The one place deciding which events grant."""
    if isinstance(event, ev.HandoffEvent):
        body = event.body
        if body.to_agent == body.from_agent:
            return None
        if floor_holder == body.from_agent:
            return Grant(to_agent=body.to_agent, kind="handoff", from_agent=body.from_agent)
        if body.reason is not None and body.reason.startswith(ev.FAILED_HANDOFF_PREFIX):
            # The source takes back the call it handed to the target, unless the target passed it on.
            source = ownership.owners.get(body.to_agent)
            target = ownership.owners.get(body.from_agent)
            if (source is not None and source.successor == body.from_agent and target is not None
                    and target.superseded_at is None):
                return Grant(to_agent=body.to_agent, kind="handoff failed", from_agent=body.from_agent)
        return None
    if isinstance(event, ev.FloorRequestEvent | ev.AgentStatusEvent) and event.body.agent_id not in ownership.owners:
        # (the cheap test first: most claims and statuses come from agents that have an epoch)
        agent_id = claimant(event)
        if agent_id is not None:
            return Grant(to_agent=agent_id, kind="claim")
    return None


def take(ownership: Ownership, grant: Grant, seq: int) -> None:
    """Apply a grant made by the event at ``seq``."""
    if grant.from_agent is not None:
        previous = ownership.owners.get(grant.from_agent)
        if previous is not None and previous.superseded_at is None:
            previous.superseded_at = seq
            previous.successor = grant.to_agent
        elif previous is None:
            # A holder whose claim this state never saw (folded from a checkpoint older than this
            # rule): superseded all the same, so none of its epochs before this one counts.
            ownership.owners[grant.from_agent] = Owner(agent_id=grant.from_agent, epoch=seq, granted_by="unknown",
                                                       superseded_at=seq, successor=grant.to_agent)
    ownership.owners[grant.to_agent] = Owner(agent_id=grant.to_agent, epoch=seq, granted_by=grant.kind)


def writer(event: ev.Event) -> tuple[str | None, int | None]:
    """(agent id, epoch) a fenced write carries; (None, None) for any other event."""
    if isinstance(event, ev.SessionPatchEvent | ev.FloorRequestEvent | ev.FloorReleaseEvent | ev.AgentStatusEvent):
        return event.body.agent_id, event.body.epoch
    return None, None


def stale_reason(ownership: Ownership, agent_id: str | None, epoch: int | None) -> str | None:
    """Why a write by ``agent_id`` at ``epoch`` is from a superseded epoch; None when it applies."""
    if agent_id is None or epoch is None:
        return None
    owner = ownership.owners.get(agent_id)
    if owner is None:
        return None
    if owner.superseded_at is not None and epoch < owner.superseded_at:
        return f"{agent_id!r} handed the call to {owner.successor!r} at {owner.superseded_at}"
    if epoch < owner.epoch:
        return f"epoch {epoch} of {agent_id!r} superseded by its epoch {owner.epoch} ({owner.granted_by})"
    return None


def reject(ownership: Ownership, rejection: Rejection) -> None:
    ownership.rejected.append(rejection)
    if len(ownership.rejected) > REJECTIONS_KEPT:
        del ownership.rejected[: len(ownership.rejected) - REJECTIONS_KEPT]


__all__ = ["FENCED_TYPES", "GRANTING_TYPES", "REJECTIONS_KEPT", "Grant", "Owner", "Ownership", "Rejection",
           "claimant", "grant_of", "reject", "stale_reason", "take", "writer"]
