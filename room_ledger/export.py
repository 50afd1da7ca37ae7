"""Conversations out of the log, as data: one JSON object per conversation (``ledger export``).

::

    rooms = await select_rooms(ledger, RoomSelection(prefix="support-"))
    async for conversation in export_conversations(ledger, rooms):
        out.write(msgspec.json.encode(conversation.to_builtins(shape="openai")) + b"\\n")

A conversation is one room's whole conversation, folded by the same reducers as hydration: its
LiveKit shape (``shape="livekit"``, ``{"items": [...]}``) *is* what
``hydrate(ledger, room, full_conversation=True).chat_ctx().to_dict(exclude_timestamp=False)``
gives, so ``ChatContext.from_dict(line)`` loads it back. The OpenAI shape (``{"messages": [...]}``)
is LiveKit's own conversion of that context (``to_provider_format("openai")``): what an agent's
LLM would have been sent. Both carry ``turns``: every item with its speaker identity and kind,
text, times, log sequence, tool calls and outputs, and the room's handoffs (``handoff`` events,
which a chat context has no item for).

Agent-to-agent rooms (two or more agents speak, no human does) are exported once per agent,
from that agent's side (``perspective``): its own speech is ``assistant``, the other agents'
speech ``user``. Each agent's session also heard the other as a user message; those hearings
repeat what the speaker's own items already hold, so they are left out of both sides.

Memory stays constant over any number of rooms: rooms are folded a few at a time
(:data:`EXPORT_CONCURRENCY`) and handed on in order, and nothing of a room is kept once it is
yielded (10,000 rooms: 144 MiB peak, 1.02x that of 1,000; ``bench/export.py``). A room of up to
:data:`SMALL_ROOM_EVENTS` events is read whole by direct gets and folded here, a larger one is
hydrated (projection row plus log); either way the same reducers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, Literal

from room_ledger import events as ev
from room_ledger import state as rd
from room_ledger.chat import chat_items
from room_ledger.errors import LedgerError
from room_ledger.hydrate import Snapshot, hydrate
from room_ledger.settings import DIRECT_BATCH

if TYPE_CHECKING:
    from livekit.agents.llm import ChatContext

    from room_ledger.client import Ledger, Record
    from room_ledger.state import ConversationItem

Shape = Literal["openai", "livekit"]

#: Rooms hydrated at once while exporting: enough to hide the round trips, few enough that memory
#: does not grow with the number of rooms.
EXPORT_CONCURRENCY: Final = 8
#: Rooms up to this many events are read whole by direct gets (no consumer) for their handoffs.
SMALL_ROOM_EVENTS: Final = 4 * DIRECT_BATCH
#: Participant kinds that are people (a room where one of them spoke is not agent-to-agent).
_HUMAN_KINDS: Final = frozenset({"standard", "sip"})


@dataclass(frozen=True, slots=True)
class RoomSelection:
    """Which rooms to export: one room, a name prefix, and/or activity within a time range."""

    room: str | None = None
    prefix: str | None = None
    #: A room is selected when its activity (first to last event) overlaps [since, until].
    since: datetime | None = None
    until: datetime | None = None

    def matches_name(self, room: str) -> bool:
        if self.room is not None and room != self.room:
            return False
        return self.prefix is None or room.startswith(self.prefix)


@dataclass(slots=True)
class Conversation:
    """One exported conversation: a room's, or (agent-to-agent) one agent's side of it."""

    room: str
    chat_ctx: ChatContext
    turns: list[dict[str, Any]]
    participants: list[dict[str, str]]
    first_seq: int | None
    last_seq: int
    started_at: datetime | None
    ended_at: datetime | None
    agent_to_agent: bool = False
    #: The agent whose side this is (agent-to-agent rooms), else None.
    perspective: str | None = None

    @property
    def id(self) -> str:
        return self.room if self.perspective is None else f"{self.room}#{self.perspective}"

    def messages(self) -> list[dict[str, Any]]:
        """OpenAI chat messages, by LiveKit's own conversion (no dummy user message added)."""
        messages, _ = self.chat_ctx.to_provider_format("openai", inject_dummy_user_message=False)
        return messages

    def to_builtins(self, *, shape: Shape = "openai", bare: bool = False) -> dict[str, Any]:
        """The JSON line: ``messages`` (openai) or ``items`` (livekit), with the metadata unless ``bare``."""
        data: dict[str, Any]
        if shape == "livekit":
            data = self.chat_ctx.to_dict(exclude_timestamp=False)
        else:
            data = {"messages": self.messages()}
        if bare:
            return data
        data.update(
            conversation=self.id,
            room=self.room,
            perspective=self.perspective,
            agent_to_agent=self.agent_to_agent,
            first_seq=self.first_seq,
            last_seq=self.last_seq,
            started_at=self.started_at,
            ended_at=self.ended_at,
            participants=self.participants,
            turns=self.turns,
        )
        return data


@dataclass(slots=True)
class ExportStats:
    rooms_seen: int = 0
    rooms_exported: int = 0
    rooms_without_conversation: int = 0
    conversations: int = 0
    turns: int = 0
    agent_to_agent_rooms: int = 0
    #: Rooms whose read failed, with why (the export goes on with the next room).
    failed: dict[str, str] = field(default_factory=dict)


# --- choosing rooms ---------------------------------------------------------------------------


async def _activity(ledger: Ledger, room: str) -> tuple[datetime | None, datetime | None]:
    bounds = await ledger.rooms.bounds(room)
    return bounds.first_time, bounds.last_time


async def select_rooms(ledger: Ledger, selection: RoomSelection) -> list[tuple[str, int]]:
    """The rooms to export with their event counts. Only names and counts are held (bytes per room)."""
    if selection.room is not None:
        summaries = [s for s in await _summaries(ledger, selection.room) if s[1]]
    else:
        summaries = [(s.room, s.events) for s in await ledger.rooms.summaries() if selection.matches_name(s.room)]
    if selection.since is None and selection.until is None:
        return summaries
    names = [room for room, _ in summaries]
    kept: list[tuple[str, int]] = []
    limit = asyncio.Semaphore(EXPORT_CONCURRENCY * 2)

    async def check(room: str) -> bool:
        async with limit:
            first, last = await _activity(ledger, room)
        if first is None or last is None:
            return False
        if selection.since is not None and last < selection.since:
            return False
        return not (selection.until is not None and first > selection.until)

    for summary, keep in zip(summaries, await asyncio.gather(*(check(r) for r in names)), strict=True):
        if keep:
            kept.append(summary)
    return kept


async def _summaries(ledger: Ledger, room: str) -> list[tuple[str, int]]:
    return [(room, await ledger.rooms.count(room))]


# --- one room ---------------------------------------------------------------------------------


def _turn(item: ConversationItem, kinds: dict[str, str]) -> dict[str, Any]:
    turn: dict[str, Any] = {
        "seq": item.seq,
        "at": item.time,
        "created_at": item.created_at if item.created_at is not None else item.time.timestamp(),
        "type": item.type,
        "item_id": item.item_id,
        "source": item.source,
    }
    if item.role is not None:
        turn["role"] = item.role
    if item.speaker:
        turn["speaker"] = item.speaker
        turn["kind"] = kinds.get(item.speaker, "unknown")
    if item.type == "message":
        turn["text"] = item.text
        if item.interrupted:
            turn["interrupted"] = True
        if item.language:
            turn["language"] = item.language
    elif item.type in ("function_call", "function_call_output"):
        for key in ("name", "call_id", "arguments", "output"):
            value = getattr(item, key)
            if value is not None:
                turn[key] = value
        if item.type == "function_call_output":
            if item.output is None:
                turn["output"] = item.text
            turn["is_error"] = item.is_error
    elif item.type == "agent_handoff":
        turn["old_agent_id"] = item.old_agent_id
        turn["new_agent_id"] = item.new_agent_id
    return turn


def _handoff_turn(seq: int, time: datetime, event: ev.HandoffEvent, kinds: dict[str, str]) -> dict[str, Any]:
    body = event.body
    turn: dict[str, Any] = {
        "seq": seq,
        "at": event.at or time,
        "created_at": (event.at or time).timestamp(),
        "type": "handoff",
        "item_id": event.id,
        "source": "handoff",
        "from_agent": body.from_agent,
        "to_agent": body.to_agent,
    }
    if body.reason is not None:
        turn["reason"] = body.reason
    if event.sender.identity:
        turn["speaker"] = event.sender.identity
        turn["kind"] = kinds.get(event.sender.identity, event.sender.kind)
    return turn


def _in_chat_ctx(item: ConversationItem) -> bool:
    """The items :meth:`Snapshot.chat_ctx` keeps (no system/developer messages, no config updates)."""
    if item.type == "message":
        return item.role in ("user", "assistant")
    if item.type == "agent_handoff":
        return bool(item.new_agent_id)
    return item.type in ("function_call", "function_call_output")


def _is_agent_to_agent(snapshot: Snapshot, kinds: dict[str, str]) -> list[str]:
    """The agents speaking in an agent-to-agent room (empty when a person is part of it)."""
    if any(kind in _HUMAN_KINDS for kind in kinds.values()):
        return []
    speakers: list[str] = []
    for item in snapshot.conversation:
        if item.type != "message" or item.role != "assistant" or not item.speaker:
            continue
        if kinds.get(item.speaker) != "agent":
            return []
        if item.speaker not in speakers:
            speakers.append(item.speaker)
    return speakers if len(speakers) >= 2 else []


async def _records(ledger: Ledger, room: str, type_name: str, snapshot: Snapshot,
                   read: list[Record] | None) -> list[Record]:
    """The room's events of one type, up to the snapshot (from ``read`` when the room was read whole)."""
    if read is not None:
        return [r for r in read if r.type == type_name]
    return [r async for r in ledger.read(room, types=[type_name], until=snapshot.seq)]


async def _snapshot(ledger: Ledger, room: str, events: int | None) -> tuple[Snapshot, list[Record] | None]:
    """The room folded to its head, and its records when it was small enough to read whole.

    A small room is read by direct gets and folded here with the reducers hydration uses: a
    log-only ``hydrate`` creates (and then deletes) a consumer per room, a round trip through the
    server's meta layer for a handful of events. (Before finished reads deleted their consumers,
    thousands of rooms a minute reached the server's consumer limit, err_code 10026.)
    """
    if events is None or events > SMALL_ROOM_EVENTS:
        return await hydrate(ledger, room, full_conversation=True), None
    records = await ledger.read_recent(room, after=0)
    state = rd.fold(records, rd.RoomState(room=room))
    return Snapshot(room=room, seq=state.seq, state=state, conversation=state.conversation,
                    full_conversation=True), records


async def _tool_owners(ledger: Ledger, room: str, snapshot: Snapshot, read: list[Record] | None) -> dict[str, str]:
    """item id -> the identity whose session published it (tool items carry no speaker)."""
    owners: dict[str, str] = {}
    for record in await _records(ledger, room, "conversation.item", snapshot, read):
        event = record.event
        if isinstance(event, ev.ConversationItemEvent) and event.body.item_type != "message":
            owners[event.body.item_id] = event.sender.identity
    return owners


async def export_room(ledger: Ledger, room: str, events: int | None = None) -> list[Conversation]:
    """The room's conversation(s): one, or one per agent in an agent-to-agent room; none when empty.

    ``events``: the room's event count, when known (a small room is read whole, without a consumer).
    """
    snapshot, read = await _snapshot(ledger, room, events)
    state = snapshot.state
    kinds = {identity: p.kind for identity, p in state.participants.items()}
    for item in snapshot.conversation:
        if item.speaker and item.speaker not in kinds:
            kinds[item.speaker] = "unknown"
    handoffs: list[dict[str, Any]] = []
    if state.index.counts.get("handoff"):
        for record in await _records(ledger, room, "handoff", snapshot, read):
            if isinstance(record.event, ev.HandoffEvent):
                handoffs.append(_handoff_turn(record.seq, record.time, record.event, kinds))
    kept = [item for item in snapshot.conversation if _in_chat_ctx(item)]
    if not kept and not handoffs:
        return []
    participants = [{"identity": identity, "kind": kind} for identity, kind in sorted(kinds.items())]
    index = state.index

    def conversation(ctx: ChatContext, turns: list[dict[str, Any]], perspective: str | None = None) -> Conversation:
        return Conversation(
            room=room, chat_ctx=ctx, turns=_merge(turns, handoffs), participants=participants,
            first_seq=index.first_seq, last_seq=snapshot.seq, started_at=kept[0].time if kept else None,
            ended_at=index.last_activity, agent_to_agent=perspective is not None, perspective=perspective,
        )

    agents = _is_agent_to_agent(snapshot, kinds)
    if not agents:
        return [conversation(snapshot.chat_ctx(), [_turn(item, kinds) for item in kept])]
    owners = await _tool_owners(ledger, room, snapshot, read) if any(i.type != "message" for i in kept) else {}
    sides: list[Conversation] = []
    for agent in agents:
        ctx = _side(snapshot, agent, owners)
        ids = {item.id for item in ctx.items}
        turns = []
        for item in kept:
            if item.item_id not in ids:
                continue
            turn = _turn(item, kinds)
            if item.type == "message":
                turn["role"] = "assistant" if item.speaker == agent else "user"
            turns.append(turn)
        sides.append(conversation(ctx, turns, agent))
    return sides


def _side(snapshot: Snapshot, agent: str, owners: dict[str, str]) -> ChatContext:
    """One agent's side of an agent-to-agent conversation (:func:`room_ledger.chat.chat_items` from its
    perspective; ``owners``: item id -> whose session published it)."""
    from livekit.agents import llm  # noqa: PLC0415 - livekit-agents: optional and heavy, loaded only to shape a conversation

    return llm.ChatContext(chat_items(snapshot.conversation, perspective=agent, owners=owners))


def _merge(turns: list[dict[str, Any]], handoffs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    if not handoffs:
        return turns
    return sorted([*turns, *handoffs], key=lambda t: int(t["seq"]))


async def export_conversations(
    ledger: Ledger, rooms: Iterable[str | tuple[str, int]], *, stats: ExportStats | None = None,
    concurrency: int = EXPORT_CONCURRENCY,
) -> AsyncIterator[Conversation]:
    """The conversations of ``rooms`` (names, or ``(name, events)`` as :func:`select_rooms` gives them),
    in the given order, a few rooms folded ahead."""
    stats = stats if stats is not None else ExportStats()
    pending: list[tuple[str, asyncio.Task[list[Conversation]]]] = []
    names = iter(rooms)
    try:
        while True:
            while len(pending) < max(1, concurrency):
                chosen = next(names, None)
                if chosen is None:
                    break
                room, events = (chosen, None) if isinstance(chosen, str) else chosen
                pending.append((room, asyncio.ensure_future(export_room(ledger, room, events))))
            if not pending:
                return
            room, task = pending.pop(0)
            stats.rooms_seen += 1
            try:
                conversations = await task
            except LedgerError as exc:
                stats.failed[room] = str(exc)
                continue
            if not conversations:
                stats.rooms_without_conversation += 1
                continue
            stats.rooms_exported += 1
            if conversations[0].agent_to_agent:
                stats.agent_to_agent_rooms += 1
            for conversation in conversations:
                stats.conversations += 1
                stats.turns += len(conversation.turns)
                yield conversation
    finally:
        for _, task in pending:
            task.cancel()
