"""Helpers for LiveKit agents: publish coordination state to the ledger, never hand-written JSON.

An agent publishes on its own room connection (reliable data packets on topic ``ledger``, or a
text stream when the JSON is over 15 KiB); the bridge records each event once, under an id the
agent can compute (:func:`protocol_event_id`). Who holds the floor is answered from the
followed log, so every agent computes the same holder::

    agent = LedgerAgent(ctx.room, ledger)          # agent_id: the participant identity
    await agent.start()                           # hydrate + follow the room's log
    await agent.request_floor(task="refund")
    await agent.wait_for_floor()                  # or: agent.holds_floor
    await agent.patch_session({"caller": {"verified": True}})
    await agent.sync_userdata(session.userdata)   # publishes only what changed
    role = await agent.claim_role({"customer", "support"})             # decided by log order

Session patches, floor claims and releases, and status carry the agent's ownership epoch (the
sequence of its first claim, or of the handoff it resumed from, seen in its followed log): a
write from an epoch the log has superseded is ignored by every reader (:mod:`room_ledger.ownership`),
so once the followed log shows it superseded, those helpers raise
:class:`~room_ledger.errors.Superseded` instead of sending: the process should shut its session down.

Handing a caller to another agent's process is :mod:`room_ledger.handoff` (``transfer_tool``,
``LedgerLink``); this module has the rule it applies (:func:`handoff_took_effect`) and the
dispatch metadata (:func:`handoff_from_metadata`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import msgspec

from room_ledger import events as ev
from room_ledger import ownership as ownership_rules
from room_ledger import protocol
from room_ledger.errors import Superseded
from room_ledger.events import derived_event_id
from room_ledger.following import FollowedRoom
from room_ledger.hydrate import hydrate
from room_ledger.roles import RoleUnavailable, wanted_roles
from room_ledger.settings import DEFAULT_MAX_PAYLOAD
from room_ledger.state import RoomState, apply_safely, apply_session_patch, json_pointer

if TYPE_CHECKING:
    from livekit import rtc

    from room_ledger.client import Ledger, Record
    from room_ledger.hydrate import Snapshot

log = logging.getLogger("ledger.agents")



#: The data topic of the ledger protocol.
LEDGER_TOPIC: Final = protocol.TOPIC_LEDGER
#: Event types agents may publish on the ledger topic.
AGENT_EVENT_TYPES: Final = frozenset(
    {"agent.status", "floor.request", "floor.release", "handoff", "session.patch", "context.summary",
     "conversation.item", "role.claim", "role.release", "dispatch.created"}
)
#: Largest payload sent as one reliable data packet; larger ones go as a text stream.
MAX_PACKET_BYTES: Final = 15 * 1024
#: Keys of the dispatch metadata a handoff sends (and nothing else).
HANDOFF_METADATA_KEYS: Final = ("room", "ledger_seq")
#: Writes the fold fences by epoch (:mod:`room_ledger.ownership`): the helpers stamp them and
#: refuse them once this process's epoch is superseded.
FENCED_EVENT_TYPES: Final = frozenset({"session.patch", "floor.request", "floor.release", "agent.status"})
#: How many of its own published event ids an agent remembers (to know a grant it caused as its own).
OWN_IDS_KEPT: Final = 1_000


def protocol_event_id(room: str, payload_id: str) -> str:
    """The log id of an event an agent published with its own ``id`` (the same on every bridge)."""
    return derived_event_id(room, "ledger", payload_id)


def encode_protocol(type_name: str, body: ev.Body | Mapping[str, Any], *, payload_id: str | None = None,
                    extra: Mapping[str, Any] | None = None) -> tuple[str, bytes]:
    """``(payload_id, JSON)`` of one protocol message; the body is validated first.

    ``extra``: fields beyond the type's own, sent as they are (the log keeps them with the event),
    e.g. a handoff's W3C ``traceparent``.
    """
    if type_name not in AGENT_EVENT_TYPES:
        raise ValueError(f"{type_name!r} is not a type agents publish; one of {sorted(AGENT_EVENT_TYPES)}")
    if not isinstance(body, ev.Body):
        body = ev.body_from_dict(type_name, dict(body))
    fields: dict[str, Any] = msgspec.to_builtins(body)
    pid = payload_id or os.urandom(12).hex()
    return pid, msgspec.json.encode({**(extra or {}), "type": type_name, "id": pid, **fields})


def merge_patch_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The RFC 7386 merge patch turning ``old`` into ``new`` (``{}`` when equal).

    A key missing from ``new`` (or ``None`` in it) becomes ``null``, which a merge patch reads as
    "delete": :func:`session_diff` is the change that keeps nulls.
    """
    patch: dict[str, Any] = {}
    for key in old:
        if key not in new or (new[key] is None and old[key] is not None):
            patch[key] = None
    for key, value in new.items():
        if value is None:
            continue
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = merge_patch_diff(before, value)
            if sub:
                patch[key] = sub
        elif key not in old or before != value:
            patch[key] = value
    return patch


def _merge_safe(value: Any) -> bool:
    """Whether a merge patch can carry ``value`` as it is (no null where a merge patch deletes)."""
    if value is None:
        return False
    if isinstance(value, Mapping):
        return all(_merge_safe(v) for v in value.values())
    return True  # lists and scalars replace wholesale: nulls inside a list are kept


def session_diff(old: Mapping[str, Any], new: Mapping[str, Any],
                 path: tuple[str, ...] = ()) -> ev.SessionPatch:
    """The ``session.patch`` turning ``old`` into ``new`` exactly (empty when equal).

    Keys gone from ``new`` are deleted by the merge patch; a value that is or holds ``null``
    (where a merge patch would delete) is set exactly at its JSON Pointer, so ``None`` survives.
    """
    patch: dict[str, Any] = {}
    exact: dict[str, Any] = {}
    for key in old:
        if key not in new:
            patch[key] = None
    for key, value in new.items():
        before = old.get(key, _ABSENT)
        if before is not _ABSENT and _same_json(before, value):
            continue
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = session_diff(before, value, (*path, key))
            if sub.patch:
                patch[key] = sub.patch
            exact.update(sub.set_values)
        elif _merge_safe(value):
            patch[key] = value
        else:
            exact[json_pointer((*path, key))] = value
    return ev.SessionPatch(patch=patch, set_values=exact)


_ABSENT: Final = object()


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON: ``1 == True`` in Python, not in JSON (nor after a round trip)."""
    if type(a) is not type(b) and (isinstance(a, bool) or isinstance(b, bool)):
        return False
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def userdata_document(userdata: Any) -> dict[str, Any]:
    """A userdata object as a JSON document: fields that cannot be JSON (clients, closures) are left out."""
    if isinstance(userdata, Mapping):
        items: dict[str, Any] = dict(userdata)
    elif dataclasses.is_dataclass(userdata) and not isinstance(userdata, type):
        items = {f.name: getattr(userdata, f.name) for f in dataclasses.fields(userdata)}
    elif isinstance(userdata, msgspec.Struct):
        items = {name: getattr(userdata, name) for name in userdata.__struct_fields__}
    elif hasattr(userdata, "model_dump"):
        items = dict(userdata.model_dump())
    else:
        items = {k: v for k, v in vars(userdata).items() if not k.startswith("_")}
    document: dict[str, Any] = {}
    for key, value in items.items():
        if key.startswith("_") or callable(value):
            continue
        try:
            converted = msgspec.to_builtins(value)
            msgspec.json.encode(converted)
        except (TypeError, ValueError, msgspec.EncodeError):
            continue
        document[str(key)] = converted
    return document


@dataclass(frozen=True)
class HandoffRequest:
    """What a handoff target receives in its dispatch metadata."""

    room: str
    ledger_seq: int


def handoff_from_metadata(metadata: str) -> HandoffRequest | None:
    """Parse a dispatch's metadata written by a handoff (:mod:`room_ledger.handoff`); None if it is not one."""
    try:
        data = msgspec.json.decode(metadata or "{}")
    except msgspec.DecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("room"), str) or not isinstance(
            data.get("ledger_seq"), int):
        return None
    return HandoffRequest(room=data["room"], ledger_seq=data["ledger_seq"])


def handoff_took_effect(state: RoomState, seq: int, from_agent: str) -> bool:
    """Whether ``from_agent``'s handoff at ``seq`` released its floor (log order decides a race).

    A handoff passes the floor only if its source held it at that point of the log; every
    process folds the same log, so every process gives the same answer. ``state``: any fold
    of the room that has reached ``seq`` (recent enough to keep that tenure in its history).
    """
    return any(t.end_seq == seq and t.end_reason == "handoff" and t.holder == from_agent
               for t in state.floor.history)


class LedgerAgent:
    """One agent's ledger helpers on its LiveKit room connection (and, for reads, a ``Ledger``)."""

    def __init__(self, room: rtc.Room, ledger: Ledger | None = None, *, agent_id: str | None = None) -> None:
        self.room = room
        self.ledger = ledger
        self._agent_id = agent_id
        self._published_session: dict[str, Any] = {}
        self._state: RoomState | None = None
        self._seq = 0
        self._followed: FollowedRoom | None = None
        self._seen_ids: dict[str, int] = {}
        #: Whether the last publish went as a text stream (too big for a packet). Packets of one
        #: sender reach the log in the order sent; a stream is recorded when it ends, so a packet
        #: sent after it can be recorded first.
        self.last_streamed = False
        #: Called with each followed record once :attr:`state` includes it (see :meth:`on_record`).
        self._listeners: list[Callable[[Record], None]] = []
        #: This process's ownership epoch (None: it owns no call, and its writes are never fenced).
        self._epoch: int | None = None
        #: Log ids of the events this process published, newest last: a grant made by one of them
        #: (its first floor claim, the record of its failed handoff) is this process's epoch.
        self._own_ids: dict[str, None] = {}

    @property
    def agent_id(self) -> str:
        return self._agent_id or self.room.local_participant.identity

    @property
    def room_name(self) -> str:
        return self.room.name

    # --- publishing ------------------------------------------------------------------------------

    async def publish(self, type_name: str, body: ev.Body | Mapping[str, Any], *, payload_id: str | None = None,
                      extra: Mapping[str, Any] | None = None) -> str:
        """Publish one event; returns the id it will have in the log.

        Raises :class:`~room_ledger.errors.Superseded` for a write the fold fences (session
        patch, floor claim or release, status) once the followed log shows this process's epoch
        superseded: it would be ignored.
        """
        if type_name in FENCED_EVENT_TYPES:
            self.check_not_superseded()
        pid, data = encode_protocol(type_name, body, payload_id=payload_id, extra=extra)
        # Large messages go as a text stream (any size the bridge can store); only over the hard
        # limit is one refused, here, before anything is sent (issue 13).
        limit = self.ledger.settings.max_payload if self.ledger is not None else DEFAULT_MAX_PAYLOAD
        if len(data) > limit:
            raise ev.PayloadTooLarge(type_name, len(data), limit)
        participant = self.room.local_participant
        self.last_streamed = len(data) > MAX_PACKET_BYTES
        if not self.last_streamed:
            await participant.publish_data(data, reliable=True, topic=LEDGER_TOPIC)
        else:
            await participant.send_text(data.decode("utf-8"), topic=LEDGER_TOPIC)
        event_id = protocol_event_id(self.room_name, pid)
        self._own_ids[event_id] = None
        if len(self._own_ids) > OWN_IDS_KEPT:
            del self._own_ids[next(iter(self._own_ids))]
        return event_id

    async def status(self, status: ev.AgentStatusValue, *, action_lock: bool = False, task: str | None = None) -> str:
        """The seed's coordination payload (``agent_id``, ``status``, ``action_lock``, ``task``)."""
        return await self.publish("agent.status", ev.AgentStatus(agent_id=self.agent_id, status=status,
                                                                 action_lock=action_lock, task=task,
                                                                 epoch=self._epoch))

    async def request_floor(self, task: str | None = None) -> str:
        return await self.publish("floor.request", ev.FloorRequest(agent_id=self.agent_id, task=task,
                                                                   epoch=self._epoch))

    async def release_floor(self, reason: str | None = None) -> str:
        return await self.publish("floor.release", ev.FloorRelease(agent_id=self.agent_id, reason=reason,
                                                                   epoch=self._epoch))

    async def patch_session(self, patch: Mapping[str, Any] | None = None, *,
                            set_values: Mapping[str, Any] | None = None) -> str:
        """Publish a change of the room's session document.

        ``patch``: an RFC 7386 merge patch (its ``null`` deletes a key). ``set_values``: JSON
        Pointer -> value, stored exactly after the patch (``{"/promo_code": None}`` makes the
        field null; a merge patch cannot).
        """
        self.check_not_superseded()
        epoch = self._epoch
        body = ev.SessionPatch(patch=dict(patch or {}), set_values=dict(set_values or {}),
                               agent_id=self.agent_id if epoch is not None else None, epoch=epoch)
        # The agent's own copy (see adopt_session), so patched in place.
        self._published_session = apply_session_patch(self._published_session, body)
        return await self.publish("session.patch", body)

    async def sync_userdata(self, userdata: Any) -> str | None:
        """Publish what changed in ``userdata`` since the last publish (None when nothing did)."""
        document = userdata_document(userdata)
        change = session_diff(self._published_session, document)
        if not change.patch and not change.set_values:
            return None
        return await self.patch_session(change.patch, set_values=change.set_values)

    def adopt_session(self, session: Mapping[str, Any]) -> None:
        """Start diffing from a hydrated session (a handoff target), so only changes are published."""
        # A copy of its own: the hydrated state's nested documents are the fold's.
        self._published_session = copy.deepcopy(dict(session))

    async def publish_summary(self, text: str, covers_seq: int) -> str:
        return await self.publish("context.summary", ev.ContextSummary(text=text, covers_seq=covers_seq))

    async def record_dispatch(self, dispatch: Any, *, by: str) -> str | None:
        """Publish ``dispatch.created`` for a dispatch this agent just created (``ledger dispatches``
        then shows who joined for it, and how long after). Never raises: the dispatch exists
        either way; returns the event id, or None (logged) when it could not be sent."""
        try:
            return await self.publish("dispatch.created", ev.DispatchCreated(
                dispatch_id=str(dispatch.id), agent_name=str(dispatch.agent_name),
                metadata=str(dispatch.metadata), by=by))
        except Exception as exc:
            log.warning("dispatch %s created but not recorded in the log: %s", getattr(dispatch, "id", "?"), exc)
            return None

    async def claim_role(self, roles: Iterable[str], *, timeout: float = 10.0) -> str:
        """Claim one of ``roles``; returns the one the log gives this agent (see :mod:`room_ledger.roles`).

        Two agents claiming ``{"customer", "support"}`` at the same instant get different roles,
        decided by log order. Needs :meth:`start` first (the answer comes from the followed log,
        as for the floor). An agent already holding one of them gets it back at once. Raises
        :class:`~room_ledger.roles.RoleUnavailable` when all are held for ``timeout`` seconds.
        """
        wanted = wanted_roles(roles)
        if not wanted:
            raise ValueError("claim_role needs at least one role")
        agent_id = self.agent_id
        held = self.state.roles.role_of(agent_id)
        if held is not None:
            return held
        await self.publish("role.claim", ev.RoleClaim(agent_id=agent_id, roles=wanted))
        try:
            await self.wait_until(lambda state: state.roles.role_of(agent_id) is not None, timeout)
        except TimeoutError:
            raise RoleUnavailable(agent_id, wanted, self.state.roles.assignment(), timeout) from None
        role = self.state.roles.role_of(agent_id)
        assert role is not None
        return role

    async def release_role(self, role: str | None = None, *, wait: bool = True, timeout: float = 10.0) -> None:
        """Give up the role (or a waiting claim); ``wait``: until the log shows it freed."""
        agent_id = self.agent_id
        await self.publish("role.release", ev.RoleRelease(agent_id=agent_id, role=role))
        if wait:
            await self.wait_until(
                lambda state: state.roles.role_of(agent_id) is None
                and not any(w.agent_id == agent_id for w in state.roles.waiting), timeout)

    @property
    def role(self) -> str | None:
        """This agent's role in the followed log (None: none yet)."""
        return self.state.roles.role_of(self.agent_id)

    # --- reading the log: the floor -----------------------------------------------------------------

    async def start(self, *, snapshot: Snapshot | None = None) -> Snapshot:
        """Hydrate the room (or use ``snapshot``) and follow its log from there."""
        ledger = self._need_ledger()
        snap: Snapshot = snapshot if snapshot is not None else await hydrate(ledger, self.room_name)
        self._state = snap.state
        self._seq = snap.seq
        if self._followed is None:
            self._followed = FollowedRoom(ledger, self.room_name, after=self._seq)
            self._followed.on_record(self._fold)
            self._followed.start(name=f"ledger-agent-follow-{self.agent_id}")
        return snap

    async def stop(self) -> None:
        if self._followed is not None:
            await self._followed.close()
            self._followed = None

    def _need_ledger(self) -> Ledger:
        if self.ledger is None:
            raise RuntimeError("this needs a Ledger: LedgerAgent(room, ledger)")
        return self.ledger

    def _fold(self, record: Record) -> None:
        assert self._state is not None
        failure = apply_safely(self._state, record)
        if failure is not None:
            # Skipped the way every reader skips it (the state notes its sequence): the follow goes on.
            log.warning("room event %d could not be folded and is skipped (%s)", record.seq,
                        type(failure).__name__)
        elif record.event.id in self._own_ids:
            owner = self._state.ownership.owners.get(self.agent_id)
            if owner is not None and owner.epoch == record.seq:
                # A grant this process caused (its first claim, its failed handoff's record): another
                # process of the same agent id seeing it must not take it for its own.
                self._epoch = record.seq
        self._seq = record.seq
        self._seen_ids[record.event.id] = record.seq
        if len(self._seen_ids) > 10_000:
            self._seen_ids.pop(next(iter(self._seen_ids)))
        for listener in list(self._listeners):
            listener(record)

    def on_record(self, listener: Callable[[Record], None]) -> Callable[[], None]:
        """Call ``listener(record)`` for each followed record, after it is folded; returns the undo."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    @property
    def state(self) -> RoomState:
        if self._state is None:
            raise RuntimeError("call start() first: the floor is answered from the followed log")
        return self._state

    @property
    def seq(self) -> int:
        """The last log sequence folded into :attr:`state`."""
        return self._seq

    # --- ownership: the fence -----------------------------------------------------------------------

    @property
    def epoch(self) -> int | None:
        """The sequence that made this process the owner of its call (None: it owns none), which
        its fenced writes carry (:mod:`room_ledger.ownership`)."""
        return self._epoch

    def adopt_epoch(self, seq: int) -> None:
        """Own the call from the grant at ``seq`` (a handoff this process resumed from)."""
        self._epoch = seq

    @property
    def superseded_because(self) -> str | None:
        """Why this process's epoch is superseded in the followed log (None: it is not, or has none)."""
        if self._epoch is None or self._state is None:
            return None
        return ownership_rules.stale_reason(self._state.ownership, self.agent_id, self._epoch)

    @property
    def superseded(self) -> bool:
        return self.superseded_because is not None

    def check_not_superseded(self) -> None:
        """Raise :class:`~room_ledger.errors.Superseded` if the followed log superseded this epoch."""
        reason = self.superseded_because
        if reason is not None:
            assert self._epoch is not None
            raise Superseded(self.agent_id, self._epoch, reason, self.room_name)

    @property
    def floor_holder(self) -> str | None:
        return self.state.floor.holder

    @property
    def holds_floor(self) -> bool:
        return self.floor_holder == self.agent_id

    async def wait_until(self, predicate: Any, timeout: float = 10.0) -> None:
        """Wait until ``predicate(state)`` is true in the followed log."""
        _ = self.state  # raises before start()
        followed = self._followed
        if followed is None or not await followed.wait_for(lambda: bool(predicate(self.state)), timeout):
            # Stopped, or the follow failed: nothing more will come to make it true.
            raise TimeoutError(f"room {self.room_name!r}: not following the log any more") from (
                followed.error if followed is not None else None)

    async def wait_for_floor(self, agent_id: str | None = None, timeout: float = 10.0) -> None:
        who = agent_id or self.agent_id
        await self.wait_until(lambda s: s.floor.holder == who, timeout)

    async def wait_for_event(self, event_id: str, timeout: float = 10.0) -> int:
        """Wait until an event (e.g. one just published) is in the log; returns its sequence."""
        await self.wait_until(lambda _: event_id in self._seen_ids, timeout)
        return self._seen_ids[event_id]


# --- the conversation for LiveKit Agents ------------------------------------------------------




