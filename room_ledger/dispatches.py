"""Which agent got which room: a room's agent dispatches beside what the log shows of them.

LiveKit's AgentDispatch API lists a room's dispatches (id, agent name, metadata, created at), but
not what became of them: livekit-server v1.13.5's ``ListDispatch`` shows no jobs in a dispatch's
state, and it lists an extra dispatch with an empty agent name, made for automatic dispatch when
the room was created. The log knows the rest: the dispatches the ledger created
(``dispatch.created``, from ``ledger dispatch``), and who joined: an agent participant carries
the ``lk.agent_name`` attribute livekit-server puts in the job's token, and the bridge (hidden,
so never a participant in its own log) leaves ``bridge.joined``.

:func:`dispatch_view` pairs them: each dispatch, oldest first, gets the first join of an agent
with its name at or after its creation (less :data:`CLOCK_SLACK_S`) that no earlier dispatch
took, and how long after the dispatch that was. Joins no dispatch explains are listed apart
(a dispatch deleted since, one from a token's room configuration, a server restarted since).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from room_ledger import events as ev
from room_ledger import protocol

if TYPE_CHECKING:
    from livekit.protocol.agent_dispatch import AgentDispatch

    from room_ledger.client import Ledger, Position

#: The participant attribute livekit-server gives an agent's participant (pkg/agent/worker.go).
AGENT_NAME_ATTRIBUTE: Final = protocol.ATTR_AGENT_NAME
#: The server's clock (dispatch creation) and the log's (joins) may differ a little.
CLOCK_SLACK_S: Final = 2.0


@dataclass(slots=True)
class Join:
    """An agent arriving in the room, as the log shows it."""

    agent_name: str
    #: The participant identity, or ``bridge:<bridge id>`` for the bridge.
    identity: str
    seq: int
    at: datetime

    def to_builtins(self) -> dict[str, Any]:
        return {"agent_name": self.agent_name, "identity": self.identity, "seq": self.seq, "at": self.at}


@dataclass(slots=True)
class DispatchRow:
    dispatch_id: str
    agent_name: str
    created_at: datetime | None = None
    metadata: str = ""
    #: Listed by the server now (False: deleted, or the server no longer knows the room).
    on_server: bool = False
    #: Recorded in the log by the ledger (``dispatch.created``), with what created it.
    logged_seq: int | None = None
    created_by: str = ""
    #: The dispatch livekit-server made for automatic dispatch (no agent name).
    automatic: bool = False
    joined: Join | None = None

    @property
    def after_s(self) -> float | None:
        if self.joined is None or self.created_at is None:
            return None
        return (self.joined.at - self.created_at).total_seconds()

    def to_builtins(self) -> dict[str, Any]:
        return {
            "dispatch_id": self.dispatch_id,
            "agent_name": self.agent_name,
            "created_at": self.created_at,
            "metadata": self.metadata,
            "on_server": self.on_server,
            "logged_seq": self.logged_seq,
            "created_by": self.created_by,
            "automatic": self.automatic,
            "joined": self.joined.to_builtins() if self.joined is not None else None,
            "after_s": round(self.after_s, 3) if self.after_s is not None else None,
        }


@dataclass(slots=True)
class DispatchView:
    room: str
    dispatches: list[DispatchRow] = field(default_factory=list)
    #: Agents that joined with no dispatch to explain them.
    unexplained: list[Join] = field(default_factory=list)
    #: Why the server's list is missing ("" when it was read).
    server_note: str = ""

    def to_builtins(self) -> dict[str, Any]:
        return {
            "room": self.room,
            "dispatches": [row.to_builtins() for row in self.dispatches],
            "unexplained_joins": [join.to_builtins() for join in self.unexplained],
            "server_note": self.server_note,
        }


def dispatch_event(room: str, dispatch: AgentDispatch, *, by: str) -> ev.KnownEvent:
    """The ``dispatch.created`` event of a dispatch just created (its id derives from the dispatch's)."""
    return ev.make_event(
        room,
        ev.DispatchCreated(dispatch_id=str(dispatch.id), agent_name=str(dispatch.agent_name),
                           metadata=str(dispatch.metadata), by=by),
        id=ev.derived_event_id(room, "dispatch.created", str(dispatch.id)),
        at=_created_at(dispatch) or ev.utcnow(),
    )


async def record_dispatch(ledger: Ledger, room: str, dispatch: AgentDispatch, *, by: str) -> Position:
    """Append ``dispatch.created`` for a dispatch the caller just created."""
    return await ledger.append(dispatch_event(room, dispatch, by=by))


def _created_at(dispatch: AgentDispatch) -> datetime | None:
    nanos = int(dispatch.state.created_at) if dispatch.HasField("state") else 0
    return datetime.fromtimestamp(nanos / 1e9, UTC) if nanos else None


async def log_of_dispatches(ledger: Ledger, room: str, *, bridge_agent_name: str) -> tuple[
        list[tuple[int, datetime, ev.DispatchCreated]], list[Join]]:
    """The room's ``dispatch.created`` events and agent joins, in log order."""
    created: list[tuple[int, datetime, ev.DispatchCreated]] = []
    async for record in ledger.read(room, types=["dispatch.created"]):
        if isinstance(record.event, ev.DispatchCreatedEvent):
            created.append((record.seq, record.event.at or record.time, record.event.body))
    joins: list[Join] = []
    seen: set[tuple[str, str]] = set()
    async for record in ledger.read(room, types=["participant.joined"]):
        event = record.event
        if not isinstance(event, ev.ParticipantJoinedEvent):
            continue
        # The bridge records who is there again after a reconnect: one arrival per participant sid.
        arrival = (event.body.identity, event.body.sid)
        if arrival in seen:
            continue
        seen.add(arrival)
        name = event.body.attributes.get(AGENT_NAME_ATTRIBUTE)
        if name is None and event.body.kind != "agent":
            continue
        joins.append(Join(agent_name=name or "", identity=event.body.identity, seq=record.seq,
                          at=event.at or record.time))
    async for record in ledger.read(room, types=["bridge.joined"]):
        if isinstance(record.event, ev.BridgeJoinedEvent):
            joins.append(Join(agent_name=bridge_agent_name, identity=f"bridge:{record.event.body.bridge_id}",
                              seq=record.seq, at=record.event.at or record.time))
    joins.sort(key=lambda join: join.seq)
    return created, joins


async def dispatch_view(
    ledger: Ledger, room: str, server_dispatches: list[AgentDispatch] | None, *, bridge_agent_name: str,
    server_note: str = "",
) -> DispatchView:
    """Pair the server's dispatches (None: not read) and the logged ones with the agents that joined."""
    created, joins = await log_of_dispatches(ledger, room, bridge_agent_name=bridge_agent_name)
    rows: dict[str, DispatchRow] = {}
    for dispatch in server_dispatches or []:
        rows[str(dispatch.id)] = DispatchRow(
            dispatch_id=str(dispatch.id), agent_name=str(dispatch.agent_name), created_at=_created_at(dispatch),
            metadata=str(dispatch.metadata), on_server=True, automatic=not dispatch.agent_name,
        )
    for seq, at, body in created:
        row = rows.get(body.dispatch_id)
        if row is None:
            row = rows[body.dispatch_id] = DispatchRow(dispatch_id=body.dispatch_id, agent_name=body.agent_name,
                                                       created_at=at, metadata=body.metadata)
        row.logged_seq, row.created_by = seq, body.by
    ordered = sorted(rows.values(), key=lambda r: (r.created_at or datetime.max.replace(tzinfo=UTC), r.dispatch_id))
    taken: set[int] = set()
    for row in ordered:
        if row.automatic:
            continue  # any agent without a name may have come from it; nothing to pair by
        for join in joins:
            if join.seq in taken or join.agent_name != row.agent_name:
                continue
            if row.created_at is not None and (join.at - row.created_at).total_seconds() < -CLOCK_SLACK_S:
                continue
            row.joined = join
            taken.add(join.seq)
            break
    view = DispatchView(room=room, dispatches=ordered, server_note=server_note)
    view.unexplained = [join for join in joins if join.seq not in taken]
    return view
