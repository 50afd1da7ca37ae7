"""The fence (issue 23): a write from a superseded ownership epoch changes nothing, is recorded as
rejected, and every reader (one fold, a fold resumed from a stored state, replay) agrees."""

from __future__ import annotations

import io
import json
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from room_ledger import events as ev
from room_ledger.agents import encode_protocol
from room_ledger.bridge.ingest import Ingest
from room_ledger.cli.replay import replay_ndjson
from room_ledger.cli.timeline import TimelinePrinter
from room_ledger.client import Ledger, Record
from room_ledger.errors import LedgerError, Superseded
from room_ledger.ownership import REJECTIONS_KEPT, grant_of
from room_ledger.projections.rows import decode_state, encode_state
from room_ledger.state import RoomState, fold
from room_ledger.timeline import RejectionTracker
from room_ledger.window import Point, Window
from tests.test_reducers import ROOM, rec


def log_of(*items: ev.Body | tuple[ev.Body, str]) -> list[Record]:
    out = []
    for seq, item in enumerate(items, start=1):
        body, sender = item if isinstance(item, tuple) else (item, "")
        out.append(rec(seq, body, sender=sender))
    return out


def claim(agent: str, epoch: int | None = None, task: str | None = None) -> ev.FloorRequest:
    return ev.FloorRequest(agent_id=agent, task=task, epoch=epoch)


def patch(agent: str | None, epoch: int | None, **values: Any) -> ev.SessionPatch:
    return ev.SessionPatch(patch=values, agent_id=agent, epoch=epoch)


def triage_to_billing() -> list[ev.Body]:
    """triage claims (its epoch: 1), patches, hands off to billing (billing's epoch: 3), billing claims."""
    return [
        claim("triage"),                                                # 1: triage's epoch
        patch("triage", 1, caller="Ana"),                               # 2
        ev.Handoff(from_agent="triage", to_agent="billing", reason="bill"),  # 3: billing's epoch
        claim("billing", 3, task="refund"),                             # 4
    ]


def test_a_stale_owners_writes_after_a_handoff_are_rejected_and_recorded() -> None:
    log = log_of(
        *triage_to_billing(),
        patch("triage", 1, caller="Bob", paused=True),                  # 5: the paused owner wakes
        claim("triage", 1, task="greet"),                               # 6
        ev.AgentStatus(agent_id="triage", status="processing", action_lock=True, epoch=1),  # 7
        ev.FloorRelease(agent_id="triage", epoch=1),                    # 8
        ev.AgentStatus(agent_id="triage", status="resolved", epoch=1),  # 9
    )
    state = fold(log)
    before = fold(log[:4])
    # 0 of its writes changed anything: session, floor, participants, ownership as before them
    assert state.session == before.session == {"caller": "Ana"}
    assert state.floor == before.floor and state.floor.holder == "billing" and state.floor.queue == []
    assert state.participants == before.participants
    assert state.ownership.owners == before.ownership.owners
    assert state.session_version == 2
    # each recorded: sequence, agent, kind, epoch and why
    assert [(r.seq, r.agent_id, r.kind, r.epoch) for r in state.ownership.rejected] == [
        (5, "triage", "session.patch", 1), (6, "triage", "floor.request", 1), (7, "triage", "agent.status", 1),
        (8, "triage", "floor.release", 1), (9, "triage", "agent.status", 1)]
    assert all(r.reason == "'triage' handed the call to 'billing' at 3" for r in state.ownership.rejected)
    assert state.index.rejected == 5
    # still counted as events of the room (the log has them)
    assert state.seq == 9 and state.index.counts["session.patch"] == 2


def test_the_successors_writes_apply() -> None:
    log = log_of(
        *triage_to_billing(),
        patch("billing", 3, refund=True),                              # 5
        ev.AgentStatus(agent_id="billing", status="processing", action_lock=True, task="refund", epoch=3),
        ev.FloorRelease(agent_id="billing", epoch=3),                  # 7
    )
    state = fold(log)
    assert state.session == {"caller": "Ana", "refund": True} and state.session_version == 5
    assert state.floor.holder is None and state.floor.history[-1].end_reason == "release"
    assert state.ownership.rejected == [] and state.index.rejected == 0
    assert state.ownership.epoch_of("billing") == 3 and state.ownership.epoch_of("triage") is None
    owner = state.ownership.owners["triage"]
    assert (owner.epoch, owner.superseded_at, owner.successor) == (1, 3, "billing")


def test_writes_without_an_epoch_are_never_rejected() -> None:
    log = log_of(
        *triage_to_billing(),
        patch(None, None, late=1),                                      # 5: no agent, no epoch
        patch("triage", None, later=2),                                 # 6: no epoch
        ev.SessionPatch(patch={"old": 3}, epoch=1),                     # 7: an epoch but no agent id
        claim("triage"),                                                # 8: queues behind billing
        ev.AgentStatus(agent_id="triage", status="idle"),               # 9: withdraws it
    )
    state = fold(log)
    assert state.session == {"caller": "Ana", "late": 1, "later": 2, "old": 3}
    assert state.ownership.rejected == [] and state.index.rejected == 0
    assert [c.agent_id for c in fold(log[:8]).floor.queue] == ["triage"] and state.floor.queue == []


def test_events_stored_before_epochs_decode_and_fold_as_before() -> None:
    old = b'{"type":"floor.request","id":"x","room":"r","body":{"agent_id":"a","task":"t"}}'
    event = ev.decode(old)
    assert isinstance(event, ev.FloorRequestEvent) and event.body.epoch is None
    # and a body without an epoch encodes exactly as before (the default is left out)
    assert b"epoch" not in ev.encode(ev.make_event(ROOM, ev.FloorRequest(agent_id="a")))
    patch_event = ev.decode(b'{"type":"session.patch","id":"y","room":"r","body":{"patch":{"k":1}}}')
    assert isinstance(patch_event, ev.SessionPatchEvent)
    assert (patch_event.body.agent_id, patch_event.body.epoch) == (None, None)


def test_the_epoch_an_agent_sends_is_typed_by_the_bridge() -> None:
    out: list[ev.KnownEvent] = []
    ingest = Ingest("r", out.append)
    for type_name, body in (("session.patch", patch("a", 7, x=1)), ("floor.request", claim("a", 7)),
                            ("floor.release", ev.FloorRelease(agent_id="a", epoch=7)),
                            ("agent.status", ev.AgentStatus(agent_id="a", status="idle", epoch=7))):
        _, data = encode_protocol(type_name, body)
        ingest.data_packet(data, topic="ledger", sender_identity="a")
    assert [e.body.epoch for e in out] == [7, 7, 7, 7]  # type: ignore[union-attr]
    # the seed shape is another protocol's, which has no epoch: never fenced (the key is kept as sent)
    ingest.data_packet(b'{"agent_id":"a","status":"processing","action_lock":true,"epoch":7}', topic="x",
                       sender_identity="a")
    assert isinstance(out[-1], ev.AgentStatusEvent) and out[-1].body.epoch is None
    assert ev.extra_fields(out[-1]) == {"epoch": 7}


def test_agents_sharing_a_room_never_fence_one_another() -> None:
    """Round-robin: three agents claim, release and claim again, each with the epoch of its first
    claim; a handoff from one of them fences only that one."""
    log = log_of(
        claim("a"), claim("b"), claim("c"),                             # 1-3: epochs 1, 2, 3
        ev.FloorRelease(agent_id="a", epoch=1), claim("a", 1),          # 4-5: a passes the floor on, queues
        ev.FloorRelease(agent_id="b", epoch=2), claim("b", 2),          # 6-7
        patch("c", 3, c=1), patch("a", 1, a=1),                         # 8-9
        ev.FloorRelease(agent_id="c", epoch=3),                         # 10: a takes the floor
        ev.Handoff(from_agent="a", to_agent="d"),                       # 11: a hands its call to d
        patch("b", 2, b=1), patch("a", 1, a=2), claim("d", 11),         # 12-14
    )
    state = fold(log)
    assert [(r.seq, r.agent_id) for r in state.ownership.rejected] == [(13, "a")]
    assert state.session == {"a": 1, "b": 1, "c": 1}
    assert {agent: state.ownership.epoch_of(agent) for agent in "abcd"} == {"a": None, "b": 2, "c": 3, "d": 11}
    # later claims of an agent with an epoch grant nothing (its own writes must not fence themselves)
    assert [o.epoch for o in fold(log[:10]).ownership.owners.values()] == [1, 2, 3]


def test_handed_back_the_old_process_is_fenced_the_new_one_is_not() -> None:
    """triage -> billing -> a new triage job (seed 004's bidirectional handoffs): the first triage
    process, paused all along, and billing once it handed back, are both fenced."""
    log = log_of(
        *triage_to_billing(),
        ev.Handoff(from_agent="billing", to_agent="triage", reason="back"),  # 5: the new triage's epoch
        claim("triage", 5),                                             # 6: the new triage process
        patch("triage", 1, stale=True),                                 # 7: the first triage process
        patch("billing", 3, stale=True),                                # 8
        patch("triage", 5, fresh=True),                                 # 9
    )
    state = fold(log)
    assert state.session == {"caller": "Ana", "fresh": True} and state.floor.holder == "triage"
    rejected = {r.seq: r.reason for r in state.ownership.rejected}
    assert rejected == {7: "epoch 1 of 'triage' superseded by its epoch 5 (handoff)",
                        8: "'billing' handed the call to 'triage' at 5"}


def test_a_failed_handoffs_record_gives_the_call_back_and_fences_a_late_target() -> None:
    failed = ev.Handoff(from_agent="billing", to_agent="triage", reason=f"{ev.FAILED_HANDOFF_PREFIX}no worker",
                        min_seq=3)
    log = log_of(
        claim("triage"),                                                # 1
        ev.Handoff(from_agent="triage", to_agent="billing"),            # 2: passes the floor
        patch("triage", 1, during=True),                                # 3: the source, superseded meanwhile
        failed,                                                         # 4: triage's new epoch
        claim("triage", 4),                                             # 5
        patch("billing", 2, late=True),                                 # 6: the target started late
        claim("billing", 2),                                            # 7
    )
    state = fold(log)
    assert state.floor.holder == "triage" and state.floor.queue == []
    assert state.ownership.epoch_of("triage") == 4 and state.ownership.owners["triage"].granted_by == "handoff failed"
    assert [(r.seq, r.agent_id) for r in state.ownership.rejected] == [(3, "triage"), (6, "billing"), (7, "billing")]
    assert state.session == {}


def test_a_failed_handoffs_record_takes_nothing_from_a_target_that_passed_the_call_on() -> None:
    log = log_of(
        claim("triage"),                                                # 1
        ev.Handoff(from_agent="triage", to_agent="billing"),            # 2
        claim("billing", 2),                                            # 3
        ev.Handoff(from_agent="billing", to_agent="sales"),             # 4
        ev.Handoff(from_agent="billing", to_agent="triage", reason=f"{ev.FAILED_HANDOFF_PREFIX}late", min_seq=2),
    )
    state = fold(log)
    assert state.ownership.epoch_of("sales") == 4 and state.ownership.epoch_of("triage") is None
    assert grant_of(state.ownership, state.floor.holder, log[-1].event) is None


def test_a_handoff_that_does_not_pass_the_floor_grants_nothing() -> None:
    """Two handoffs of one caller race (log order decides): the second passes no floor and no call."""
    log = log_of(claim("triage"), ev.Handoff(from_agent="triage", to_agent="billing"),
                 ev.Handoff(from_agent="triage", to_agent="sales"), patch("billing", 2, ok=1))
    state = fold(log)
    assert "sales" not in state.ownership.owners and state.ownership.epoch_of("billing") == 2
    assert state.session == {"ok": 1}


def test_rejections_kept_are_bounded_and_all_are_counted() -> None:
    stale = [patch("triage", 1, n=n) for n in range(REJECTIONS_KEPT + 10)]
    state = fold(log_of(*triage_to_billing(), *stale))
    assert len(state.ownership.rejected) == REJECTIONS_KEPT and state.index.rejected == REJECTIONS_KEPT + 10
    assert state.ownership.rejected[-1].seq == 4 + REJECTIONS_KEPT + 10


def test_superseded_is_a_ledger_error_that_says_what_to_do() -> None:
    error = Superseded("triage", 12, "'triage' handed the call to 'billing' at 40", "support-42")
    assert isinstance(error, LedgerError)
    text = str(error)
    assert "epoch 12" in text and "billing" in text and "support-42" in text and "shut this session down" in text


# --- the fold is resumable with rejections --------------------------------------------------------

AGENTS = ["a", "b", "c"]
agent = st.sampled_from(AGENTS)
epoch = st.none() | st.integers(1, 12)
bodies = st.one_of(
    st.builds(ev.FloorRequest, agent_id=agent, epoch=epoch),
    st.builds(ev.FloorRelease, agent_id=agent, epoch=epoch),
    st.builds(ev.AgentStatus, agent_id=agent, status=st.sampled_from(["processing", "idle", "resolved"]),
              action_lock=st.none() | st.booleans(), epoch=epoch),
    st.builds(ev.Handoff, from_agent=agent, to_agent=agent,
              reason=st.none() | st.just(f"{ev.FAILED_HANDOFF_PREFIX}x")),
    st.builds(ev.ParticipantLeft, identity=agent),
    st.builds(ev.SessionPatch, patch=st.dictionaries(st.sampled_from(["x", "y"]), st.integers(0, 3)),
              agent_id=st.none() | agent, epoch=epoch),
)
logs = st.lists(st.tuples(bodies, agent), max_size=30).map(
    lambda items: [rec(i, body, sender=sender) for i, (body, sender) in enumerate(items, start=1)])


@settings(max_examples=300, deadline=None)
@given(logs, st.lists(st.integers(0, 30), max_size=4))
def test_folding_with_rejections_is_the_same_in_one_pass_and_in_any_split(log: list[Record],
                                                                          cuts: list[int]) -> None:
    """The projector folds in batches from a stored state, hydration from a checkpoint: any split
    of the log, through the stored form, gives the state of one pass, rejections included."""
    whole = fold(log)
    state = RoomState()
    start = 0
    for cut in sorted(cuts):
        fold(log[start:cut], state)
        state = decode_state(encode_state(state))
        start = max(start, cut)
    fold(log[start:], state)
    fold(log, state)  # applying records again changes nothing
    assert encode_state(state) == encode_state(whole)
    assert whole.index.rejected >= len(whole.ownership.rejected)
    rejected = {r.seq for r in whole.ownership.rejected}
    # a rejected write is exactly one whose fold changed nothing but the index and the rejections
    for record in log:
        before = fold([r for r in log if r.seq < record.seq])
        after = fold([record], decode_state(encode_state(before)))
        if record.seq in rejected:
            after.index = before.index
            after.ownership.rejected = before.ownership.rejected
            assert msgspec.to_builtins(after) == msgspec.to_builtins(before)


# --- ledger replay marks them ---------------------------------------------------------------------

def stale_write_log() -> list[Record]:
    return log_of(*triage_to_billing(), patch("triage", 1, caller="Bob"), patch("billing", 3, ok=True))


def test_the_timeline_marks_a_rejected_write_and_says_why() -> None:
    out = io.StringIO()
    printer = TimelinePrinter(Console(file=out, width=220, color_system=None))
    tracker = RejectionTracker()
    for record in stale_write_log():
        printer.print(record, tracker.feed(record))
    lines = out.getvalue().splitlines()[1:]  # after the date line
    marked = [line for line in lines if "REJECTED" in line]
    assert len(marked) == 1 and " 5 " in marked[0] and "session.patch" in marked[0]
    assert "REJECTED ('triage' handed the call to 'billing' at 3)" in marked[0]
    assert printer.rejected == 1


async def test_replay_json_carries_the_rejection_whatever_the_window(ledger: Ledger, room: str) -> None:
    async def append(body: ev.Body) -> int:
        position = await ledger.append(ev.make_event(room, body, sender=ev.Sender(identity="agent", kind="agent")))
        return position.seq

    # triage_to_billing(), at the stream's own sequences
    triage = await append(claim("triage"))
    await append(patch("triage", triage, caller="Ana"))
    handoff = await append(ev.Handoff(from_agent="triage", to_agent="billing", reason="bill"))
    await append(claim("billing", handoff))
    stale = await append(patch("triage", triage, caller="Bob"))
    await append(patch("billing", handoff, ok=True))

    async def lines(window: Window) -> list[dict[str, Any]]:
        out = io.BytesIO()
        await replay_ndjson(ledger, room, window, out=out)
        return [json.loads(line) for line in out.getvalue().splitlines()]

    # the whole room, from its start, and a part of it (the fence's inputs read first)
    for window in (Window(), Window(since=Point(seq=stale)), Window(types=("session.patch",)),
                   Window(senders=("agent",))):
        shown = await lines(window)
        rejected = [line for line in shown if "rejected" in line]
        assert [line["seq"] for line in rejected] == [stale], window
        assert rejected[0]["rejected"] == {"agent_id": "triage", "epoch": triage,
                                           "reason": f"'triage' handed the call to 'billing' at {handoff}"}
        assert rejected[0]["type"] == "session.patch" and rejected[0]["body"]["epoch"] == triage
    # and every reader's fold agrees
    state = fold([r async for r in ledger.read(room)])
    assert [r.seq for r in state.ownership.rejected] == [stale] and state.session == {"caller": "Ana", "ok": True}
