"""A tool call while it runs (issue 23): the ``lk.agent.session`` feed's ``tool_execution_updated``
typed as ``tool.execution`` by the ingest, the call in the folded conversation from its start and
once, and the resumed LLM's view of a call that never returned. No servers."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from livekit.protocol.agent_pb import agent_session as pb

from room_ledger import events as ev
from room_ledger import words
from room_ledger.bridge.ingest import Ingest
from room_ledger.chat import INTERRUPTED_OUTPUT, chat_items
from room_ledger.client import Record
from room_ledger.projections.rows import decode_state, encode_state
from room_ledger.state import ConversationItem, RoomState, apply, fold
from tests.test_bridge_ingest import capture_session_feed

ROOM = "r1"
AGENT = "agent"
T0 = datetime(2026, 12, 1, tzinfo=UTC)
FEED = "lk.agent.session"


def make(bridge_id: str = "b1") -> tuple[Ingest, list[ev.KnownEvent]]:
    out: list[ev.KnownEvent] = []
    ingest = Ingest(ROOM, out.append, bridge_id=bridge_id)
    ingest.participant_joined(AGENT, kind="agent", sid="PA_agent")
    out.clear()
    return ingest, out


def feed(ingest: Ingest, messages: list[bytes]) -> None:
    for i, raw in enumerate(messages):
        ingest.byte_stream(raw, topic=FEED, stream_id=f"AS_{i}", sender_identity=AGENT)


# --- bytes from LiveKit Agents' own SessionHost encoder ---------------------------------------------


def session_bytes(emit: Callable[[Any], None]) -> list[bytes]:
    """What LiveKit Agents' SessionHost publishes on ``lk.agent.session`` for the events ``emit``
    makes a real ``AgentSession`` emit."""
    return asyncio.run(capture_session_feed(emit))


def a_tool_call_and_its_output(session: Any) -> None:
    """The feed of one tool call as LiveKit Agents 1.8 publishes it: started, a progress update,
    ended, the deferred reply, then the call and its output together."""
    from livekit.agents import llm
    from livekit.agents.voice.events import (
        FunctionToolsExecutedEvent,
        ToolCallEnded,
        ToolCallStarted,
        ToolCallUpdated,
        ToolExecutionUpdatedEvent,
        ToolReplyUpdated,
    )

    call = llm.FunctionCall(id="item_fc1", call_id="call_1", name="lookup_order", arguments='{"order": 42}')
    for update in (ToolCallStarted(function_call=call),
                   ToolCallUpdated(id="call_1", call_id="call_1", message="still looking"),
                   ToolCallEnded(id="call_1_final", call_id="call_1", message="shipped", status="done"),
                   ToolReplyUpdated(update_ids=["call_1"], status="scheduled", speech_id="speech_1")):
        session.emit("tool_execution_updated", ToolExecutionUpdatedEvent(update=update, created_at=1_780_000_000.5))
    session.emit("function_tools_executed", FunctionToolsExecutedEvent(
        function_calls=[call],
        function_call_outputs=[llm.FunctionCallOutput(call_id="call_1", name="lookup_order", output="shipped",
                                                      is_error=False)]))


# --- ingest -------------------------------------------------------------------------------------


def test_tool_execution_updated_is_typed_from_the_real_encoder() -> None:
    ingest, out = make()
    feed(ingest, session_bytes(a_tool_call_and_its_output))
    assert [e.type for e in out] == ["tool.execution"] * 4 + ["conversation.item"] * 2
    started, updated, ended, reply = (e.body for e in out[:4])
    assert started == ev.ToolExecution(stage="started", call_id="call_1", item_id="item_fc1", name="lookup_order",
                                       arguments='{"order": 42}', created_at=1_780_000_000.5)
    assert (updated.stage, updated.call_id, updated.message) == ("updated", "call_1", "still looking")  # type: ignore[union-attr]
    assert (ended.stage, ended.status, ended.message, ended.item_id) == ("ended", "done", "shipped", "call_1_final")  # type: ignore[union-attr]
    assert (reply.stage, reply.status, reply.update_ids, reply.speech_id) == ("reply", "scheduled", ["call_1"], "speech_1")  # type: ignore[union-attr]
    assert all(e.sender.identity == AGENT and e.sender.kind == "agent" for e in out)
    assert out[0].at == datetime.fromtimestamp(1_780_000_000.5, UTC)
    # Every event stores and reads back as it was made.
    assert [ev.decode(ev.encode(e)) for e in out] == out
    # A second bridge in the room makes the same ids: each step is stored once.
    other, out2 = make(bridge_id="b2")
    feed(other, session_bytes(a_tool_call_and_its_output))
    assert [e.id for e in out2] == [e.id for e in out]
    assert len({e.id for e in out}) == len(out)
    c = ingest.counters
    assert (c.typed, c.rejected) == (1 + 6, 0)  # the agent's join, then the feed


def _message(event: pb.AgentSessionEvent) -> bytes:
    event.created_at.FromSeconds(1_780_000_000)
    return pb.AgentSessionMessage(event=event).SerializeToString()


TEU = pb.AgentSessionEvent.ToolExecutionUpdated


@pytest.mark.parametrize(("event", "reason"), [
    (pb.AgentSessionEvent(tool_execution_updated=TEU()), "tool_execution_updated: no step"),
    (pb.AgentSessionEvent(tool_execution_updated=TEU(started=TEU.Started(function_call=pb.FunctionCall(name="x")))),
     "tool_execution_updated: started names no call"),
    (pb.AgentSessionEvent(tool_execution_updated=TEU(ended=TEU.Ended(status=pb.TC_ERROR))),
     "tool_execution_updated: ended names no call"),
    (pb.AgentSessionEvent(tool_execution_updated=TEU(reply_updated=TEU.ReplyUpdated(update_ids=["u"]))),
     "tool_execution_updated: reply_updated names no speech"),
    (pb.AgentSessionEvent(function_tools_started=pb.AgentSessionEvent.FunctionToolsStarted()),
     "function_tools_started: no call with a call id"),
])
def test_a_tool_step_naming_no_call_is_recorded_untyped_with_the_reason(event: pb.AgentSessionEvent,
                                                                          reason: str) -> None:
    ingest, out = make()
    feed(ingest, [_message(event)])
    (recorded,) = out
    assert isinstance(recorded.body, ev.Data)
    assert recorded.body.reason == reason
    assert recorded.body.topic == FEED and recorded.body.json is not None
    assert recorded.body.attributes["event"] == event.WhichOneof("event")
    assert ingest.counters.rejected == 1


_texts = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12)
_steps = st.one_of(
    st.builds(lambda c, i, n, a: TEU(started=TEU.Started(function_call=pb.FunctionCall(call_id=c, id=i, name=n,
                                                                                        arguments=a))),
              _texts, _texts, _texts, _texts),
    st.builds(lambda c, i, m: TEU(call_updated=TEU.CallUpdated(call_id=c, id=i, message=m)), _texts, _texts, _texts),
    st.builds(lambda c, s, m: TEU(ended=TEU.Ended(call_id=c, status=s, **({"message": m} if m is not None else {}))),
              _texts, st.integers(0, 9), st.none() | _texts),
    st.builds(lambda u, s, sp: TEU(reply_updated=TEU.ReplyUpdated(update_ids=u, status=s, speech_id=sp)),
              st.lists(_texts, max_size=3), st.integers(0, 9), _texts),
    st.just(TEU()),
)


@settings(max_examples=200, deadline=None)
@given(step=_steps)
def test_any_tool_step_is_recorded_once_typed_or_with_the_reason(step: Any) -> None:
    ingest, out = make()
    feed(ingest, [_message(pb.AgentSessionEvent(tool_execution_updated=step))])
    (recorded,) = out
    assert ev.decode(ev.encode(recorded)) == recorded
    if isinstance(recorded.body, ev.ToolExecution):
        assert recorded.body.call_id or recorded.body.speech_id
    else:
        assert isinstance(recorded.body, ev.Data) and recorded.body.reason.startswith("tool_execution_updated: ")


def test_function_tools_started_is_a_start_of_each_call() -> None:
    started = pb.AgentSessionEvent.FunctionToolsStarted(function_calls=[
        pb.FunctionCall(id="item_a", call_id="call_a", name="one", arguments="{}"),
        pb.FunctionCall(call_id="call_b", name="two", arguments='{"x":1}')])
    ingest, out = make()
    feed(ingest, [_message(pb.AgentSessionEvent(function_tools_started=started))])
    assert [(e.type, e.body.stage, e.body.call_id) for e in out] == [  # type: ignore[union-attr]
        ("tool.execution", "started", "call_a"), ("tool.execution", "started", "call_b")]


def test_broken_feed_bytes_are_recorded_not_dropped() -> None:
    """Every cut of a real tool feed message, and bytes that are not one, leave an event."""
    raw = session_bytes(a_tool_call_and_its_output)[0]
    ingest, out = make()
    for cut in range(len(raw) + 1):
        before = len(out)
        ingest.byte_stream(raw[:cut], topic=FEED, stream_id=f"AS_cut{cut}", sender_identity=AGENT)
        assert len(out) > before or ingest.counters.skipped, cut
    for event in out:
        ev.decode(ev.encode(event))
    undecodable = [e.body for e in out if isinstance(e.body, ev.Data) and e.body.reason.startswith("agent session:")]
    # Undecodable bytes are kept as they came.
    assert undecodable and all(body.text is not None or body.payload_b64 is not None for body in undecodable)


# --- the fold -----------------------------------------------------------------------------------


def records_of(events: list[ev.KnownEvent]) -> list[Record]:
    return [Record(seq=i, subject="", time=T0 + timedelta(seconds=i), event=e) for i, e in enumerate(events, 1)]


def calls_and_outputs(state: RoomState, call_id: str = "call_1") -> tuple[list[ConversationItem], list[ConversationItem]]:
    mine = [i for i in state.conversation if i.call_id == call_id]
    return ([i for i in mine if i.type == "function_call"], [i for i in mine if i.type == "function_call_output"])


def test_the_call_is_in_the_conversation_from_its_start_and_once_after_its_end() -> None:
    ingest, out = make()
    feed(ingest, session_bytes(a_tool_call_and_its_output))
    records = records_of(out)
    running = fold(records[:1])
    (call,) = running.conversation
    assert (call.item_id, call.type, call.name, call.arguments, call.speaker, call.source) == (
        "call:call_1", "function_call", "lookup_order", '{"order": 42}', AGENT, "tool.execution")
    assert fold(records[:4]).conversation == running.conversation  # progress, end, reply: nothing more
    done = fold(records)
    calls, outputs = calls_and_outputs(done)
    assert len(calls) == 1 and len(outputs) == 1 and len(done.conversation) == 2
    # The feed's item completed the started one in place: its place, the feed's content.
    assert (calls[0].seq, calls[0].time, calls[0].source) == (call.seq, call.time, "conversation.item")
    assert outputs[0].output == "shipped"


def _event(body: ev.Body, event_id: str) -> ev.KnownEvent:
    return ev.make_event(ROOM, body, id=event_id, sender=ev.Sender(AGENT, "agent"), observed_at=T0)


START = ev.ToolExecution(stage="started", call_id="call_1", item_id="item_fc1", name="lookup", arguments="{}",
                         created_at=1.0)
ENDED = ev.ToolExecution(stage="ended", call_id="call_1", item_id="call_1", status="done", message="ok")
#: The feed's own item of the call (no item id in function_tools_executed: the ingest's key)...
FEED_CALL = ev.ConversationItem(item_id="call:call_1", item_type="function_call", name="lookup", call_id="call_1",
                                arguments="{}", speaker=AGENT, created_at=2.0)
#: ... or one naming an item id of its own (a later LiveKit, or an agent's own ``conversation.item``).
OWN_ID_CALL = msgspec.structs.replace(FEED_CALL, item_id="item_fc1")
OUTPUT = ev.ConversationItem(item_id="output:call_1", item_type="function_call_output", name="lookup",
                             call_id="call_1", output="ok", speaker=AGENT, created_at=2.0)


def projected_like(records: list[Record], batches: list[int]) -> list[tuple[str, int, str]]:
    """What the projector writes, folded in batches as it does: the state stored and read back
    between batches without its items, and items upserted by id (an item seen again keeps the
    sequence of its first appearance)."""
    rows: dict[str, tuple[int, str]] = {}
    state = RoomState()
    start = 0
    for size in [*batches, len(records)]:
        for record in records[start:start + size]:
            apply(state, record)
        start += size
        for item in state.conversation:
            first = rows.get(item.item_id)
            rows[item.item_id] = (first[0] if first else item.seq, item.type)
        state = decode_state(encode_state(state))
        state.forget_conversation()
    return sorted((item_id, seq, kind) for item_id, (seq, kind) in rows.items())


@settings(max_examples=300, deadline=None)
@given(
    steps=st.permutations([
        ("start", START), ("start again", START), ("ended", ENDED), ("call", FEED_CALL), ("output", OUTPUT)]),
    own_id=st.booleans(),
    batches=st.lists(st.integers(1, 3), max_size=4),
)
def test_any_interleaving_gives_one_call_and_one_output(steps: list[tuple[str, ev.Body]], own_id: bool,
                                                        batches: list[int]) -> None:
    """However the start (twice: two bridges' copies are one event, but a replayed start is not),
    the end and the feed's items reach the log, the call and its output are there once each, and
    the projector's batched writing agrees with the fold."""
    events = [_event(OWN_ID_CALL if own_id and body is FEED_CALL else body, f"e{i}")
              for i, (_, body) in enumerate(steps)]
    records = records_of(events)
    state = fold(records)
    calls, outputs = calls_and_outputs(state)
    assert len(calls) == 1 and len(outputs) == 1 and len(state.conversation) == 2
    names = [name for name, _ in steps]
    if names.index("call") > names.index("start"):
        assert calls[0].item_id == "call:call_1"  # completed in place
    assert calls[0].arguments == "{}" and calls[0].name == "lookup"
    if names.index("call") < names.index("start"):
        assert calls[0].source == "conversation.item"  # a start after the feed's item changes nothing
    expected = sorted((i.item_id, i.seq, i.type) for i in state.conversation)
    assert projected_like(records, batches) == expected


def test_a_start_of_another_call_is_another_item() -> None:
    second = msgspec.structs.replace(START, call_id="call_2")
    state = fold(records_of([_event(START, "e1"), _event(second, "e2"), _event(FEED_CALL, "e3")]))
    assert [(i.item_id, i.source) for i in state.conversation] == [
        ("call:call_1", "conversation.item"), ("call:call_2", "tool.execution")]


def test_many_calls_keep_a_bounded_memory() -> None:
    from room_ledger.state import MAX_CALLS

    events = [_event(msgspec.structs.replace(START, call_id=f"c{i}"), f"e{i}") for i in range(MAX_CALLS + 10)]
    state = fold(records_of(events))
    assert len(state.calls) == MAX_CALLS and len(state.conversation) == MAX_CALLS + 10


# --- the resumed LLM's view ------------------------------------------------------------------------


def _items(*bodies: ev.Body) -> list[ConversationItem]:
    return fold(records_of([_event(b, f"e{i}") for i, b in enumerate(bodies)])).conversation


def test_an_open_call_is_mapped_as_it_is_by_default() -> None:
    from livekit.agents import llm

    (call,) = chat_items(_items(START))
    assert isinstance(call, llm.FunctionCall)
    assert (call.call_id, call.name, call.arguments) == ("call_1", "lookup", "{}")
    assert "interrupted" not in call.extra


def test_close_open_calls_answers_a_call_that_never_returned() -> None:
    from livekit.agents import llm

    user = ev.ConversationItem(item_id="m1", role="user", text="where is my order?", created_at=0.5)
    later = ev.ConversationItem(item_id="m2", role="user", text="hello?", created_at=9.0)
    mapped = chat_items(_items(user, START, later), close_open_calls=INTERRUPTED_OUTPUT)
    assert [type(i).__name__ for i in mapped] == ["ChatMessage", "FunctionCall", "FunctionCallOutput", "ChatMessage"]
    call, output = mapped[1], mapped[2]
    assert isinstance(output, llm.FunctionCallOutput)
    assert (output.call_id, output.name, output.output, output.is_error) == (
        "call_1", "lookup", "interrupted: outcome unknown", True)
    assert output.id == "interrupted:call_1" and call.extra["interrupted"] is True
    # LiveKit keeps the pair: what it sends the LLM has the call and the answer.
    ctx = llm.ChatContext(mapped)
    messages, _ = ctx.to_provider_format("openai")
    assert any(m.get("role") == "tool" and m.get("content") == INTERRUPTED_OUTPUT for m in messages)


def test_close_open_calls_leaves_answered_calls_alone() -> None:
    mapped = chat_items(_items(START, FEED_CALL, OUTPUT), close_open_calls=INTERRUPTED_OUTPUT)
    assert [(type(i).__name__, getattr(i, "output", None)) for i in mapped] == [
        ("FunctionCall", None), ("FunctionCallOutput", "ok")]
    assert "interrupted" not in mapped[0].extra


def test_close_open_calls_in_one_agents_view_closes_only_its_calls() -> None:
    others = msgspec.structs.replace(START, call_id="call_9")
    conversation = fold(records_of([
        _event(START, "e1"),
        ev.make_event(ROOM, others, id="e2", sender=ev.Sender("billing", "agent"), observed_at=T0),
    ])).conversation
    mapped = chat_items(conversation, perspective=AGENT, close_open_calls=INTERRUPTED_OUTPUT)
    assert [(type(i).__name__, i.call_id) for i in mapped] == [("FunctionCall", "call_1"),
                                                                ("FunctionCallOutput", "call_1")]


def test_snapshot_chat_ctx_closes_open_calls_only_when_asked() -> None:
    from room_ledger.hydrate import Snapshot

    state = fold(records_of([_event(START, "e1")]))
    snapshot = Snapshot(room=ROOM, seq=state.seq, state=state, conversation=state.conversation, full_conversation=True)
    assert [i.type for i in snapshot.chat_ctx().items] == ["function_call"]
    assert [i.type for i in snapshot.chat_ctx(close_open_calls=INTERRUPTED_OUTPUT).items] == [
        "function_call", "function_call_output"]


# --- ledger replay ------------------------------------------------------------------------------


def test_replay_says_each_step_in_words() -> None:
    ingest, out = make()
    feed(ingest, session_bytes(a_tool_call_and_its_output))
    lines = [words.summary(e) for e in out[:4]]
    assert lines == [
        'agent starts lookup_order({"order": 42}) [call_1]',
        "tool [call_1] reports: still looking",
        "tool [call_1] ended: done → shipped",
        "tool reply scheduled (speech speech_1; updates call_1)",
    ]


def test_every_combination_of_stage_and_fields_has_words() -> None:
    for stage, status, message in itertools.product(["started", "updated", "ended", "reply", "later"],
                                                    [None, "done"], [None, "x"]):
        body = ev.ToolExecution(stage=stage, status=status, message=message)
        assert words.summary(_event(body, "e"))


def test_replay_at_a_moment_shows_a_call_still_running() -> None:
    import io

    from rich.console import Console

    from room_ledger.cli.timeline import TimelinePrinter
    from room_ledger.cli.views import render_state

    records = records_of([_event(START, "e1")])
    console = Console(file=io.StringIO(), width=200, color_system=None)
    render_state(console, fold(records), title="r1 at #1")
    TimelinePrinter(console).print(records[0])
    shown = console.file.getvalue()  # type: ignore[attr-defined]
    assert "calls lookup({}) (started, no output yet)" in shown
    assert "tool.execution" in shown and "agent starts lookup({}) [call_1]" in shown
