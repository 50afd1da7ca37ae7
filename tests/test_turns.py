"""Floor-gated replies' policies (ledger.turns): who answers a turn, from its text and the room's state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from room_ledger import events as ev
from room_ledger.client import Record
from room_ledger.state import RoomState, fold
from room_ledger.turns import Addressed, RoundRobin, Router, answerer

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _claims(*agents: str) -> RoomState:
    records = [Record(seq=i, subject="", time=T0 + timedelta(seconds=i),
                      event=ev.make_event("r", ev.FloorRequest(agent_id=a), id=f"e{i}",
                                          sender=ev.Sender(identity=f"id-{a}", kind="agent")))
               for i, a in enumerate(agents, start=1)]
    return fold(records)


def test_round_robin_answers_with_the_floor_holder() -> None:
    state = _claims("sales-1", "billing-1", "support-1")
    assert answerer(RoundRobin(), "billing, what is my balance", state) == "sales-1"
    assert RoundRobin().rotate


def test_addressed_goes_to_the_named_agent_else_the_holder() -> None:
    state = _claims("sales-1", "billing-1", "support-1")
    policy = Addressed()
    assert answerer(policy, "Billing, what is my balance?", state) == "billing-1"
    assert answerer(policy, "support can you help me", state) == "support-1"
    assert answerer(policy, "what is the status", state) == "sales-1"
    assert answerer(policy, "rebilling is not a name", state) == "sales-1"  # whole words only
    assert answerer(policy, "sales or billing, whoever", state) == "sales-1"  # the first named
    assert answerer(Addressed(names={"the money people": "billing-1"}), "ask the money people", state) == "billing-1"


def test_router_decides_and_falls_back_to_the_holder() -> None:
    state = _claims("a", "b")
    policy = Router(lambda text, s: "b" if "refund" in text else None)
    assert answerer(policy, "I want a refund", state) == "b"
    assert answerer(policy, "hello", state) == "a"
    assert answerer(RoundRobin(), "hello", RoomState()) is None  # nobody claimed the floor


def test_the_holder_when_the_caller_began_answers_though_the_floor_moved_since() -> None:
    """Agents end one turn up to seconds apart; the floor may have passed on meanwhile."""
    bodies: list[ev.FloorRequest | ev.FloorRelease] = [ev.FloorRequest(agent_id="a"), ev.FloorRequest(agent_id="b"),
                                                       ev.FloorRelease(agent_id="a"), ev.FloorRequest(agent_id="a")]
    records = [Record(seq=i, subject="", time=T0 + timedelta(seconds=10 * i),
                      event=ev.make_event("r", body, id=f"e{i}", sender=ev.Sender(identity=f"id-{body.agent_id}")))
               for i, body in enumerate(bodies, start=1)]
    state = fold(records)  # a from 10 s, b from 30 s
    assert state.floor.holder == "b"
    assert answerer(RoundRobin(), "hi", state, T0 + timedelta(seconds=25)) == "a"
    assert answerer(RoundRobin(), "hi", state, T0 + timedelta(seconds=31)) == "b"
    assert answerer(RoundRobin(), "hi", state, T0 + timedelta(seconds=5)) is None  # before any claim
    assert answerer(RoundRobin(), "hi", state) == "b"
