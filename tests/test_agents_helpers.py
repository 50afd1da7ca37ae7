"""Agent helpers without WebRTC: protocol JSON, merge-patch diffs of userdata, handoff metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from room_ledger import events as ev
from room_ledger.agents import (
    encode_protocol,
    handoff_from_metadata,
    merge_patch_diff,
    protocol_event_id,
    session_diff,
    userdata_document,
)
from room_ledger.bridge.ingest import Ingest
from room_ledger.state import apply_session_patch, fold, json_pointer, merge_patch, pointer_keys, set_at


@pytest.mark.parametrize(("type_name", "body"), [
    ("agent.status", ev.AgentStatus(agent_id="a", status="processing", action_lock=True, task="t")),
    ("floor.request", {"agent_id": "a", "task": "refund"}),
    ("floor.release", ev.FloorRelease(agent_id="a")),
    ("handoff", ev.Handoff(from_agent="a", to_agent="b", reason="billing")),
    ("session.patch", ev.SessionPatch(patch={"caller": {"verified": True}, "x": None})),
    ("context.summary", ev.ContextSummary(text="so far", covers_seq=41)),
])
def test_protocol_json_is_what_the_bridge_types(type_name: str, body: Any) -> None:
    pid, data = encode_protocol(type_name, body)
    out: list[ev.KnownEvent] = []
    Ingest("r", out.append).data_packet(data, topic="ledger", sender_identity="a")
    (event,) = out
    assert event.type == type_name and event.id == protocol_event_id("r", pid)
    expected = body if isinstance(body, ev.Body) else ev.body_from_dict(type_name, body)
    assert event.body == expected


def test_agents_cannot_publish_bridge_types() -> None:
    with pytest.raises(ValueError, match="not a type agents publish"):
        encode_protocol("participant.joined", {"identity": "x"})


@dataclass
class CallData:
    caller: str = ""
    verified: bool = False
    account: dict[str, Any] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)
    api_client: Any = None  # a runtime object: never published
    _private: int = 0

    def lookup(self) -> None: ...


def test_userdata_diff_publishes_only_changes_and_round_trips() -> None:
    data = CallData(caller="Ana", account={"id": 7, "tier": "gold"}, api_client=object())
    published: dict[str, Any] = {}
    first = merge_patch_diff(published, userdata_document(data))
    assert first == {"caller": "Ana", "verified": False, "account": {"id": 7, "tier": "gold"}, "steps": []}
    published = merge_patch(published, first)
    data.verified = True
    data.account["tier"] = "platinum"
    data.steps.append("identified")
    second = merge_patch_diff(published, userdata_document(data))
    assert second == {"verified": True, "account": {"tier": "platinum"}, "steps": ["identified"]}
    published = merge_patch(published, second)
    assert merge_patch_diff(published, userdata_document(data)) == {}
    assert msgspec.convert(published, CallData) == CallData(caller="Ana", verified=True,
                                                             account={"id": 7, "tier": "platinum"},
                                                             steps=["identified"])
    del data.account["id"]
    assert merge_patch_diff(published, userdata_document(data)) == {"account": {"id": None}}


def test_handoff_metadata_carries_room_and_sequence_only() -> None:
    request = handoff_from_metadata('{"room": "r", "ledger_seq": 12}')
    assert request is not None and (request.room, request.ledger_seq) == ("r", 12)
    for bad in ("", "nope", '{"room": 1, "ledger_seq": 2}', '{"room": "r"}', "[]"):
        assert handoff_from_metadata(bad) is None


def test_transfer_tool_is_a_function_tool_the_llm_sees() -> None:
    from livekit.agents import Agent
    from livekit.agents.llm import FunctionTool

    from room_ledger.handoff import transfer_tool

    tool = transfer_tool(agents=["billing", "sales"])
    assert isinstance(tool, FunctionTool) and tool.info.name == "transfer_to"
    assert "billing, sales" in (tool.info.description or "")
    agent = Agent(instructions="x", tools=[tool])
    assert [t.info.name for t in agent.tools] == ["transfer_to"]  # type: ignore[union-attr]



# --- userdata across a handoff: null is a value (issue: "Handoff and conversation correctness") ---


@dataclass
class Order:
    promo_code: str | None = "WELCOME10"
    note: str | None = None
    quantity: int = 1
    address: dict[str, Any] | None = field(default_factory=lambda: {"line1": "", "line2": None})
    tags: list[Any] = field(default_factory=list)


def _fold_patches(*bodies: ev.SessionPatch) -> dict[str, Any]:
    """The session the fold computes from these patches, each sent over the wire as an agent does."""
    out: list[ev.KnownEvent] = []
    for body in bodies:
        _, data = encode_protocol("session.patch", body)
        Ingest("r", out.append).data_packet(data, topic="ledger", sender_identity="a")
    return fold(_records(out)).session


@dataclass
class _Rec:
    seq: int
    event: ev.KnownEvent
    time: datetime


def _records(events: list[ev.KnownEvent]) -> list[_Rec]:
    return [_Rec(i + 1, e, datetime.now(UTC)) for i, e in enumerate(events)]


def test_a_field_set_to_none_survives_a_handoff_whatever_its_default() -> None:
    source = Order(quantity=3)
    first = session_diff({}, userdata_document(source))
    source.promo_code = None
    source.address = {"line1": "1 Main St", "line2": None}
    published = apply_session_patch({}, first)
    second = session_diff(published, userdata_document(source))
    assert second == ev.SessionPatch(patch={"address": {"line1": "1 Main St"}}, set_values={"/promo_code": None})
    session = _fold_patches(first, second)
    target = msgspec.convert(session, Order)
    assert target == source
    # The target publishes nothing back at attach: its userdata is what the room has.
    assert session_diff(session, userdata_document(target)) == ev.SessionPatch()


def test_old_merge_patch_events_still_fold_as_before() -> None:
    assert _fold_patches(ev.SessionPatch(patch={"a": 1, "b": {"c": 2}}),
                         ev.SessionPatch(patch={"a": None, "b": {"c": None, "d": 3}})) == {"b": {"d": 3}}


def test_json_pointer_escapes_round_trip() -> None:
    keys = ["a/b", "c~d", "", "e"]
    assert pointer_keys(json_pointer(keys)) == keys
    assert set_at({}, json_pointer(["x", "y"]), None) == {"x": {"y": None}}
    with pytest.raises(ValueError, match="JSON Pointer"):
        pointer_keys("nope")


_json_leaf = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=5) \
    | st.floats(allow_nan=False, allow_infinity=False, width=32)
_json = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(alphabet="ab/~c", max_size=3), inner, max_size=3), max_leaves=12)
_documents = st.dictionaries(st.text(alphabet="pqr/~", min_size=0, max_size=3), _json, max_size=5)


@settings(max_examples=400, deadline=None)
@given(_documents, _documents, _documents)
def test_any_json_document_round_trips_through_session_patches(start: dict[str, Any], middle: dict[str, Any],
                                                               end: dict[str, Any]) -> None:
    """Whatever userdata a source holds, the fold of its published changes is exactly that."""
    one = session_diff({}, start)
    two = session_diff(start, middle)
    three = session_diff(middle, end)
    assert _fold_patches(one) == start
    assert _fold_patches(one, two) == middle
    assert _fold_patches(one, two, three) == end


@dataclass
class Nested:
    label: str | None = "x"
    values: list[int | None] = field(default_factory=lambda: [1, None])


@dataclass
class Profile:
    name: str = "anon"
    nickname: str | None = "buddy"
    score: float | None = 0.5
    flags: dict[str, bool | None] = field(default_factory=lambda: {"vip": None})
    nested: Nested | None = field(default_factory=Nested)
    history: list[dict[str, Any]] = field(default_factory=list)


_profiles = st.builds(
    Profile,
    name=st.text(max_size=4),
    nickname=st.none() | st.text(max_size=4),
    score=st.none() | st.floats(allow_nan=False, allow_infinity=False, width=32),
    flags=st.dictionaries(st.text(max_size=3), st.none() | st.booleans(), max_size=3),
    nested=st.none() | st.builds(Nested, label=st.none() | st.text(max_size=3),
                                 values=st.lists(st.none() | st.integers(-5, 5), max_size=3)),
    history=st.lists(st.dictionaries(st.text(max_size=2), _json_leaf, max_size=2), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(_profiles, _profiles)
def test_any_dataclass_userdata_round_trips_a_handoff_exactly(before: Profile, after: Profile) -> None:
    """The source publishes ``before`` then ``after``; the target's ``session_as`` is ``after``."""
    one = session_diff({}, userdata_document(before))
    two = session_diff(apply_session_patch({}, one), userdata_document(after))
    assert msgspec.convert(_fold_patches(one, two), Profile) == after
