"""Ingest: room observations -> events, without WebRTC or NATS (a list is the sink)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from room_ledger import events as ev
from room_ledger.agents import protocol_event_id
from room_ledger.bridge.ingest import MAX_INLINE_BYTES, Ingest, ParticipantObservation

SEED = {"agent_id": "triage", "status": "processing", "action_lock": True}


def make(room: str = "r1", bridge_id: str = "b1") -> tuple[Ingest, list[ev.KnownEvent]]:
    out: list[ev.KnownEvent] = []
    return Ingest(room, out.append, bridge_id=bridge_id), out


def only(out: list[ev.KnownEvent]) -> ev.KnownEvent:
    assert len(out) == 1, [e.type for e in out]
    return out[0]


@pytest.mark.parametrize("topic", ["", "state", "ledger", "lk.anything"])
def test_seed_shape_on_any_topic_is_agent_status(topic: str) -> None:
    ingest, out = make()
    ingest.participant_joined("triage", kind="agent", sid="PA_1")
    out.clear()
    ingest.data_packet(json.dumps({**SEED, "task": "refund"}).encode(), topic=topic, sender_identity="triage")
    event = only(out)
    assert isinstance(event, ev.AgentStatusEvent)
    assert event.body == ev.AgentStatus(agent_id="triage", status="processing", action_lock=True, task="refund")
    assert event.sender == ev.Sender("triage", "agent")
    assert ingest.counters.typed == 2 and ingest.counters.rejected == 0


def test_seed_shape_with_wrong_values_is_data_with_reason() -> None:
    ingest, out = make()
    ingest.data_packet(json.dumps({**SEED, "status": "busy"}).encode(), topic="state", sender_identity="x")
    event = only(out)
    assert isinstance(event, ev.DataEvent)
    assert event.body.reason.startswith("agent status:") and "status" in event.body.reason
    assert event.body.json == {**SEED, "status": "busy"}
    assert ingest.counters.rejected == 1


@pytest.mark.parametrize("payload", [
    {"type": "floor.request", "id": "p1", "agent_id": "a", "task": "t"},
    {"type": "floor.request", "id": "p1", "body": {"agent_id": "a", "task": "t"}},
])
def test_ledger_protocol_flat_or_body_with_payload_id(payload: dict[str, Any]) -> None:
    ingest, out = make()
    ingest.data_packet(json.dumps(payload).encode(), topic="ledger", sender_identity="a")
    event = only(out)
    assert isinstance(event, ev.FloorRequestEvent)
    assert event.body == ev.FloorRequest(agent_id="a", task="t")
    assert event.id == protocol_event_id("r1", "p1")


@pytest.mark.parametrize(("payload", "reason"), [
    (b"\xff\xfe\x00", "invalid utf-8"),
    (b"{not json", "invalid json"),
    (b"[1, 2]", "ledger topic: not a JSON object"),
    (b'{"id": "x"}', "ledger protocol: missing or non-string 'type'"),
    (b'{"type": "participant.joined", "identity": "spoof"}', "ledger protocol: type 'participant.joined' is not one"),
    (b'{"type": "floor.request", "agent_id": 5}', "ledger protocol: Expected `str`"),
    (b'{"type": "nope"}', "ledger protocol: type 'nope'"),
    (b'{"type": "floor.request", "id": 7, "agent_id": "a"}', "ledger protocol: 'id' must be"),
    (b"[" * 200 + b"]" * 200, "json nested"),
    (b"[" * 200_000 + b"]" * 200_000, "json nested"),
])
def test_bad_ledger_payloads_become_data_with_a_reason(payload: bytes, reason: str) -> None:
    ingest, out = make()
    ingest.data_packet(payload, topic="ledger", sender_identity="a")
    event = only(out)
    assert isinstance(event, ev.DataEvent), event
    assert event.body.reason.startswith(reason) or reason in event.body.reason, event.body.reason
    assert event.body.size == len(payload)
    assert len(ev.encode(event)) < 1024 * 1024
    assert ingest.counters.rejected == 1


def test_ordinary_packets_are_data_without_reason() -> None:
    ingest, out = make()
    ingest.data_packet(b"hello", topic="chat-ish", sender_identity="u")
    ingest.data_packet(b'{"x": [1, {"y": null}]}', topic="app")
    ingest.data_packet(bytes(range(256)), topic="bin")
    texts = [e.body for e in out if isinstance(e, ev.DataEvent)]
    assert [b.reason for b in texts] == ["", "", "invalid utf-8"]
    assert texts[0].text == "hello" and texts[1].json == {"x": [1, {"y": None}]}
    assert base64.b64decode(texts[2].payload_b64 or "") == bytes(range(256))
    assert out[1].sender == ev.UNKNOWN_SENDER  # a hidden sender's packet has no participant


def test_participants_snapshot_attributes_and_agent_state() -> None:
    ingest, out = make()
    ingest.snapshot([ParticipantObservation("user", kind=0, sid="PA_u", tracks=("TR_mic",)),
                     ParticipantObservation("agent", kind=4, sid="PA_a", attributes={"lk.agent.state": "idle"})],
                    room_metadata='{"tier":"gold"}')
    assert [e.type for e in out] == ["participant.joined", "participant.joined", "room.metadata"]
    assert all(e.body.snapshot for e in out[:2])  # type: ignore[union-attr]
    out.clear()
    ingest.participant_attributes("agent", {"lk.agent.state": "thinking"}, {"lk.agent.state": "thinking"},
                                  old_agent_state="idle")
    assert [e.type for e in out] == ["participant.attributes", "agent.state"]
    assert out[1].body == ev.AgentState(identity="agent", state="thinking", old_state="idle")
    assert out[1].sender == ev.Sender("agent", "agent")
    out.clear()
    ingest.participant_left("user", sid="PA_u", reason="CLIENT_INITIATED")
    assert only(out).body == ev.ParticipantLeft(identity="user", sid="PA_u", reason="CLIENT_INITIATED")


def test_two_bridges_derive_the_same_ids_where_the_source_gives_one() -> None:
    a, out_a = make(bridge_id="bridge-a")
    b, out_b = make(bridge_id="bridge-b")
    for ingest in (a, b):
        ingest.snapshot([ParticipantObservation("user", kind=0, sid="PA_u")])
        ingest.participant_joined("late", sid="PA_l")
        ingest.participant_left("late", sid="PA_l")
        ingest.data_packet(b'{"type":"floor.release","id":"x1","agent_id":"a"}', topic="ledger")
        ingest.text_stream("hi", topic="lk.chat", stream_id="ST_1", sender_identity="user")
        ingest.text_stream("yo", topic="lk.transcription", stream_id="ST_2", sender_identity="user",
                           attributes={"lk.transcription_final": "true"})
    assert [e.id for e in out_a] == [e.id for e in out_b]
    # after a reconnect each bridge snapshots again, under ids of its own
    a.snapshot([ParticipantObservation("user", kind=0, sid="PA_u")])
    b.snapshot([ParticipantObservation("user", kind=0, sid="PA_u")])
    assert out_a[-1].id != out_b[-1].id and out_a[-1].id != out_a[0].id


def test_transcripts_finals_only_speaker_from_track_owner() -> None:
    ingest, out = make()
    ingest.participant_joined("user", kind="standard", sid="PA_u", tracks=["TR_mic"])
    ingest.participant_joined("agent", kind="agent", sid="PA_a")
    out.clear()
    # user transcript: interim streams then a separate final stream per segment, published by the agent
    ingest.text_stream("hel", topic="lk.transcription", stream_id="S1", sender_identity="agent",
                       attributes={"lk.segment_id": "SG_1", "lk.transcribed_track_id": "TR_mic",
                                   "lk.transcription_final": "false"})
    ingest.text_stream("hello", topic="lk.transcription", stream_id="S2", sender_identity="agent",
                       attributes={"lk.segment_id": "SG_1", "lk.transcribed_track_id": "TR_mic",
                                   "lk.transcription_final": "true"})
    # agent transcript: one stream, final flag in the trailer (attributes after the end)
    ingest.text_stream("Hi, how can I help?", topic="lk.transcription", stream_id="S3", sender_identity="agent",
                       attributes={"lk.segment_id": "SG_2", "lk.transcribed_track_id": "TR_unknown",
                                   "lk.transcription_final": "true"})
    assert [e.type for e in out] == ["transcript", "transcript"]
    assert out[0].body == ev.Transcript(speaker="user", text="hello", segment_id="SG_1", track_id="TR_mic")
    assert out[1].body.speaker == "agent"  # type: ignore[union-attr]
    assert ingest.counters.skipped == 1


def test_timed_transcript_json_lines_keep_their_text() -> None:
    ingest, out = make()
    text = '{"text": "Hello "}\n{"text": "world", "start_time": 1.0}\n'
    ingest.text_stream(text, topic="lk.transcription", stream_id="S", sender_identity="a",
                       attributes={"lk.transcription_final": "true"})
    assert only(out).body.text == "Hello world"  # type: ignore[union-attr]


def test_chat_ledger_streams_and_other_streams() -> None:
    ingest, out = make()
    ingest.text_stream("hi there", topic="lk.chat", stream_id="ST_c", sender_identity="user", timestamp_ms=1_700_000_000_000)
    big = {"type": "context.summary", "id": "sum-1", "text": "x" * 40_000, "covers_seq": 12}
    ingest.text_stream(json.dumps(big), topic="ledger", stream_id="ST_l", sender_identity="agent")
    ingest.text_stream("whatever", topic="custom", stream_id="ST_o", sender_identity="user", attributes={"k": "v"})
    ingest.byte_stream(b"\xff\x01binary", topic="files", stream_id="ST_b", sender_identity="user", name="f.bin")
    ingest.text_stream("partial", topic="custom", stream_id="ST_e", sender_identity="user", error="aborted")
    chat, summary, other, binary, broken = out
    assert chat.body == ev.ChatMessage(message_id="ST_c", text="hi there", identity="user")
    assert chat.at is not None and chat.at.year == 2023
    assert isinstance(summary.body, ev.ContextSummary) and summary.id == protocol_event_id("r1", "sum-1")
    assert other.body.text == "whatever" and other.body.attributes == {"k": "v"}  # type: ignore[union-attr]
    assert other.body.transport == "text_stream" and other.body.reason == ""  # type: ignore[union-attr]
    assert binary.body.payload_b64 and binary.body.reason == ""  # type: ignore[union-attr]
    assert broken.body.reason.startswith("stream error")  # type: ignore[union-attr]


def test_a_stream_over_the_inline_limit_goes_whole_to_the_spool_with_a_reference() -> None:
    ingest, out = make()
    text = "y" * (MAX_INLINE_BYTES + 10)
    ingest.text_stream(text, topic="ledger", stream_id="big", sender_identity="a")
    event = only(out)
    body = event.body
    assert isinstance(body, ev.Data) and body.reason == "ledger topic: not a JSON object"
    assert body.size == len(text) and body.text is None
    ref = event.payload
    assert ref is not None and ref.size == len(text) and ref.name == ev.payload_object_name("r1", event.id)
    assert ingest.spool.path(ref.name).read_bytes() == text.encode()
    assert ref.sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert len(ev.encode(event)) < 2048
    ingest.spool.discard(ref.name)


def test_huge_attributes_keep_their_body_as_an_object_and_unencodable_text_never_raises() -> None:
    ingest, out = make()
    attributes = {f"k{i}": "v" * 1000 for i in range(1500)}  # 1.5 MB
    ingest.participant_joined("p", attributes=attributes)
    ingest.text_stream("bad \ud800 surrogate", topic="lk.chat", stream_id="s", sender_identity="p")
    ingest.participant_joined("\udcff", kind="agent")
    assert len(out) == 3
    joined = out[0]
    assert isinstance(joined, ev.ParticipantJoinedEvent) and joined.payload is not None
    assert joined.payload.form == "body" and joined.body.attributes == {}
    stored = ingest.spool.path(joined.payload.name).read_bytes()
    rebuilt = ev.with_payload(joined, stored)
    assert isinstance(rebuilt, ev.ParticipantJoinedEvent) and rebuilt.body.attributes == attributes
    ingest.spool.discard(joined.payload.name)
    assert all(isinstance(e, ev.DataEvent) and e.body.reason for e in out[1:]), [e.body for e in out]
    chat = out[1].body
    assert isinstance(chat, ev.Data) and chat.reason == "chat: invalid utf-8"  # the bytes, whole
    assert base64.b64decode(chat.payload_b64 or "") == "bad \ud800 surrogate".encode("utf-8", "surrogatepass")
    for event in out:
        ev.decode(ev.encode(event))  # every one is storable


def _session_bytes() -> tuple[list[bytes], str]:
    return asyncio.run(produce_session_bytes())


async def capture_session_feed(emit: Callable[[Any], None]) -> list[bytes]:
    """What LiveKit Agents' own SessionHost publishes on ``lk.agent.session`` for the events
    ``emit(session)`` makes a real ``AgentSession`` emit."""
    from livekit.agents import AgentSession
    from livekit.agents.voice.remote_session import SessionHost, SessionTransport

    class Capture(SessionTransport):
        def __init__(self) -> None:
            self.out: list[bytes] = []

        async def start(self) -> None: ...

        async def send_message(self, msg: Any) -> None:
            self.out.append(msg.SerializeToString())

        async def close(self) -> None: ...

        def __aiter__(self) -> Any:
            return self

        async def __anext__(self) -> Any:
            await asyncio.Event().wait()

    transport = Capture()
    host = SessionHost(transport)
    session: AgentSession[None] = AgentSession()
    host.register_session(session)
    await host.start()
    emit(session)
    await host.aclose()
    return transport.out


async def produce_session_bytes() -> tuple[list[bytes], str]:
    """Bytes from LiveKit Agents' own SessionHost encoder, fed by a real AgentSession's events."""
    from livekit.agents import llm
    from livekit.agents.voice.events import (
        AgentStateChangedEvent,
        ConversationItemAddedEvent,
        FunctionToolsExecutedEvent,
    )

    message = llm.ChatMessage(role="user", content=["my order is late"])

    def emit(session: Any) -> None:
        session.emit("conversation_item_added", ConversationItemAddedEvent(item=message))
        session.emit("agent_state_changed", AgentStateChangedEvent(old_state="listening", new_state="thinking"))
        session.emit("function_tools_executed", FunctionToolsExecutedEvent(
            function_calls=[llm.FunctionCall(call_id="c1", name="lookup", arguments="{}")],
            function_call_outputs=[llm.FunctionCallOutput(call_id="c1", name="lookup", output="ok", is_error=False)]))

    return await capture_session_feed(emit), message.id


def test_agent_session_feed_from_livekit_agents_encoder() -> None:
    messages, item_id = _session_bytes()
    ingest, out = make()
    for i, raw in enumerate(messages):
        ingest.byte_stream(raw, topic="lk.agent.session", stream_id=f"AS_{i}", sender_identity="agent")
    ingest.byte_stream(b"\xff\xff not protobuf", topic="lk.agent.session", stream_id="AS_x", sender_identity="agent")
    types = [e.type for e in out]
    assert types == ["conversation.item", "agent.state", "conversation.item", "conversation.item", "data"]
    item = out[0].body
    assert isinstance(item, ev.ConversationItem)
    assert (item.item_id, item.role, item.text, item.speaker) == (item_id, "user", "my order is late", None)  # the feed names no user
    assert item.created_at is not None and out[0].at is not None
    assert out[0].id == ev.derived_event_id("r1", "conversation.item", item_id)
    assert out[1].body == ev.AgentState(identity="agent", state="thinking", old_state="listening")
    assert [out[2].body.item_type, out[3].body.item_type] == ["function_call", "function_call_output"]  # type: ignore[union-attr]
    assert out[4].body.reason.startswith("agent session:")  # type: ignore[union-attr]
    # the same feed seen by a second bridge gives the same ids
    other, out2 = make(bridge_id="other")
    for i, raw in enumerate(messages):
        other.byte_stream(raw, topic="lk.agent.session", stream_id=f"AS_{i}", sender_identity="agent")
    assert [e.id for e in out2] == [e.id for e in out[:4]]


def test_events_round_trip_through_the_codec() -> None:
    ingest, out = make()
    ingest.data_packet(json.dumps(SEED).encode(), topic="x", sender_identity="a")
    ingest.bridge_joined("ws://lk")
    for event in out:
        assert msgspec.json.decode(ev.encode(event))["room"] == "r1"
        assert ev.decode(ev.encode(event)) == event


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None)
@given(
    packet=st.dictionaries(
        st.sampled_from(["agent_id", "status", "action_lock", "task", "id", "at", "type", "extra"]),
        st.sampled_from(["a1", "processing", "idle", "resolved", "busy", True, False, None, 1, 1.7e9,
                         "2026-11-22T10:00:00Z", ""]) | _json_values,
    )
)
def test_seed_fast_path_records_what_the_general_path_records(packet: dict[str, Any]) -> None:
    """The one-pass decode of seed packets is an optimisation only: same event, same rejection."""
    raw = json.dumps(packet).encode()
    fast, fast_out = make()
    general, general_out = make()
    general._seed_fast = lambda *args, **kwargs: False  # type: ignore[method-assign]
    for ingest in (fast, general):
        ingest.data_packet(raw, topic="state", sender_identity="a1", sender_kind="agent", at=None)
    (got,), (expected,) = fast_out, general_out
    assert got.type == expected.type and got.body == expected.body and got.at == expected.at
    if got.type == "agent.status" and isinstance(packet.get("id"), str) and packet["id"]:
        assert got.id == expected.id  # the packet's own id makes the event's, on both paths


# --- typed events keep what was sent (issue 13) ---------------------------------------------------


def test_a_seed_packet_with_more_fields_keeps_every_field_as_sent() -> None:
    ingest, out = make()
    raw = (b'{"agent_id":"a","status":"processing","action_lock":true,"intent":"refund",'
           b'"confidence":0.93,"ts":1732860000.5}')
    ingest.data_packet(raw, topic="state", sender_identity="a")
    event = only(out)
    assert isinstance(event, ev.AgentStatusEvent) and event.body.action_lock is True
    stored = ev.decode(ev.encode(event))
    assert isinstance(stored, ev.AgentStatusEvent) and bytes(stored.sent) == raw
    shown = ev.to_builtins(stored)
    assert shown["sent"] == json.loads(raw)
    assert shown["extra"] == {"intent": "refund", "confidence": 0.93, "ts": 1732860000.5}


@pytest.mark.parametrize("raw, lock", [
    (b'{"agent_id":"a","status":"idle"}', None),
    (b'{"agent_id":"a","status":"idle","action_lock":false}', False),
    (b'{"agent_id":"a","status":"processing","action_lock":false,"task":null}', False),
])
def test_agent_status_without_or_with_a_false_lock_is_typed_and_shown_as_sent(raw: bytes, lock: bool | None) -> None:
    for topic in ("state", "ledger"):
        ingest, out = make()
        ingest.data_packet(raw, topic=topic, sender_identity="a")
        event = ev.decode(ev.encode(only(out)))
        assert isinstance(event, ev.AgentStatusEvent) and event.body.action_lock is lock
        assert ev.status_lock(event) is lock
        assert ev.to_builtins(event)["sent"] == json.loads(raw)  # the false and the null are there


def test_keys_of_the_seed_shape_without_a_lock_or_a_valid_status_are_plain_data() -> None:
    ingest, out = make()
    ingest.data_packet(b'{"agent_id":"a","status":"ok"}', topic="app", sender_identity="a")
    event = only(out)
    assert isinstance(event, ev.DataEvent) and event.body.reason == "" and event.body.json == {
        "agent_id": "a", "status": "ok"}


def test_a_protocol_message_keeps_unknown_fields_and_its_own_id() -> None:
    ingest, out = make()
    raw = b'{"type":"floor.request","id":"p-1","agent_id":"a","task":"refund","priority":3}'
    ingest.data_packet(raw, topic="ledger", sender_identity="a")
    event = ev.decode(ev.encode(only(out)))
    assert isinstance(event, ev.FloorRequestEvent) and event.id == protocol_event_id("r1", "p-1")
    assert ev.extra_fields(event) == {"priority": 3, "id": "p-1"}
