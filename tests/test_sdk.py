"""The LiveKit SDK internals room_ledger/bridge/_sdk.py and room_ledger/_agents_sdk.py rely on, one test each: an
SDK upgrade that moves one fails here. And the bridge's room attachment undone on close (its callbacks and stream tables)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from livekit import rtc
from livekit.rtc._ffi_client import FfiClient
from livekit.rtc._proto import ffi_pb2

from room_ledger import events as ev
from room_ledger.bridge import _sdk
from room_ledger.bridge.ingest import Ingest
from room_ledger.bridge.room import RoomBridge


async def test_stream_handlers_are_private_tables_read_with_get() -> None:
    room = rtc.Room()
    assert _sdk.has_stream_tables(room)
    source = inspect.getsource(rtc.Room)
    # A stream is handed to the table's .get(topic): what CatchAll answers for every topic.
    assert "self._text_stream_handlers.get(" in source
    assert "self._byte_stream_handlers.get(" in source


async def test_catch_all_tables_answer_every_topic_and_are_undone() -> None:
    room = rtc.Room()

    def mine(reader: rtc.TextStreamReader | rtc.ByteStreamReader, identity: str) -> None: ...

    def theirs(reader: Any, identity: str) -> None: ...

    room.register_text_stream_handler("theirs", theirs)
    restore = _sdk.catch_all_streams(room, mine, mine)
    assert room._text_stream_handlers.get("anything") is mine
    assert room._text_stream_handlers.get("theirs") is theirs
    assert room._byte_stream_handlers.get("anything") is mine
    restore()
    assert type(room._text_stream_handlers) is dict and type(room._byte_stream_handlers) is dict
    assert room._text_stream_handlers == {"theirs": theirs}


async def test_ffi_queue_subscribers_are_queue_loop_filter_triples() -> None:
    queue = FfiClient.instance.queue
    assert hasattr(queue, "_lock")
    own = queue.subscribe(None)
    try:
        with queue._lock:
            entry = next(s for s in queue._subscribers if s[0] is own)
        assert len(entry) == 3  # (queue, loop, filter): only_own_room_events replaces the filter
    finally:
        queue.unsubscribe(own)
    # A connected room's subscription and handle: the fields only_own_room_events reads.
    source = inspect.getsource(rtc.Room)
    assert "self._ffi_queue = FfiClient.instance.queue.subscribe(" in source
    assert "self._ffi_handle = FfiHandle(" in source
    assert rtc.Room()._ffi_handle is None


async def test_room_bridge_leaves_the_room_as_it_found_it() -> None:
    room = rtc.Room()
    before = {event: dict(handlers) for event, handlers in room._events.items()}
    seen: list[ev.KnownEvent] = []
    bridge = RoomBridge(room, Ingest("r", seen.append))
    bridge.attach()
    assert isinstance(room._text_stream_handlers, _sdk.CatchAll)
    assert room._events.get("data_received")
    await bridge.close(left=False)
    after = {event: dict(handlers) for event, handlers in room._events.items() if handlers}
    assert after == {event: handlers for event, handlers in before.items() if handlers}
    assert type(room._text_stream_handlers) is dict and type(room._byte_stream_handlers) is dict


@pytest.mark.livekit
async def test_only_own_room_events_drops_other_rooms_events(livekit_connect: Any, room: str) -> None:
    lk_room: rtc.Room = await livekit_connect("watcher", room)
    _sdk.only_own_room_events(lk_room)
    queue = FfiClient.instance.queue
    assert lk_room._ffi_handle is not None
    with queue._lock:
        _, _, keep = next(s for s in queue._subscribers if s[0] is lk_room._ffi_queue)
    assert keep is not None
    other = ffi_pb2.FfiEvent()
    other.room_event.room_handle = lk_room._ffi_handle.handle + 1
    own = ffi_pb2.FfiEvent()
    own.room_event.room_handle = lk_room._ffi_handle.handle
    assert not keep(other)
    assert keep(own)


async def test_room_io_keeps_its_text_input_callback_where_the_handoff_reads_it() -> None:
    from livekit.agents import AgentSession
    from livekit.agents.voice.room_io import RoomIO

    from room_ledger._agents_sdk import text_input_callback

    room_io = RoomIO(AgentSession(), rtc.Room())
    assert text_input_callback(room_io) is None

    def typed(session: Any, event: Any) -> None:
        pass

    room_io.register_text_input(typed)
    assert text_input_callback(room_io) is typed


async def test_agent_session_keeps_a_user_turn_where_floor_gating_puts_it() -> None:
    """ledger.turns keeps a turn it does not answer as LiveKit's skip_reply path does."""
    from livekit.agents import Agent, AgentSession
    from livekit.agents.llm import ChatMessage

    from room_ledger._agents_sdk import keep_user_turn

    session: AgentSession[None] = AgentSession()
    agent = Agent(instructions="x")
    added: list[Any] = []
    session.on("conversation_item_added", lambda event: added.append(event.item))
    message = ChatMessage(role="user", content=["billing, what is my balance"])
    keep_user_turn(session, agent, message)
    assert agent.chat_ctx.items[-1].id == message.id
    assert [item.id for item in added] == [message.id]
