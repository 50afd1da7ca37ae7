"""What the bridge relies on in livekit-server itself, through real ``livekit.rtc`` participants.

These are the "LiveKit facts" of DESIGN.md checked against the real server (``pytest -m livekit``):
if an SDK or server upgrade changes one of them, it fails here first.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from livekit import rtc

from tests.livekit import Events, sees

if TYPE_CHECKING:
    from tests.livekit.plugin import Connect, LiveKitServer

pytestmark = pytest.mark.livekit


async def test_connect_and_reliable_data(livekit_connect: Connect, livekit_server: LiveKitServer,
                                         room: str) -> None:
    """Smoke test: catches protocol drift when the livekit SDK is upgraded."""
    alice = await livekit_connect("alice", room)
    bob = await livekit_connect("bob", room)
    got = Events(bob, "data_received")

    await alice.local_participant.publish_data(b"hello", topic="greetings")

    (packet,) = await got.next("data_received")
    assert packet.data == b"hello"
    assert packet.topic == "greetings"
    assert packet.kind == rtc.DataPacketKind.KIND_RELIABLE
    assert packet.participant.identity == "alice"
    assert packet.participant.sid == alice.local_participant.sid
    assert alice.local_participant.sid.startswith("PA_") and (await alice.sid).startswith("RM_")
    await sees(alice, "bob")
    await sees(bob, "alice")
    assert set(alice.remote_participants) == {"bob"} and set(bob.remote_participants) == {"alice"}
    assert {p.identity for p in await livekit_server.list_participants(room)} == {"alice", "bob"}


async def test_lossy_data_and_destinations(livekit_connect: Connect, livekit_server: LiveKitServer,
                                           room: str) -> None:
    alice = await livekit_connect("alice", room)
    bob = await livekit_connect("bob", room)
    carol = await livekit_connect("carol", room)
    bob_got, carol_got = Events(bob, "data_received"), Events(carol, "data_received")
    # the server drops lossy data to participants that are not active yet: wait until all are announced
    await sees(alice, "bob", "carol")
    await sees(bob, "alice")
    await sees(carol, "alice")

    await alice.local_participant.publish_data(b"lossy", reliable=False, topic="t1")
    for got in (bob_got, carol_got):
        (packet,) = await got.next("data_received")
        assert (packet.data, packet.topic, packet.kind) == (b"lossy", "t1", rtc.DataPacketKind.KIND_LOSSY)

    await alice.local_participant.publish_data(b"for bob", topic="t2", destination_identities=["bob"])
    (packet,) = await bob_got.next("data_received")
    assert (packet.data, packet.topic, packet.participant.identity) == (b"for bob", "t2", "alice")
    # carol's next packet on the reliable channel is alice's next broadcast: "for bob" never reached her
    await alice.local_participant.publish_data(b"for all", topic="t3")
    (packet,) = await carol_got.next("data_received", lambda p: p.kind == rtc.DataPacketKind.KIND_RELIABLE)
    assert packet.data == b"for all"
    (packet,) = await bob_got.next("data_received")
    assert packet.data == b"for all"


async def test_rpc_between_participants(livekit_connect: Connect, room: str) -> None:
    alice = await livekit_connect("alice", room)
    bob = await livekit_connect("bob", room)

    async def echo(data: rtc.RpcInvocationData) -> str:
        return f"{data.caller_identity}:{data.payload}"

    alice.local_participant.register_rpc_method("echo", echo)

    assert await bob.local_participant.perform_rpc(
        destination_identity="alice", method="echo", payload="ping") == "bob:ping"


async def test_text_stream_on_lk_transcription_with_attributes(livekit_connect: Connect, room: str) -> None:
    alice = await livekit_connect("alice", room)
    bob = await livekit_connect("bob", room)
    received: asyncio.Queue[tuple[str, str, dict[str, str] | None]] = asyncio.Queue()

    async def read(reader: rtc.TextStreamReader, identity: str) -> None:
        received.put_nowait((identity, await reader.read_all(), reader.info.attributes))

    tasks: set[asyncio.Task[None]] = set()

    def on_stream(reader: rtc.TextStreamReader, identity: str) -> None:
        task = asyncio.ensure_future(read(reader, identity))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    bob.register_text_stream_handler("lk.transcription", on_stream)
    attributes = {"lk.segment_id": "SG_1", "lk.transcription_final": "true"}
    long_text = "hello world " * 3000  # several chunks
    await alice.local_participant.send_text(long_text, topic="lk.transcription", attributes=attributes)

    identity, text, got_attributes = await asyncio.wait_for(received.get(), 10)
    assert (identity, text) == ("alice", long_text)
    assert got_attributes == attributes


async def test_byte_stream(livekit_connect: Connect, room: str) -> None:
    alice = await livekit_connect("alice", room)
    bob = await livekit_connect("bob", room)
    received: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue()

    async def read(reader: rtc.ByteStreamReader, identity: str) -> None:
        data = b"".join([chunk async for chunk in reader])
        received.put_nowait((identity, reader.info.name, data))

    tasks: set[asyncio.Task[None]] = set()

    def on_stream(reader: rtc.ByteStreamReader, identity: str) -> None:
        task = asyncio.ensure_future(read(reader, identity))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    bob.register_byte_stream_handler("files", on_stream)
    payload = bytes(range(256)) * 200  # 51 KiB
    writer = await alice.local_participant.stream_bytes("blob.bin", topic="files")
    await writer.write(payload)
    await writer.aclose()

    assert await asyncio.wait_for(received.get(), 10) == ("alice", "blob.bin", payload)


async def test_attributes_metadata_and_name(livekit_connect: Connect, room: str) -> None:
    alice = await livekit_connect("alice", room, attributes={"role": "caller"})
    bob = await livekit_connect("bob", room)
    await sees(bob, "alice")
    events = Events(bob, "participant_attributes_changed", "participant_metadata_changed",
                    "participant_name_changed")
    assert bob.remote_participants["alice"].attributes == {"role": "caller"}

    await alice.local_participant.set_attributes({"lk.agent.state": "listening"})
    changed, participant = await events.next("participant_attributes_changed")
    assert changed == {"lk.agent.state": "listening"}
    assert participant.attributes == {"role": "caller", "lk.agent.state": "listening"}

    await alice.local_participant.set_attributes({"role": ""})  # empty value deletes
    _, participant = await events.next("participant_attributes_changed")
    assert participant.attributes == {"lk.agent.state": "listening"}

    await alice.local_participant.set_metadata('{"x": 1}')
    participant, _old, new = await events.next("participant_metadata_changed")
    assert (participant.identity, new) == ("alice", '{"x": 1}')

    await alice.local_participant.set_name("Alice")
    participant, _old, new = await events.next("participant_name_changed")
    assert (participant.identity, new) == ("alice", "Alice")


async def test_room_metadata(livekit_connect: Connect, livekit_server: LiveKitServer, room: str) -> None:
    alice = await livekit_connect("alice", room)
    events = Events(alice, "room_metadata_changed")
    await livekit_server.set_room_metadata(room, "v1")
    _old, new = await events.next("room_metadata_changed")
    assert new == "v1" and alice.metadata == "v1"
    late = await livekit_connect("late", room)
    assert late.metadata == "v1"


async def test_join_and_leave(livekit_connect: Connect, livekit_server: LiveKitServer, room: str) -> None:
    alice = await livekit_connect("alice", room)
    events = Events(alice, "participant_connected", "participant_disconnected")
    bob = await livekit_connect("bob", room, name="Bob", metadata="m", kind="agent")

    (joined,) = await events.next("participant_connected")
    assert (joined.identity, joined.name, joined.metadata) == ("bob", "Bob", "m")
    assert joined.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT

    await bob.disconnect()
    (left,) = await events.next("participant_disconnected")
    assert left.identity == "bob" and "bob" not in alice.remote_participants
    assert [p.identity for p in await livekit_server.list_participants(room)] == ["alice"]


async def test_hidden_participant_sees_everything_and_is_seen_by_no_one(
        livekit_connect: Connect, livekit_server: LiveKitServer, room: str) -> None:
    alice = await livekit_connect("alice", room)
    alice_events = Events(alice, "participant_connected", "data_received")
    spy = await livekit_connect("spy", room, hidden=True)
    spy_data = Events(spy, "data_received")
    assert set(spy.remote_participants) == {"alice"}

    # Signal messages are ordered: once alice hears of carol, she would have heard of spy.
    carol = await livekit_connect("carol", room)
    (first,) = await alice_events.next("participant_connected")
    assert first.identity == "carol"
    assert set(alice.remote_participants) == {"carol"} and set(carol.remote_participants) == {"alice"}
    assert "spy" in {p.identity for p in await livekit_server.list_participants(room)}

    await carol.local_participant.publish_data(b"psst", topic="t")
    (packet,) = await spy_data.next("data_received")
    assert (packet.data, packet.participant.identity) == (b"psst", "carol")

    await spy.local_participant.publish_data(b"from the shadows")
    (packet,) = await alice_events.next("data_received", lambda p: p.data == b"from the shadows")
    assert packet.participant is None  # unknown to alice, as with LiveKit


async def test_data_permissions(livekit_connect: Connect, livekit_server: LiveKitServer, room: str) -> None:
    """The server drops, silently, data from a participant without ``canPublishData``."""
    mute = await livekit_connect("mute", room, can_publish_data=False)
    deaf = await livekit_connect("deaf", room, can_subscribe=False)
    bob = await livekit_connect("bob", room)
    bob_got = Events(bob, "data_received")

    await mute.local_participant.publish_data(b"ignored")
    await deaf.local_participant.publish_data(b"heard")
    (packet,) = await bob_got.next("data_received")
    assert (packet.data, packet.participant.identity) == (b"heard", "deaf")
    assert bob_got.pending() == []
    assert "mute" in bob.remote_participants  # in the room, only its data is refused


async def test_kick(livekit_connect: Connect, livekit_server: LiveKitServer, room: str) -> None:
    alice = await livekit_connect("alice", room)
    bob = await livekit_connect("bob", room)
    alice_events, bob_events = Events(alice, "disconnected"), Events(bob, "participant_disconnected")

    await livekit_server.kick(room, "alice")

    (reason,) = await alice_events.next("disconnected")
    assert reason == rtc.DisconnectReason.PARTICIPANT_REMOVED
    (left,) = await bob_events.next("participant_disconnected")
    assert left.identity == "alice"


async def test_signal_lost_and_resumed(livekit_connect: Connect, livekit_server: LiveKitServer,
                                       room: str) -> None:
    """A cut signal connection: the SDK resumes the same session, and data flows again both ways."""
    alice = await livekit_connect("alice", room)
    bob = await livekit_connect("bob", room)
    alice_events = Events(alice, "reconnecting", "reconnected", "data_received")
    bob_events = Events(bob, "data_received")
    old_sid = alice.local_participant.sid

    await livekit_server.drop_signal(room, "alice")

    await alice_events.next("reconnecting", timeout=20)
    await alice_events.next("reconnected", timeout=20)
    (now,) = [p for p in await livekit_server.list_participants(room) if p.identity == "alice"]
    assert now.sid == old_sid  # resumed, not rejoined
    await alice.local_participant.publish_data(b"back")
    (packet,) = await bob_events.next("data_received")
    assert (packet.data, packet.participant.identity) == (b"back", "alice")
    await bob.local_participant.publish_data(b"welcome")
    (packet,) = await alice_events.next("data_received")
    assert packet.data == b"welcome"


async def test_rooms_are_isolated(livekit_connect: Connect, livekit_server: LiveKitServer, room: str) -> None:
    alice = await livekit_connect("alice", f"{room}-a")
    carol = await livekit_connect("carol", f"{room}-a")
    bob = await livekit_connect("bob", f"{room}-b")
    dave = await livekit_connect("dave", f"{room}-b")
    carol_got, bob_got = Events(carol, "data_received"), Events(bob, "data_received")
    await sees(bob, "dave")
    assert set(bob.remote_participants) == {"dave"}

    await alice.local_participant.publish_data(b"only room-a")
    (packet,) = await carol_got.next("data_received")
    assert packet.data == b"only room-a"
    await dave.local_participant.publish_data(b"only room-b")
    (packet,) = await bob_got.next("data_received")
    assert packet.data == b"only room-b" and bob_got.pending() == []
    assert {p.identity for p in await livekit_server.list_participants(f"{room}-b")} == {"bob", "dave"}


async def test_bad_token_is_refused(livekit_server: LiveKitServer, room: str) -> None:
    from tests.livekit import mint_token

    forged = mint_token(livekit_server.api_key, "not-the-secret-not-the-secret-xx", "mallory", room)
    lk_room = rtc.Room()
    with pytest.raises(rtc.ConnectError):
        await lk_room.connect(livekit_server.url, forged, rtc.RoomOptions(connect_timeout=5))
    assert await livekit_server.list_participants(room) == []
