"""Roles decided by log order (seed 002): two agents dispatched to one room at the same instant
take different roles, on any number of machines, with no lock file and no lock server.

::

    agent = LedgerAgent(ctx.room, ledger)
    await agent.start()                                     # hydrate + follow the room's log
    role = await agent.claim_role({"customer", "support"})  # "customer" or "support", never both

The rule (the floor's, for a set of roles): every reader folds the room's log in the same order,
so every agent computes the same assignment.

* ``role.claim`` (``agent_id``, ``roles`` in order of preference; a set is sent sorted): an agent
  holding no role gets the first role of its list that nobody holds. If all are held, the claim
  waits, in log order. An agent holds one role at a time; its later claims change nothing.
* A role is freed by ``role.release`` from its holder, or when the holder leaves the room
  (``participant.left`` of the agent id or of the identity that made the claim). A freed role goes
  to the earliest waiting claim that lists it, at the freeing event's sequence.
* ``role.release`` from an agent that only waits withdraws its claim.

The state (:class:`Roles`) is part of the room's state (``room_ledger.state.RoomState.roles``),
so the projection, hydration, ``ledger state`` and ``ledger replay --at`` carry it. These
functions are pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import msgspec

from room_ledger import events as ev
from room_ledger.errors import LedgerError


class RoleHolder(msgspec.Struct, kw_only=True, gc=False):
    agent_id: str
    #: The participant identity that made the claim (its leaving frees the role).
    identity: str = ""
    seq: int
    time: datetime


class RoleWait(msgspec.Struct, kw_only=True):
    agent_id: str
    identity: str = ""
    roles: list[str]
    seq: int
    time: datetime


class Roles(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Who holds which role, and the claims waiting for one."""

    holders: dict[str, RoleHolder] = msgspec.field(default_factory=dict)
    waiting: list[RoleWait] = msgspec.field(default_factory=list)

    def role_of(self, agent_id: str) -> str | None:
        for role, holder in self.holders.items():
            if holder.agent_id == agent_id:
                return role
        return None

    def assignment(self) -> dict[str, str]:
        """role -> agent id."""
        return {role: holder.agent_id for role, holder in self.holders.items()}


def claim(roles: Roles, agent_id: str, identity: str, wanted: Iterable[str], seq: int, time: datetime) -> None:
    if roles.role_of(agent_id) is not None or any(w.agent_id == agent_id for w in roles.waiting):
        return
    ordered = [role for role in dict.fromkeys(wanted) if role]
    for role in ordered:
        if role not in roles.holders:
            roles.holders[role] = RoleHolder(agent_id=agent_id, identity=identity, seq=seq, time=time)
            return
    if ordered:
        roles.waiting.append(RoleWait(agent_id=agent_id, identity=identity, roles=ordered, seq=seq, time=time))


def _free(roles: Roles, role: str, seq: int, time: datetime) -> None:
    del roles.holders[role]
    for n, wait in enumerate(roles.waiting):
        if role in wait.roles:
            roles.waiting.pop(n)
            roles.holders[role] = RoleHolder(agent_id=wait.agent_id, identity=wait.identity, seq=seq, time=time)
            return


def release(roles: Roles, agent_id: str, role: str | None, seq: int, time: datetime) -> None:
    held = roles.role_of(agent_id)
    if held is not None and (role is None or role == held):
        _free(roles, held, seq, time)
    if role is None or held is None:
        roles.waiting = [w for w in roles.waiting if w.agent_id != agent_id]


def left(roles: Roles, identity: str, seq: int, time: datetime) -> None:
    """A participant left: its roles are freed and its waiting claims withdrawn."""
    if not roles.holders and not roles.waiting:
        return
    roles.waiting = [w for w in roles.waiting if identity not in (w.agent_id, w.identity)]
    for role, holder in list(roles.holders.items()):
        if identity in (holder.agent_id, holder.identity):
            _free(roles, role, seq, time)


def apply_event(roles: Roles, event: ev.Event, seq: int, time: datetime) -> None:
    """Fold one event into ``roles`` (the reducers call this for role.* and participant.left)."""
    if isinstance(event, ev.RoleClaimEvent):
        claim(roles, event.body.agent_id, event.sender.identity, event.body.roles, seq, time)
    elif isinstance(event, ev.RoleReleaseEvent):
        release(roles, event.body.agent_id, event.body.role, seq, time)
    elif isinstance(event, ev.ParticipantLeftEvent):
        left(roles, event.body.identity, seq, time)


# --- the agent's side -------------------------------------------------------------------------


class RoleUnavailable(LedgerError, TimeoutError):
    """Every role the agent accepts is held, and none was freed in time."""

    def __init__(self, agent_id: str, wanted: list[str], holders: dict[str, str], timeout: float) -> None:
        held = ", ".join(f"{role}: {agent}" for role, agent in sorted(holders.items())) or "none"
        super().__init__(
            f"agent {agent_id!r} got none of {wanted} within {timeout:g}s (held: {held}); its claim still waits "
            "in the log: release it (release_role) or raise timeout="
        )


def wanted_roles(roles: Iterable[str]) -> list[str]:
    """A claim's roles in a deterministic order: a set is sorted, a list or tuple kept as given."""
    if isinstance(roles, (set, frozenset)):
        return sorted(roles)
    return list(dict.fromkeys(roles))


__all__ = ["RoleHolder", "RoleUnavailable", "RoleWait", "Roles", "apply_event", "claim", "left", "release",
           "wanted_roles"]
