"""The pure reducers: floor rule, participants, session, conversation dedupe, index."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from room_ledger import events as ev
from room_ledger.client import Record
from room_ledger.projections.rows import decode_state, encode_state
from room_ledger.state import (
    FLOOR_HISTORY_KEPT,
    RoomState,
    apply,
    fold,
    merge_patch,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)
ROOM = "r"


def rec(seq: int, body: ev.Body, *, sender: str = "", kind: ev.SenderKind = "unknown") -> Record:
    event = ev.make_event(ROOM, body, id=f"e{seq}", sender=ev.Sender(identity=sender, kind=kind),
                          observed_at=T0)
    return Record(seq=seq, subject="", time=T0 + timedelta(seconds=seq), event=event)


def records(*bodies: ev.Body | tuple[ev.Body, str]) -> list[Record]:
    out = []
    for i, item in enumerate(bodies, start=1):
        if isinstance(item, tuple):
            out.append(rec(i, item[0], sender=item[1]))
        else:
            out.append(rec(i, item))
    return out


def status(agent: str, value: ev.AgentStatusValue, lock: bool, task: str | None = None) -> tuple[ev.Body, str]:
    return ev.AgentStatus(agent_id=agent, status=value, action_lock=lock, task=task), agent


def test_seed_000_round_robin_floor() -> None:
    """Three agents on one user take turns with action_lock; every reader gets the same history."""
    log = records(
        ev.ParticipantJoined(identity="user", kind="standard"),
        ev.ParticipantJoined(identity="a", kind="agent"),
        ev.ParticipantJoined(identity="b", kind="agent"),
        ev.ParticipantJoined(identity="c", kind="agent"),
        status("a", "processing", True, "greet"),  # 5: a takes the free floor
        status("b", "processing", True, "lookup"),  # 6: b queues
        status("c", "processing", True, "billing"),  # 7: c queues
        status("b", "processing", True, "lookup"),  # 8: b again: not queued twice
        status("a", "resolved", False),  # 9: a releases; b takes it
        status("b", "idle", False),  # 10: b releases; c takes it
        ev.ParticipantLeft(identity="c"),  # 11: c leaves: floor free
    )
    state = fold(log)
    floor = state.floor
    assert floor.holder is None and floor.queue == []
    assert [(t.holder, t.task, t.start_seq, t.end_seq, t.end_reason) for t in floor.history] == [
        ("a", "greet", 5, 9, "resolved"),
        ("b", "lookup", 9, 10, "unlocked"),
        ("c", "billing", 10, 11, "left"),
    ]
    partial = fold(log[:7])
    assert partial.floor.holder == "a" and [c.agent_id for c in partial.floor.queue] == ["b", "c"]
    assert partial.floor.since_seq == 5 and partial.floor.since_time == T0 + timedelta(seconds=5)
    assert state.participants["a"].status == "resolved" and not state.participants["a"].lock
    assert not state.participants["c"].present and state.participants["user"].present
    assert set(state.agents()) == {"a", "b", "c"}


def test_floor_request_release_and_handoff() -> None:
    log = records(
        ev.FloorRequest(agent_id="a", task="t1"),
        ev.FloorRequest(agent_id="b"),
        ev.FloorRelease(agent_id="b"),  # withdraws b's queued claim
        ev.FloorRequest(agent_id="c"),
        ev.Handoff(from_agent="a", to_agent="c"),  # releases a; c (queued) takes it
        ev.Handoff(from_agent="c", to_agent="c"),  # to itself: nothing
    )
    state = fold(log)
    assert state.floor.holder == "c" and state.floor.since_seq == 5
    assert [t.end_reason for t in state.floor.history] == ["handoff", None]


def test_session_merge_patch_and_version() -> None:
    log = records(
        ev.SessionPatch(patch={"caller": {"name": "Ann", "verified": False}, "step": 1}),
        ev.SessionPatch(patch={"caller": {"verified": True, "name": None}, "step": None, "x": [1]}),
    )
    state = fold(log)
    assert state.session == {"caller": {"verified": True}, "x": [1]}
    assert state.session_version == 2
    assert merge_patch({"a": 1}, {"a": {"b": None, "c": 2}}) == {"a": {"c": 2}}


def test_conversation_feed_is_canonical_and_one_user_feed() -> None:
    def item(item_id: str, role: str, text: str) -> ev.ConversationItem:
        return ev.ConversationItem(item_id=item_id, role=role, text=text)

    log = records(
        ev.ParticipantJoined(identity="user", kind="standard"),
        ev.ParticipantJoined(identity="a", kind="agent"),
        ev.ParticipantJoined(identity="b", kind="agent"),
        (item("a1", "user", "hello"), "a"),
        (item("b1", "user", "hello"), "b"),  # same utterance heard by b: dropped
        (item("a2", "assistant", "hi there"), "a"),
        (ev.Transcript(speaker="a", text="hi there", segment_id="s1", track_id="TA"), "a"),  # a has a feed
        (item("b2", "assistant", "I'm b"), "b"),
        ev.ParticipantLeft(identity="a"),
        (item("b3", "user", "bye"), "b"),  # a left: b's feed now carries user messages
        (ev.ConversationItem(item_id="f1", item_type="function_call", name="lookup", call_id="c1",
                             arguments="{}"), "b"),
        (ev.ConversationItem(item_id="f2", item_type="function_call_output", name="lookup", call_id="c1",
                             output="ok"), "b"),
    )
    state = fold(log)
    assert [(i.item_id, i.role, i.speaker, i.text) for i in state.conversation] == [
        ("a1", "user", "user", "hello"),  # the one person in the room: the feed names no one
        ("a2", "assistant", "a", "hi there"),
        ("b2", "assistant", "b", "I'm b"),
        ("b3", "user", "user", "bye"),
        ("f1", None, None, ""),
        ("f2", None, None, ""),
    ]
    assert state.conversation[4].type == "function_call" and state.conversation[5].output == "ok"


def test_transcripts_one_canonical_transcriber_per_track() -> None:
    log = records(
        ev.ParticipantJoined(identity="user", kind="standard"),
        ev.ParticipantJoined(identity="a", kind="agent"),
        ev.ParticipantJoined(identity="b", kind="agent"),
        ev.ParticipantJoined(identity="c", kind="agent"),
        (ev.Transcript(speaker="user", text="hello", segment_id="sa1", track_id="TU"), "a"),
        (ev.Transcript(speaker="user", text="hello", segment_id="sb1", track_id="TU"), "b"),
        (ev.Transcript(speaker="user", text="hello", segment_id="sc1", track_id="TU"), "c"),
        (ev.Transcript(speaker="b", text="b speaking", segment_id="sb2", track_id="TB"), "b"),
        ev.ParticipantLeft(identity="a"),
        (ev.Transcript(speaker="user", text="again", segment_id="sc2", track_id="TU"), "c"),
        (ev.Transcript(speaker="user", text="again", segment_id="sb3", track_id="TU"), "b"),
        (ev.Transcript(speaker="user", text="partial", segment_id="x", track_id="TU", final=False), "c"),
        (ev.ChatMessage(message_id="m1", text="typed", identity="user"), "user"),
    )
    state = fold(log)
    assert [(i.role, i.speaker, i.text) for i in state.conversation] == [
        ("user", "user", "hello"),
        ("assistant", "b", "b speaking"),
        ("user", "user", "again"),
        ("user", "user", "typed"),
    ]


def test_same_item_id_updates_in_place() -> None:
    log = records(
        (ev.ConversationItem(item_id="i1", role="assistant", text="draft"), "a"),
        (ev.ConversationItem(item_id="i2", role="assistant", text="next"), "a"),
        (ev.ConversationItem(item_id="i1", role="assistant", text="final", interrupted=True), "a"),
    )
    state = fold(log)
    assert [(i.item_id, i.text, i.seq) for i in state.conversation] == [("i1", "final", 1), ("i2", "next", 2)]


def test_unknown_types_counted_and_index() -> None:
    opaque = ev.OpaqueEvent(id="x", room=ROOM, type="future.thing", raw=b"{}")
    log = [
        *records(ev.SessionPatch(patch={"a": 1})),
        Record(seq=7, subject="", time=T0, event=opaque),
        rec(9, ev.BridgeGap(bridge_id="br", started_at=T0, ended_at=T0, reason="reconnect")),
        rec(10, ev.ContextSummary(text="so far", covers_seq=7)),
    ]
    state = fold(log)
    assert state.skipped_unknown == 1
    assert state.index.first_seq == 1 and state.index.last_seq == 10 and state.index.events == 4
    assert state.index.counts == {"session.patch": 1, "future.thing": 1, "bridge.gap": 1, "context.summary": 1}
    assert [g.seq for g in state.index.gaps] == [9]
    assert state.summary is not None and state.summary.covers_seq == 7 and state.summary.seq == 10


# --- properties -----------------------------------------------------------------------------

AGENTS = ["a", "b", "c"]
agent = st.sampled_from(AGENTS)
bodies = st.one_of(
    st.builds(ev.FloorRequest, agent_id=agent, task=st.none() | st.sampled_from(["t1", "t2"])),
    st.builds(ev.FloorRelease, agent_id=agent),
    st.builds(ev.AgentStatus, agent_id=agent, status=st.sampled_from(["processing", "idle", "resolved"]),
              action_lock=st.booleans()),
    st.builds(ev.Handoff, from_agent=agent, to_agent=agent),
    st.builds(ev.ParticipantJoined, identity=agent, kind=st.just("agent")),
    st.builds(ev.ParticipantLeft, identity=agent),
    st.builds(ev.SessionPatch, patch=st.dictionaries(st.sampled_from(["x", "y", "z"]),
                                                     st.none() | st.integers(0, 3) | st.just({"k": 1}))),
    st.builds(ev.ConversationItem, item_id=st.sampled_from(["i1", "i2", "i3", "i4"]),
              role=st.sampled_from(["user", "assistant"]), text=st.text(max_size=5)),
    st.builds(ev.Transcript, speaker=st.sampled_from(["user", "a"]), text=st.text(max_size=5),
              segment_id=st.sampled_from(["s1", "s2", "s3"]), track_id=st.sampled_from(["TU", "TA"])),
)
logs = st.lists(st.tuples(bodies, agent), max_size=40).map(
    lambda items: [rec(i, body, sender=sender) for i, (body, sender) in enumerate(items, start=1)]
)


@settings(max_examples=200, deadline=None)
@given(logs, st.integers(0, 40))
def test_fold_is_resumable_and_idempotent(log: list[Record], cut: int) -> None:
    whole = fold(log)
    # Resume from a stored state (conversation kept apart, as in Postgres).
    head = fold(log[:cut])
    items = list(head.conversation)
    resumed = decode_state(encode_state(head))
    resumed.conversation = items
    fold(log[cut:], resumed)
    # Applying records again changes nothing.
    fold(log, resumed)
    assert encode_state(resumed) == encode_state(whole)
    assert resumed.conversation == whole.conversation
    # Floor invariants.
    floor = whole.floor
    assert floor.holder not in [c.agent_id for c in floor.queue]
    assert len({c.agent_id for c in floor.queue}) == len(floor.queue)
    assert sum(1 for t in floor.history if t.end_seq is None) == (1 if floor.holder else 0)


def test_apply_function_and_method_agree() -> None:
    log = records(ev.FloorRequest(agent_id="a"))
    s1, s2 = RoomState(), RoomState()
    apply(s1, log[0])
    s2.apply(log[0])
    assert s1 == s2 and s1.room == ROOM and s1.seq == 1


def test_floor_history_in_the_state_is_bounded() -> None:
    """The room row is read on every hydration: its floor history keeps the latest tenures only."""
    now = datetime.now(UTC)
    records: list[Record] = []
    for i in range(FLOOR_HISTORY_KEPT + 50):
        agent = f"agent-{i % 3}"
        for body in (ev.FloorRequest(agent_id=agent), ev.FloorRelease(agent_id=agent)):
            records.append(Record(seq=len(records) + 1, subject="s", time=now, event=ev.make_event("r", body)))
    state = fold(records)
    assert len(state.floor.history) == FLOOR_HISTORY_KEPT
    assert state.floor.tenures == FLOOR_HISTORY_KEPT + 50
    assert state.floor.history[-1].start_seq == records[-2].seq


def _sent_status(seq: int, raw: bytes) -> Record:
    """An agent.status as the bridge stores it from a packet: with the packet as sent."""
    obj = msgspec.json.decode(raw)
    body = ev.body_from_dict("agent.status", {k: v for k, v in obj.items() if k in ("agent_id", "status",
                                                                                      "action_lock", "task")})
    event = ev.make_event(ROOM, body, id=f"e{seq}", sender=ev.Sender(identity=obj["agent_id"], kind="agent"),
                          observed_at=T0, sent=msgspec.Raw(raw))
    return Record(seq=seq, subject="", time=T0 + timedelta(seconds=seq), event=event)


def test_an_absent_action_lock_is_not_false() -> None:
    state = fold([
        _sent_status(1, b'{"agent_id":"a","status":"processing","action_lock":true}'),
        _sent_status(2, b'{"agent_id":"b","status":"processing","action_lock":true}'),
        # processing without a lock: neither the holder's lock nor the floor changes
        _sent_status(3, b'{"agent_id":"a","status":"processing","intent":"refund"}'),
    ])
    assert state.floor.holder == "a" and [c.agent_id for c in state.floor.queue] == ["b"]
    assert state.participants["a"].lock is True
    assert state.participants["a"].status_extra == {"intent": "refund"}
    # idle without a lock: the agent is not acting, so it releases; the queue moves on
    state.apply(_sent_status(4, b'{"agent_id":"a","status":"idle"}'))
    assert state.floor.holder == "b" and state.participants["a"].lock is False
    assert state.floor.history[0].end_reason == "idle"
    # an explicit false still releases, as before
    state.apply(_sent_status(5, b'{"agent_id":"b","status":"processing","action_lock":false}'))
    assert state.floor.holder is None


def test_a_status_stored_before_locks_could_be_absent_reads_as_false() -> None:
    old = ev.decode(b'{"type":"agent.status","body":{"agent_id":"a","status":"processing"},"id":"e2",'
                    b'"room":"r","observed_at":"2025-01-01T00:00:00Z"}')
    state = fold([rec(1, ev.AgentStatus(agent_id="a", status="processing", action_lock=True)),
                  Record(seq=2, subject="", time=T0, event=old)])
    assert state.floor.holder is None


def test_a_feed_repeating_a_chat_message_or_a_first_transcript_is_one_item() -> None:
    """A typed lk.chat message is also the agent session's user item, and an agent's first reply can
    land as a transcript before its feed is known: each message is in the conversation once."""
    log = records(
        ev.ParticipantJoined(identity="user", kind="standard"),
        ev.ParticipantJoined(identity="a", kind="agent"),
        (ev.ChatMessage(message_id="m1", text="I was charged twice"), "user"),
        (ev.Transcript(speaker="a", text="Let me check that.", segment_id="s1"), "a"),  # a's feed not known yet
        (ev.ConversationItem(item_id="i1", role="user", text="I was charged twice", created_at=100.0), "a"),  # m1's echo
        (ev.ConversationItem(item_id="i2", role="assistant", text="Let me check that.", created_at=101.0), "a"),
        (ev.ConversationItem(item_id="i1", role="user", text="I was charged twice", created_at=100.0), "a"),  # again
        (ev.ChatMessage(message_id="m2", text="thanks"), "user"),
        (ev.ConversationItem(item_id="i3", role="user", text="thanks!"), "a"),  # not the same words
        (ev.ConversationItem(item_id="i4", role="assistant", text="I was charged twice"), "a"),  # other role
    )
    state = fold(log)
    assert [(i.item_id, i.role, i.text) for i in state.conversation] == [
        ("chat:m1", "user", "I was charged twice"),
        ("tr:s1", "assistant", "Let me check that."),
        ("chat:m2", "user", "thanks"),
        ("i3", "user", "thanks!"),
        ("i4", "assistant", "I was charged twice"),
    ]
    # an echo takes its item's place with the feed's content: the session's own timestamps
    m1, s1 = state.conversation[0], state.conversation[1]
    assert (m1.source, m1.created_at, m1.speaker, m1.seq) == ("conversation.item", 100.0, "user", 3)
    assert (s1.source, s1.created_at, s1.speaker, s1.seq) == ("conversation.item", 101.0, "a", 4)
    # resuming from the stored state folds the rest the same way
    first, rest = log[:5], log[5:]
    resumed = decode_state(encode_state(fold(first)))
    for record in rest:
        apply(resumed, record)
    # (a resumed state holds no earlier items: an echo's update is put again under its item's id,
    # which the projector writes over that item's row)
    assert [i.item_id for i in resumed.conversation] == ["tr:s1", "chat:m1", "chat:m2", "i3", "i4"]


def test_a_chat_message_reaching_the_log_after_its_feed_copy_is_one_item() -> None:
    """The caller's chat and the agent's feed are two senders' packets, which can cross in the SFU:
    the chat copy arriving second is dropped, the feed's item (the session's timestamps) standing."""
    log = records(
        ev.ParticipantJoined(identity="user", kind="standard"),
        ev.ParticipantJoined(identity="a", kind="agent"),
        (ev.ConversationItem(item_id="i1", role="user", text="my bill", created_at=100.0), "a"),
        (ev.ChatMessage(message_id="m1", text="my bill"), "user"),  # its copy, second
        (ev.ChatMessage(message_id="m2", text="my bill"), "user"),  # said again: kept
        (ev.ConversationItem(item_id="i2", role="user", text="my bill", created_at=102.0), "a"),  # m2's echo
        (ev.ConversationItem(item_id="i3", role="assistant", text="hello", created_at=103.0), "a"),
        (ev.ChatMessage(message_id="m3", text="hello"), "user"),  # the caller's words, not the agent's
    )
    state = fold(log)
    assert [(i.item_id, i.role, i.text, i.created_at) for i in state.conversation] == [
        ("i1", "user", "my bill", 100.0),
        ("chat:m2", "user", "my bill", 102.0),
        ("i3", "assistant", "hello", 103.0),
        ("chat:m3", "user", "hello", None),
    ]
    # resuming from the stored state at any point (as the projector does) decides the same way:
    # the items it puts are the fold's, and never the dropped copy
    kept = {i.item_id for i in state.conversation}
    for cut in range(len(log)):
        resumed = decode_state(encode_state(fold(log[:cut])))
        for record in log[cut:]:
            apply(resumed, record)
        assert {i.item_id for i in resumed.conversation} <= kept, cut


def test_a_chat_message_long_after_an_identical_feed_message_is_its_own() -> None:
    """A voice message has no chat copy: the same words typed later are a message of their own."""
    later = T0 + timedelta(seconds=60)
    feed = ev.make_event("r", ev.ConversationItem(item_id="i1", role="user", text="yes"), sender=ev.Sender(identity="a"))
    chat = ev.make_event("r", ev.ChatMessage(message_id="m1", text="yes"), sender=ev.Sender(identity="user"))
    state = fold([Record(seq=1, subject="", time=T0, event=msgspec.structs.replace(feed, at=T0)),
                  Record(seq=2, subject="", time=later, event=msgspec.structs.replace(chat, at=later))])
    assert [i.item_id for i in state.conversation] == ["i1", "chat:m1"]


# --- who said it: every turn keeps its speaker (issue "Handoff and conversation correctness") ---


def _copies(n: int, text: str, speaker: str, owner: str, how: str, old_bridge: bool) -> list[tuple[ev.Body, str]]:
    """The packets one message reaches the log as: what its speaker (or the agent transcribing it)
    sent, and the owner session's feed item. ``old_bridge``: the feed's user item names the agent,
    as bridges before the speaker rule wrote it."""
    if speaker == owner:  # the agent's own reply: its transcript, and its feed item
        return [(ev.Transcript(speaker=owner, text=text, segment_id=f"s{n}"), owner),
                (ev.ConversationItem(item_id=f"i{n}", role="assistant", text=text, created_at=100.0 + n), owner)]
    feed = ev.ConversationItem(item_id=f"i{n}", role="user", text=text, created_at=100.0 + n,
                               speaker=owner if old_bridge else None)
    if how == "typed":
        return [(ev.ChatMessage(message_id=f"m{n}", text=text), speaker), (feed, owner)]
    # spoken: the agent publishes the user's transcript on the user's behalf
    return [(ev.Transcript(speaker=speaker, text=text, segment_id=f"u{n}", track_id="TR_caller"), owner), (feed, owner)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["caller", "agent"]), st.sampled_from(["typed", "spoken"]), st.booleans()),
                min_size=1, max_size=6),
       st.randoms(use_true_random=False))
def test_every_turn_keeps_its_speaker_under_any_interleaving(turns: list[tuple[str, str, bool]],
                                                            rng: object) -> None:
    """Copies of each message (chat or transcript, and the session feed's item) reach the log in any
    order relative to each other; each message is in the conversation once, credited to who said it."""
    import random

    assert isinstance(rng, random.Random)
    packets: list[list[tuple[ev.Body, str]]] = []
    expected: dict[str, str] = {}
    for n, (who, how, old_bridge) in enumerate(turns):
        text = f"message number {n}"
        speaker = "caller" if who == "caller" else "agent-a"
        expected[text] = speaker
        packets.append(_copies(n, text, speaker, "agent-a", how, old_bridge))
    # Each message's two copies may cross, and cross the next message's copies, but a message is
    # not said before the one before it was (the session answers in turn).
    order: list[tuple[ev.Body, str]] = []
    for pair in packets:
        if rng.random() < 0.5:
            pair = list(reversed(pair))
        order.extend(pair)
    for i in range(len(order) - 1):
        if rng.random() < 0.3:
            order[i], order[i + 1] = order[i + 1], order[i]
    log = [ev.ParticipantJoined(identity="caller", kind="standard"), ev.ParticipantJoined(identity="agent-a", kind="agent")]
    out = [rec(1, log[0]), rec(2, log[1])]
    for seq, (body, sender) in enumerate(order, start=3):
        kind: ev.SenderKind = "standard" if sender == "caller" else "agent"
        event = ev.make_event(ROOM, body, id=f"e{seq}", sender=ev.Sender(identity=sender, kind=kind), observed_at=T0)
        out.append(Record(seq=seq, subject="", time=T0 + timedelta(milliseconds=100 * seq), event=event))
    state = fold(out)
    said = [(i.text, i.speaker) for i in state.conversation if i.type == "message"]
    assert sorted(t for t, _ in said) == sorted(expected), said
    for text, credited in said:
        assert credited == expected[text], (text, credited, said)


def test_a_handoff_phase_credits_the_caller_not_the_new_feed_owner() -> None:
    """Reception's feed, then support's after reception left: the caller's words stay the caller's,
    in the conversation and after a projector resumes from stored state."""
    log = records(
        ev.ParticipantJoined(identity="caller", kind="standard"),
        ev.ParticipantJoined(identity="reception", kind="agent"),
        (ev.ConversationItem(item_id="i1", role="user", text="hi", created_at=1.0, speaker="reception"), "reception"),
        (ev.ChatMessage(message_id="m1", text="hi"), "caller"),
        ev.ParticipantJoined(identity="support", kind="agent"),
        ev.ParticipantLeft(identity="reception"),
        (ev.ChatMessage(message_id="m2", text="it broke"), "caller"),
        (ev.ConversationItem(item_id="i2", role="user", text="it broke", created_at=2.0), "support"),
    )
    state = fold(log)
    assert [(i.text, i.speaker) for i in state.conversation] == [("hi", "caller"), ("it broke", "caller")]
    resumed = decode_state(encode_state(fold(log[:3])))
    for record in log[3:]:
        apply(resumed, record)
    assert all(i.speaker == "caller" for i in resumed.conversation)


def test_three_agents_transcribing_one_caller_make_one_item() -> None:
    """Agents publish the caller's transcript on the caller's behalf: the server gives all three
    copies the caller's identity. The same words of one track begun together are one utterance;
    the same words said again later are another."""
    def heard(seq: int, at_s: float, segment: str, text: str) -> Record:
        event = ev.make_event(ROOM, ev.Transcript(speaker="caller", text=text, segment_id=segment, track_id="TR_c"),
                              id=f"e{seq}", sender=ev.Sender(identity="caller", kind="standard"),
                              at=T0 + timedelta(seconds=at_s), observed_at=T0)
        return Record(seq=seq, subject="", time=T0 + timedelta(seconds=at_s + 0.2), event=event)

    log = [rec(1, ev.ParticipantJoined(identity="caller", kind="standard")),
           heard(2, 10.00, "SG_a1", "what is the status"), heard(3, 10.04, "SG_b1", "what is the status"),
           heard(4, 10.09, "SG_c1", "what is the status"), heard(5, 16.0, "SG_a2", "what is the status"),
           heard(6, 16.02, "SG_b2", "thank you")]
    state = fold(log)
    assert [(i.item_id, i.text) for i in state.conversation] == [
        ("tr:SG_a1", "what is the status"), ("tr:SG_a2", "what is the status"), ("tr:SG_b2", "thank you")]
