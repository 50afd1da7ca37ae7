"""Hydration against real NATS and PostgreSQL: projection + log catch-up, log-only fallback,
min_seq, ChatContext round trip, seed scenarios 000 and 001."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from livekit.agents.llm import ChatContext

from room_ledger import events as ev
from room_ledger.client import Ledger
from room_ledger.hydrate import HydrateTimeout, Snapshot, close, hydrate
from room_ledger.projections.projector import Projector
from room_ledger.projections.sample import interleaved
from room_ledger.settings import Settings


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def agent(name: str) -> ev.Sender:
    return ev.Sender(identity=name, kind="agent")


USER = ev.Sender(identity="caller", kind="sip")


@pytest.fixture
async def pg_ledger(pg_settings: Settings) -> AsyncIterator[Ledger]:
    async with Ledger(pg_settings) as client:
        yield client
        await close(client)


@pytest.fixture
async def log_only_ledger(settings: Settings, tmp_path: Path) -> AsyncIterator[Ledger]:
    """No PostgreSQL: LEDGER_DATABASE_URL unset and no embedded server under this home."""
    async with Ledger(settings.replace(home=tmp_path)) as client:
        yield client
        await close(client)


async def project(settings: Settings, until: int | None = None) -> None:
    async with Projector(settings) as projector:
        await projector.catch_up(until=until)


def view(snapshot: Snapshot) -> Any:
    data = snapshot.to_builtins()
    data["agents"] = sorted(snapshot.agents)
    return data


async def test_projector_stopped_running_or_absent_all_agree(pg_settings: Settings, pg_ledger: Ledger,
                                                             log_only_ledger: Ledger) -> None:
    room = unique("hyd")
    positions = await pg_ledger.append_many(interleaved([room], 400))
    # The projector ran up to the middle of the room, then stopped.
    await project(pg_settings, until=positions[len(positions) // 2].seq)
    stopped = await hydrate(pg_ledger, room, full_conversation=True)
    assert stopped.source == "projection+log"
    assert 0 < stopped.projection_seq < stopped.seq == positions[-1].seq and stopped.caught_up > 0
    log_only = await hydrate(log_only_ledger, room, full_conversation=True)
    assert log_only.source == "log" and log_only.projection_seq == 0
    await project(pg_settings)
    running = await hydrate(pg_ledger, room, full_conversation=True)
    assert running.caught_up == 0 and running.projection_seq == running.seq
    assert view(stopped) == view(log_only) == view(running)
    # Default: the conversation from the latest summary on (this log's summaries cover nothing).
    default = await hydrate(pg_ledger, room)
    assert [i.item_id for i in default.conversation] == [i.item_id for i in running.conversation]


async def test_unknown_room_is_empty(pg_ledger: Ledger) -> None:
    snapshot = await hydrate(pg_ledger, unique("nobody"))
    assert snapshot.seq == 0 and snapshot.floor.holder is None and snapshot.conversation == []


async def test_min_seq_waits_for_the_write_and_follow_continues(pg_ledger: Ledger) -> None:
    room = unique("ryw")
    first = await pg_ledger.append(ev.make_event(room, ev.FloorRequest(agent_id="a"), sender=agent("a")))
    target = await pg_ledger.head() + 1

    async def write_later() -> int:
        # Another room's events move the stream; then the handoff lands in ours.
        await pg_ledger.append(ev.make_event(unique("other"), ev.FloorRequest(agent_id="x")))
        pos = await pg_ledger.append(ev.make_event(room, ev.Handoff(from_agent="a", to_agent="b"),
                                                   sender=agent("a")))
        return pos.seq

    snapshot_task = asyncio.create_task(hydrate(pg_ledger, room, min_seq=target + 1, timeout=10))
    handoff_seq = await write_later()
    snapshot = await snapshot_task
    assert snapshot.seq == handoff_seq and snapshot.floor.holder is None
    with pytest.raises(HydrateTimeout):
        await hydrate(pg_ledger, room, min_seq=await pg_ledger.head() + 1000, timeout=0.2)
    # follow(after=snapshot.seq): the next event, no gap, no duplicate.
    nxt = await pg_ledger.append(ev.make_event(room, ev.FloorRelease(agent_id="a")))
    follower = pg_ledger.follow(room, after=snapshot.seq)
    assert isinstance(follower, AsyncGenerator)  # typed as an AsyncIterator; closed below
    record = await asyncio.wait_for(anext(follower), 5)
    await follower.aclose()
    assert record.seq == nxt.seq and first.seq < snapshot.seq


async def test_chat_ctx_round_trips_through_livekit(pg_settings: Settings, pg_ledger: Ledger) -> None:
    room = unique("ctx")
    items = [
        (ev.ConversationItem(item_id="item_sys", role="system", text="You are triage.", created_at=1.0), "a"),
        (ev.ConversationItem(item_id="item_u1", role="user", text="my card is lost", created_at=2.0), "a"),
        (ev.ConversationItem(item_id="item_a1", role="assistant", text="let me look", created_at=3.0), "a"),
        (ev.ConversationItem(item_id="item_f1", item_type="function_call", name="lookup_card", call_id="c1",
                             arguments='{"last4": "1234"}', created_at=4.0), "a"),
        (ev.ConversationItem(item_id="item_o1", item_type="function_call_output", name="lookup_card",
                             call_id="c1", output='{"status": "lost"}', created_at=5.0), "a"),
        (ev.ConversationItem(item_id="item_h1", item_type="agent_handoff", old_agent_id="a", new_agent_id="b",
                             created_at=6.0), "a"),
        (ev.ConversationItem(item_id="item_cfg", item_type="agent_config_update", created_at=6.5), "b"),
        (ev.ConversationItem(item_id="item_b1", role="assistant", text="billing here", created_at=7.0), "b"),
    ]
    await pg_ledger.append_many(ev.make_event(room, body, sender=agent(who)) for body, who in items)
    await project(pg_settings)
    snapshot = await hydrate(pg_ledger, room)
    ctx = snapshot.chat_ctx()
    assert [i.id for i in ctx.items] == ["item_u1", "item_a1", "item_f1", "item_o1", "item_h1", "item_b1"]
    assert [getattr(i, "role", i.type) for i in ctx.items] == [
        "user", "assistant", "function_call", "function_call_output", "agent_handoff", "assistant"]
    assert ctx.items[1].extra["speaker"] == "a" and ctx.items[5].extra["speaker"] == "b"  # type: ignore[union-attr]
    assert [i.created_at for i in ctx.items] == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    data = ctx.to_dict(exclude_timestamp=False)
    again = ChatContext.from_dict(data)
    assert again.is_equivalent(ctx)
    assert [i.created_at for i in again.items] == [i.created_at for i in ctx.items]
    assert again.to_dict(exclude_timestamp=False) == data


@pytest.mark.parametrize("projected", [False, True], ids=["log", "projection"])
async def test_chat_ctx_is_in_the_sessions_time_order(pg_settings: Settings, pg_ledger: Ledger,
                                                      projected: bool) -> None:
    """An agent's feed item can reach the log after a chat message the caller typed once it saw the
    reply (the two race through the SFU). The log keeps arrival order; the ChatContext is ordered
    by the sessions' own ``created_at``, as LiveKit Agents keeps it (``insert`` and ``merge``)."""
    room = unique("order")
    caller = ev.Sender(identity="caller", kind="standard")
    await pg_ledger.append_many([
        ev.make_event(room, ev.ConversationItem(item_id="item_u1", role="user", text="hi", created_at=1.0),
                      sender=agent("a")),
        ev.make_event(room, ev.ChatMessage(message_id="m2", text="my bill", identity="caller"), sender=caller),
        # the reply the caller saw before typing "my bill", reaching the log late
        ev.make_event(room, ev.ConversationItem(item_id="item_a1", role="assistant", text="hello", created_at=2.0),
                      sender=agent("a")),
        # the session's echo of the typed message: its time replaces the bridge's
        ev.make_event(room, ev.ConversationItem(item_id="item_u2", role="user", text="my bill", created_at=3.0),
                      sender=agent("a")),
    ])
    if projected:
        await project(pg_settings)
    snapshot = await hydrate(pg_ledger, room)
    assert [i.text for i in snapshot.conversation] == ["hi", "my bill", "hello"]  # the log's order
    ctx = snapshot.chat_ctx()
    assert [(i.created_at, i.text_content) for i in ctx.items] == [  # type: ignore[union-attr]
        (1.0, "hi"), (2.0, "hello"), (3.0, "my bill")]


@pytest.mark.parametrize("projected", [False, True], ids=["log", "projection"])
async def test_summary_starts_the_default_conversation(pg_settings: Settings, pg_ledger: Ledger,
                                                       projected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pages of two items: items 0-1 and 2-3 are pages, so the page of items 2-3 straddles the
    # summary's bound (item 2) and hydrate must drop item 2.
    monkeypatch.setattr("room_ledger.projections.projector.PAGE_ITEMS", 2)
    room = unique("sum")
    early = await pg_ledger.append_many(
        ev.make_event(room, ev.ConversationItem(item_id=f"item_{i}", role="user", text=f"u{i}"), sender=agent("a"))
        for i in range(5))
    summary = await pg_ledger.append(ev.make_event(
        room, ev.ContextSummary(text="caller lost a card", covers_seq=early[2].seq), sender=agent("a")))
    if projected:
        # Then the items after the summary come from PostgreSQL's pages and rows, bounded in SQL.
        await project(pg_settings, until=summary.seq)
    snapshot = await hydrate(pg_ledger, room)
    assert (snapshot.source == "projection+log" and snapshot.projection_seq >= summary.seq) == projected
    assert [i.item_id for i in snapshot.conversation] == ["item_3", "item_4"]
    ctx = snapshot.chat_ctx()
    assert ctx.items[0].extra["is_summary"] is True  # type: ignore[union-attr]
    assert "caller lost a card" in ctx.items[0].text_content  # type: ignore[union-attr,operator]
    # stamped just before the first item it did not cover, as LiveKit's summarization does
    assert ctx.items[0].created_at < ctx.items[1].created_at == snapshot.conversation[0].time.timestamp()
    full = await hydrate(pg_ledger, room, full_conversation=True)
    assert [i.item_id for i in full.conversation] == [f"item_{i}" for i in range(5)]


async def test_seed_000_three_agents_take_turns(pg_settings: Settings, pg_ledger: Ledger) -> None:
    """Three agents on one user track, round-robin with action_lock; each utterance once."""
    room = unique("seed000")
    names = ["intent", "lookup", "speaker"]
    events = [ev.make_event(room, ev.ParticipantJoined(identity="user", kind="standard"))]
    events += [ev.make_event(room, ev.ParticipantJoined(identity=n, kind="agent"), sender=agent(n)) for n in names]
    for turn in range(6):
        who = names[turn % 3]
        # All three agents transcribe the same user track.
        events += [ev.make_event(room, ev.Transcript(speaker="user", text=f"question {turn}",
                                                     segment_id=f"{n}-{turn}", track_id="TR_user"), sender=agent(n))
                   for n in names]
        events.append(ev.make_event(room, ev.AgentStatus(agent_id=who, status="processing", action_lock=True,
                                                         task=f"turn {turn}"), sender=agent(who)))
        events.append(ev.make_event(room, ev.Transcript(speaker=who, text=f"answer {turn}", segment_id=f"ans-{turn}",
                                                        track_id=f"TR_{who}"), sender=agent(who)))
        events.append(ev.make_event(room, ev.AgentStatus(agent_id=who, status="resolved", action_lock=False),
                                    sender=agent(who)))
    await pg_ledger.append_many(events)
    await project(pg_settings)
    snapshot = await hydrate(pg_ledger, room)
    assert snapshot.floor.holder is None
    assert [(t.holder, t.task, t.end_reason) for t in snapshot.floor.history] == [
        (names[t % 3], f"turn {t}", "resolved") for t in range(6)]
    texts = [(i.role, i.text) for i in snapshot.conversation]
    expected: list[tuple[str, str]] = []
    for t in range(6):
        expected += [("user", f"question {t}"), ("assistant", f"answer {t}")]
    assert texts == expected
    assert set(snapshot.agents) == set(names)


@dataclass
class Address:
    street: str = ""
    city: str = ""


@dataclass
class CallData:
    caller_name: str = ""
    verified: bool = False
    address: Address = field(default_factory=Address)
    extra: dict[str, Any] = field(default_factory=dict)


async def test_seed_001_handoff_hydrates_every_field_and_the_whole_conversation(
    pg_settings: Settings, pg_ledger: Ledger
) -> None:
    room = unique("seed001")
    a, b = "identify-agent", "account-agent"
    events = [ev.make_event(room, ev.ParticipantJoined(identity="caller", kind="sip"), sender=USER),
              ev.make_event(room, ev.ParticipantJoined(identity=a, kind="agent"), sender=agent(a)),
              ev.make_event(room, ev.AgentStatus(agent_id=a, status="processing", action_lock=True,
                                                 task="identify"), sender=agent(a))]
    fields = {f"field_{i:03d}": {"value": i, "tags": [str(i)]} if i % 3 == 0 else f"v{i}" for i in range(120)}
    for i in range(40):
        events.append(ev.make_event(room, ev.ConversationItem(item_id=f"item_u{i}", role="user", text=f"u{i}"),
                                    sender=agent(a)))
        events.append(ev.make_event(room, ev.ConversationItem(item_id=f"item_a{i}", role="assistant",
                                                              text=f"a{i}"), sender=agent(a)))
        chunk = dict(list(fields.items())[i * 3:(i + 1) * 3])
        events.append(ev.make_event(room, ev.SessionPatch(patch=chunk), sender=agent(a)))
    events.append(ev.make_event(room, ev.SessionPatch(patch={"caller_name": "Ann", "verified": True,
                                                             "address": {"street": "1 Main", "city": "Oslo"}}),
                                sender=agent(a)))
    positions = await pg_ledger.append_many(events)
    await project(pg_settings, until=positions[60].seq)  # the projector lags behind the handoff
    handoff = await pg_ledger.append(ev.make_event(room, ev.Handoff(from_agent=a, to_agent=b, reason="account"),
                                                   sender=agent(a)))
    await pg_ledger.append(ev.make_event(room, ev.ParticipantLeft(identity=a), sender=agent(a)))
    # Agent b, in another process, hydrates with read-your-writes on the handoff.
    async with Ledger(pg_settings) as other:
        snapshot = await hydrate(other, room, min_seq=handoff.seq, full_conversation=True)
        await close(other)
    assert snapshot.seq > handoff.seq and snapshot.source == "projection+log"
    assert {k: snapshot.session[k] for k in fields} == fields
    assert len(snapshot.session) == 123
    data = snapshot.session_as(CallData)
    assert data.caller_name == "Ann" and data.verified and data.address == Address("1 Main", "Oslo")

    class Typed(msgspec.Struct):
        caller_name: str
        field_003: dict[str, Any]

    assert snapshot.session_as(Typed).field_003 == {"value": 3, "tags": ["3"]}
    assert len(snapshot.conversation) == 80
    assert [i.text for i in snapshot.conversation[:3]] == ["u0", "a0", "u1"]
    assert len(snapshot.chat_ctx().items) == 80
    assert snapshot.floor.holder is None and snapshot.floor.history[-1].end_reason == "handoff"
    assert not snapshot.participants[a].present
