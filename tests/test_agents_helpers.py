"""Agent helpers without WebRTC: protocol JSON, merge-patch diffs of userdata, handoff metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest

from bridge.ingest import Ingest
from ledger import events as ev
from ledger.agents import (
    encode_protocol,
    handoff_from_metadata,
    merge_patch_diff,
    protocol_event_id,
    userdata_document,
)
from ledger.state import merge_patch


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

    from ledger.handoff import transfer_tool

    tool = transfer_tool(agents=["billing", "sales"])
    assert isinstance(tool, FunctionTool) and tool.info.name == "transfer_to"
    assert "billing, sales" in (tool.info.description or "")
    agent = Agent(instructions="x", tools=[tool])
    assert [t.info.name for t in agent.tools] == ["transfer_to"]  # type: ignore[union-attr]

