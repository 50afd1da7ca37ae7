"""``ledger export`` against real NATS and PostgreSQL: the exported conversation is hydration's
``chat_ctx()``, in LiveKit's and OpenAI's shapes; agent-to-agent rooms give both sides; rooms by
name, prefix and time range; the summary."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from livekit.agents.llm import ChatContext

from room_ledger import events as ev
from room_ledger.client import Ledger
from room_ledger.hydrate import close, hydrate
from room_ledger.projections.projector import Projector
from room_ledger.settings import Settings
from tests.test_cli_helpers import BILLING, USER, at, invoke, json_of, ok, run_async, scripted_events, seed


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def demo_like(room: str) -> list[ev.KnownEvent]:
    """The CLI tests' scripted room (floor, transcripts, a ledger handoff, a gap), then the billing
    agent's own session feed: it heard the caller, called a tool, got its output, answered."""
    e = ev.make_event
    item = ev.ConversationItem
    return [
        *scripted_events(room),
        e(room, item(item_id="item_h1", item_type="agent_handoff", old_agent_id="triage", new_agent_id="billing",
                     created_at=at(10.5).timestamp()), sender=BILLING, at=at(10.5)),
        e(room, item(item_id="item_u1", role="user", text="Can I get the second charge back?",
                     created_at=at(11).timestamp()), sender=BILLING, at=at(11)),
        e(room, item(item_id="item_f1", item_type="function_call", name="refund", call_id="call_1",
                     arguments='{"charge": "ch_2"}', created_at=at(12).timestamp()), sender=BILLING, at=at(12)),
        e(room, item(item_id="item_o1", item_type="function_call_output", name="refund", call_id="call_1",
                     output='{"refunded": true}', created_at=at(13).timestamp()), sender=BILLING, at=at(13)),
        e(room, item(item_id="item_a1", role="assistant", text="Done: the second charge is refunded.",
                     created_at=at(14).timestamp()), sender=BILLING, at=at(14)),
        e(room, item(item_id="item_sys", role="system", text="You are billing.", created_at=at(14.5).timestamp()),
          sender=BILLING, at=at(14.5)),
    ]


def agent_to_agent(room: str) -> list[ev.KnownEvent]:
    """Seed 002: a support agent and a customer agent, each with its own session, hearing the other."""
    e = ev.make_event
    item = ev.ConversationItem
    support, customer = ev.Sender("support", "agent"), ev.Sender("customer", "agent")
    lines = [
        (support, "Hello, I am Faizan speaking from Jodo."),
        (customer, "Yes, this is Yash speaking."),
        (support, "How can I help with your fee payment?"),
        (customer, "My autopay failed twice."),
    ]
    events: list[ev.KnownEvent] = [
        e(room, ev.ParticipantJoined(identity="support", kind="agent"), sender=support, at=at(0)),
        e(room, ev.ParticipantJoined(identity="customer", kind="agent"), sender=customer, at=at(0.1)),
    ]
    for n, (speaker, text) in enumerate(lines):
        listener = customer if speaker is support else support
        events.append(e(room, item(item_id=f"item_{speaker.identity}_{n}", role="assistant", text=text,
                                   created_at=at(n + 1).timestamp()), sender=speaker, at=at(n + 1)))
        events.append(e(room, item(item_id=f"item_{listener.identity}_heard_{n}", role="user", text=text,
                                   created_at=at(n + 1.5).timestamp()), sender=listener, at=at(n + 1.5)))
    events.append(e(room, item(item_id="item_lookup", item_type="function_call", name="lookup_payment",
                               call_id="c9", arguments="{}", created_at=at(9).timestamp()), sender=support, at=at(9)))
    events.append(e(room, item(item_id="item_lookup_out", item_type="function_call_output", name="lookup_payment",
                               call_id="c9", output="two failures", created_at=at(9.5).timestamp()),
                    sender=support, at=at(9.5)))
    return events


async def _project(settings: Settings) -> None:
    async with Projector(settings) as projector:
        await projector.catch_up()


async def _hydrated_ctx(settings: Settings, room: str) -> ChatContext:
    async with Ledger(settings) as ledger:
        snapshot = await hydrate(ledger, room, full_conversation=True)
        await close(ledger)
        return snapshot.chat_ctx()


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("projected", [False, True], ids=["log", "projection+log"])
def test_export_is_what_hydration_holds(pg_settings: Settings, tmp_path: Path, projected: bool) -> None:
    room = unique("export-demo")
    events = demo_like(room)
    if projected:
        # Most of the room from the projection rows, the rest from the log: hydration's usual path.
        seed(pg_settings, room, events[:8])
        run_async(_project(pg_settings))
        seed(pg_settings, room, events[8:])
    else:
        seed(pg_settings, room, events)
    ctx = run_async(_hydrated_ctx(pg_settings, room))
    assert len(ctx.items) == 8  # 3 transcripts, handoff item, user, call, output, answer (system left out)

    ok(pg_settings, ["export", room, "--livekit", "--out", str(tmp_path / "lk.jsonl")])
    [line] = lines_of(tmp_path / "lk.jsonl")
    loaded = ChatContext.from_dict(line)
    assert loaded.to_dict(exclude_timestamp=False) == ctx.to_dict(exclude_timestamp=False)
    assert loaded.is_equivalent(ctx)
    assert line["room"] == room and line["conversation"] == room and line["agent_to_agent"] is False

    ok(pg_settings, ["export", room, "--out", str(tmp_path / "openai.jsonl")])
    [line] = lines_of(tmp_path / "openai.jsonl")
    expected, _ = ctx.to_provider_format("openai", inject_dummy_user_message=False)
    assert line["messages"] == json.loads(json.dumps(expected))
    roles = [m["role"] for m in line["messages"]]
    assert roles == ["assistant", "user", "assistant", "user", "assistant", "tool", "assistant"]
    call = line["messages"][4]
    assert call["tool_calls"] == [{"id": "call_1", "type": "function",
                                   "function": {"name": "refund", "arguments": '{"charge": "ch_2"}'}}]
    assert line["messages"][5] == {"role": "tool", "tool_call_id": "call_1", "content": '{"refunded": true}'}

    turns = line["turns"]
    assert [t["type"] for t in turns] == ["message", "message", "handoff", "message", "agent_handoff", "message",
                                          "function_call", "function_call_output", "message"]
    first, caller, handoff = turns[0], turns[1], turns[2]
    assert (first["speaker"], first["kind"], first["role"], first["text"]) == (
        "triage", "agent", "assistant", "Hello, how can I help?")
    assert (caller["speaker"], caller["kind"], caller["role"]) == ("user-1", "standard", "user")
    assert first["at"] == "2024-05-01T10:00:01Z" and first["created_at"] == at(1).timestamp()
    assert (handoff["from_agent"], handoff["to_agent"], handoff["reason"]) == ("triage", "billing",
                                                                                "billing question")
    assert turns[6]["name"] == "refund" and turns[6]["arguments"] == '{"charge": "ch_2"}'
    assert turns[7]["output"] == '{"refunded": true}' and turns[7]["is_error"] is False
    assert [t["seq"] for t in turns] == sorted(t["seq"] for t in turns)
    assert {p["identity"]: p["kind"] for p in line["participants"]} == {
        "user-1": "standard", "triage": "agent", "billing": "agent"}

    ok(pg_settings, ["export", room, "--bare", "--out", str(tmp_path / "bare.jsonl")])
    [line] = lines_of(tmp_path / "bare.jsonl")
    assert list(line) == ["messages"] and line["messages"] == json.loads(json.dumps(expected))


def test_agent_to_agent_room_exports_both_sides(settings: Settings, tmp_path: Path) -> None:
    room = unique("a2a")
    seed(settings, room, agent_to_agent(room))
    summary = json_of(ok(settings, ["export", room, "--out", str(tmp_path / "a2a.jsonl"), "--json"]))
    assert summary["conversations"] == 2 and summary["agent_to_agent_rooms"] == 1
    sides = {line["perspective"]: line for line in lines_of(tmp_path / "a2a.jsonl")}
    assert set(sides) == {"support", "customer"}
    said = ["Hello, I am Faizan speaking from Jodo.", "Yes, this is Yash speaking.",
            "How can I help with your fee payment?", "My autopay failed twice."]
    support, customer = sides["support"], sides["customer"]
    assert support["conversation"] == f"{room}#support" and support["agent_to_agent"] is True
    # Each line said once (the other's hearing of it left out), from each side's point of view.
    assert [(m["role"], m["content"]) for m in customer["messages"]] == [
        ("user", said[0]), ("assistant", said[1]), ("user", said[2]), ("assistant", said[3])]
    assert [(m["role"], m.get("content")) for m in support["messages"]] == [
        ("assistant", said[0]), ("user", said[1]), ("assistant", said[2]), ("user", said[3]),
        ("assistant", None), ("tool", "two failures")]
    assert [t["speaker"] for t in support["turns"] if t["type"] == "message"] == [
        "support", "customer", "support", "customer"]
    assert {t["kind"] for t in support["turns"] if "kind" in t} == {"agent"}

    ok(settings, ["export", room, "--livekit", "--out", str(tmp_path / "a2a-lk.jsonl")])
    for line in lines_of(tmp_path / "a2a-lk.jsonl"):
        ctx = ChatContext.from_dict(line)
        mine = [i for i in ctx.items if i.type == "message" and i.role == "assistant"]
        assert {i.extra["speaker"] for i in mine} == {line["perspective"]}


def test_rooms_by_prefix_and_time_range(settings: Settings, tmp_path: Path) -> None:
    prefix = unique("batch") + "-"
    for n in range(3):
        seed(settings, f"{prefix}{n}", demo_like(f"{prefix}{n}"))
    # A room with no conversation at all (presence only) is counted, not written.
    seed(settings, f"{prefix}quiet", [ev.make_event(f"{prefix}quiet", ev.ParticipantJoined(identity="x"),
                                                    sender=USER)])
    seed(settings, unique("other"), demo_like("other"))
    out = tmp_path / "batch.jsonl"
    summary = json_of(ok(settings, ["export", "--prefix", prefix, "--out", str(out), "--json"]))
    assert summary["rooms"] == 4 and summary["rooms_exported"] == 3
    assert summary["rooms_without_conversation"] == 1 and summary["conversations"] == 3
    assert summary["turns"] == 3 * 9 and summary["failed"] == {}
    assert sorted(line["room"] for line in lines_of(out)) == [f"{prefix}{n}" for n in range(3)]
    assert not (tmp_path / "batch.jsonl.partial").exists()

    # The time range selects by the log's own times: every room here was written just now.
    summary = json_of(ok(settings, ["export", "--prefix", prefix, "--since", "10m", "--out", str(out), "--json"]))
    assert summary["rooms"] == 4
    summary = json_of(ok(settings, ["export", "--prefix", prefix, "--until", "10m", "--out", str(out), "--json"]))
    assert summary["rooms"] == 0 and out.read_text() == ""

    # To stdout without --out: the JSON Lines themselves.
    result = ok(settings, ["export", f"{prefix}1"])
    assert [json.loads(line)["room"] for line in result.stdout.splitlines()] == [f"{prefix}1"]


def test_errors_name_the_fix(settings: Settings, tmp_path: Path) -> None:
    result = invoke(settings, ["export", unique("missing")])
    assert result.exit_code == 1 and "no events for room" in result.output
    result = invoke(settings, ["export", "--json"])
    assert result.exit_code == 1 and "--out FILE" in result.output
    result = invoke(settings, ["export", "r", "--prefix", "x"])
    assert result.exit_code == 1 and "not both" in result.output


def test_the_demo_room_exports_what_hydration_holds(pg_settings: Settings, tmp_path: Path) -> None:
    """`ledger demo --keep` (three agents, the caller, a handoff to billing in another process), then export."""
    summary = json_of(ok(pg_settings, ["demo", "--keep", "--json"], LIVEKIT_URL=""))
    room = summary["room"]
    try:
        ctx = run_async(_hydrated_ctx(pg_settings, room))
        assert len(ctx.items) >= 6
        ok(pg_settings, ["export", room, "--livekit", "--out", str(tmp_path / "demo.jsonl")])
        [line] = lines_of(tmp_path / "demo.jsonl")
        assert ChatContext.from_dict(line).to_dict(exclude_timestamp=False) == ctx.to_dict(exclude_timestamp=False)
        speakers = {(t.get("speaker"), t.get("kind")) for t in line["turns"] if t["type"] == "message"}
        assert ("triage", "agent") in speakers and ("billing", "agent") in speakers
        assert [(t["from_agent"], t["to_agent"]) for t in line["turns"] if t["type"] == "handoff"] == [
            ("triage", "billing")]
        ok(pg_settings, ["export", room, "--out", str(tmp_path / "demo-openai.jsonl")])
        [line] = lines_of(tmp_path / "demo-openai.jsonl")
        expected, _ = ctx.to_provider_format("openai", inject_dummy_user_message=False)
        assert line["messages"] == json.loads(json.dumps(expected))
    finally:
        ok(pg_settings, ["purge", room, "--yes"])
