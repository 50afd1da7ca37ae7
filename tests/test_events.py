"""The event model: tags, round trips, tolerant decoding, errors with a field path."""

from __future__ import annotations

import msgspec
import pytest

from room_ledger import events as ev
from room_ledger.errors import MalformedEvent


def test_every_type_has_a_permanent_tag() -> None:
    assert set(ev.EVENT_TYPES) == {
        "participant.joined", "participant.left", "participant.attributes", "room.metadata",
        "agent.state", "agent.status", "floor.request", "floor.release", "transcript",
        "chat.message", "conversation.item", "handoff", "session.patch", "context.summary",
        "data", "bridge.joined", "bridge.gap", "bridge.left",
        "dispatch.created", "role.claim", "role.release",
        # a tool call of an AgentSession while it runs (issue 23)
        "tool.execution",
        # livekit-server's own view, from its webhook (issue 17)
        "server.room_started", "server.room_finished", "server.participant_joined", "server.participant_left",
        "server.participant_connection_aborted", "server.track_published", "server.track_unpublished",
        "server.egress_started", "server.egress_updated", "server.egress_ended", "server.ingress_started",
        "server.ingress_ended", "server.webhook",
    }  # fmt: skip


def test_round_trip_keeps_envelope_and_body() -> None:
    event = ev.make_event(
        "room-1",
        ev.AgentStatus(agent_id="billing", status="processing", action_lock=True, task="refund"),
        sender=ev.Sender("billing", "agent"),
    )
    data = ev.encode(event)
    decoded = ev.decode(data)
    assert decoded == event
    assert ev.event_type(decoded) == "agent.status"
    wire = msgspec.json.decode(data)
    assert wire["type"] == "agent.status"
    assert wire["body"]["action_lock"] is True
    assert "seq" not in wire and "subject" not in wire


def test_unknown_type_is_kept_opaque_with_its_bytes() -> None:
    raw = b'{"type":"vote.cast","id":"e1","room":"r","body":{"x":1},"sender":{"identity":"a","kind":"agent"}}'
    event = ev.decode(raw)
    assert isinstance(event, ev.OpaqueEvent)
    assert event.type == "vote.cast"
    assert event.raw == raw
    assert event.sender.identity == "a"
    assert ev.to_builtins(event)["body"] == {"x": 1}


def test_malformed_known_type_names_the_field_path() -> None:
    raw = b'{"type":"agent.status","id":"e1","room":"r","body":{"agent_id":"a","status":"busy"}}'
    with pytest.raises(MalformedEvent, match=r"\$\.body\.status"):
        ev.decode(raw)


def test_not_json_is_malformed() -> None:
    with pytest.raises(MalformedEvent, match="not JSON"):
        ev.decode(b"\xff\x00")


def test_new_fields_from_newer_writers_are_ignored() -> None:
    raw = b'{"type":"floor.release","id":"e","room":"r","future":1,"body":{"agent_id":"a","later":true}}'
    event = ev.decode(raw)
    assert isinstance(event, ev.FloorReleaseEvent)
    assert event.body.agent_id == "a"


def test_derived_ids_are_deterministic_and_unambiguous() -> None:
    assert ev.derived_event_id("stream", "abc") == ev.derived_event_id("stream", "abc")
    assert ev.derived_event_id("ab", "c") != ev.derived_event_id("a", "bc")


def test_body_from_dict_validates() -> None:
    body = ev.body_from_dict("session.patch", {"patch": {"a": 1}})
    assert body == ev.SessionPatch(patch={"a": 1})
    with pytest.raises(MalformedEvent, match="unknown event type"):
        ev.body_from_dict("nope", {})
    with pytest.raises(MalformedEvent, match=r"\$\.agent_id"):
        ev.body_from_dict("floor.request", {"agent_id": 5})


def test_minted_ids_are_unique_and_a_forked_child_mints_its_own() -> None:
    import os

    ids = {ev.new_event_id() for _ in range(10_000)}
    assert len(ids) == 10_000 and all(len(i) == 32 for i in ids)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report one id and leave at once
        os.write(write_end, ev.new_event_id().encode())
        os._exit(0)
    os.close(write_end)
    child_id = os.read(read_end, 64).decode()
    os.waitpid(pid, 0)
    parent_next = ev.new_event_id()
    # Same counter position, yet a different prefix: the child reseeded after the fork.
    assert child_id[:16] != parent_next[:16]
    assert child_id not in ids and child_id != parent_next


def test_events_stored_before_sent_and_payload_existed_still_decode() -> None:
    old = (b'{"type":"agent.status","body":{"agent_id":"a","status":"processing"},"id":"e1","room":"r",'
           b'"observed_at":"2026-11-01T00:00:00Z"}')
    event = ev.decode(old)
    assert isinstance(event, ev.AgentStatusEvent)
    assert event.body.action_lock is None and ev.status_lock(event) is False  # old encoding of false
    assert not event.sent and event.payload is None
    assert "sent" not in ev.to_builtins(event) and b"sent" not in ev.encode(event)


def test_a_payload_reference_round_trips_and_rebuilds_the_body() -> None:
    patch = {"field": "x" * 5000}
    raw = msgspec.json.encode({"type": "session.patch", "id": "p", "patch": patch, "note": 1})
    ref = ev.PayloadRef(name=ev.payload_object_name("r", "e1"), size=len(raw), sha256="00", form="json")
    stub = ev.make_event("r", ev.stub_body(ev.SessionPatch(patch=patch)), id="e1", payload=ref)
    stored = ev.decode(ev.encode(stub))
    assert isinstance(stored, ev.SessionPatchEvent) and stored.body.patch == {} and stored.payload == ref
    full = ev.with_payload(stored, raw)
    assert isinstance(full, ev.SessionPatchEvent) and full.body.patch == patch
    broken = ev.with_payload(stored, b"[1]")
    assert isinstance(broken, ev.OpaqueEvent) and "does not give a session.patch body" in broken.error


def test_a_stub_body_keeps_small_fields() -> None:
    body = ev.Data(topic="files", text="t" * 1000, size=1000, reason="why")
    stub = ev.stub_body(body)
    assert isinstance(stub, ev.Data) and stub.text is None and stub.topic == "files" and stub.reason == "why"
