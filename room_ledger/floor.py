"""The floor decided by log order (DESIGN.md; the rule is drawn in :mod:`room_ledger.state`): who
holds it, who waits, and each holder's tenure. Pure functions over :class:`Floor`, no I/O, no
clock: the fold (:mod:`room_ledger.state`) calls them, as it calls :mod:`room_ledger.roles` for roles.

* :func:`claim`: the earliest claim takes a free floor; later ones queue in log order; a claim by
  the holder only updates its task; a queued agent is not queued twice.
* :func:`release`: the holder's tenure ends (with its reason) and the head of the queue takes
  the floor at the releasing event's sequence.
* :func:`withdraw`: the holder releases; a queued agent leaves the queue.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

import msgspec

#: Floor tenures kept in the room state (see ``Floor.history``).
FLOOR_HISTORY_KEPT: Final = 100


# Structs of scalars only cannot be part of a reference cycle, so they stay out of the cyclic
# GC (gc=False): hydration makes thousands of them per call, and each tracked one brings the
# next collection closer (collections were the p99 of hydration).


class FloorClaim(msgspec.Struct, kw_only=True, gc=False):
    """A queued claim on the floor."""

    agent_id: str
    task: str | None = None
    seq: int
    time: datetime
    #: The participant identity that made the claim (its leaving withdraws the claim).
    identity: str = ""


class FloorTenure(msgspec.Struct, kw_only=True, gc=False):
    """One holder's time with the floor; ``end_seq`` is None while it still holds it."""

    holder: str
    task: str | None = None
    start_seq: int
    start_time: datetime
    end_seq: int | None = None
    end_time: datetime | None = None
    #: release, status_idle, resolved, handoff, left
    end_reason: str | None = None


class Floor(msgspec.Struct, kw_only=True):
    holder: str | None = None
    task: str | None = None
    since_seq: int | None = None
    since_time: datetime | None = None
    holder_identity: str = ""
    queue: list[FloorClaim] = msgspec.field(default_factory=list)
    #: The latest tenures, oldest first (at most FLOOR_HISTORY_KEPT): the room row is read on
    #: every hydration and must not grow with the room. The whole history is in the log
    #: (``ledger replay --floor``).
    history: list[FloorTenure] = msgspec.field(default_factory=list)
    #: Tenures ever, including those dropped from ``history``.
    tenures: int = 0


def claim(floor: Floor, agent_id: str, task: str | None, identity: str, seq: int, time: datetime) -> None:
    if floor.holder is None:
        take(floor, FloorClaim(agent_id=agent_id, task=task, seq=seq, time=time, identity=identity), seq, time)
        return
    if floor.holder == agent_id:
        if task is not None and task != floor.task:
            floor.task = task
            if floor.history and floor.history[-1].end_seq is None:
                floor.history[-1].task = task
        return
    for claim in floor.queue:
        if claim.agent_id == agent_id:
            if task is not None:
                claim.task = task
            return
    floor.queue.append(FloorClaim(agent_id=agent_id, task=task, seq=seq, time=time, identity=identity))


def take(floor: Floor, claim: FloorClaim, seq: int, time: datetime) -> None:
    floor.holder = claim.agent_id
    floor.task = claim.task
    floor.since_seq = seq
    floor.since_time = time
    floor.holder_identity = claim.identity
    floor.history.append(FloorTenure(holder=claim.agent_id, task=claim.task, start_seq=seq, start_time=time))
    floor.tenures += 1
    if len(floor.history) > FLOOR_HISTORY_KEPT:
        del floor.history[: len(floor.history) - FLOOR_HISTORY_KEPT]


def release(floor: Floor, seq: int, time: datetime, reason: str) -> None:
    if floor.history and floor.history[-1].end_seq is None:
        tenure = floor.history[-1]
        tenure.end_seq = seq
        tenure.end_time = time
        tenure.end_reason = reason
    floor.holder = None
    floor.task = None
    floor.since_seq = None
    floor.since_time = None
    floor.holder_identity = ""
    if floor.queue:
        take(floor, floor.queue.pop(0), seq, time)


def withdraw(floor: Floor, agent_id: str, seq: int, time: datetime, reason: str) -> None:
    if floor.holder == agent_id:
        release(floor, seq, time, reason)
    else:
        floor.queue = [c for c in floor.queue if c.agent_id != agent_id]
