"""The loopback SFU, exercised by real ``livekit.rtc`` participants (run with ``pytest -m livekit``)."""

from __future__ import annotations

import asyncio

import pytest
from livekit import rtc

from tests.livekit_sfu import Events

pytestmark = pytest.mark.livekit


async def test_connect_and_reliable_data(livekit_connect, livekit_server):
    """Smoke test: catches protocol drift when the livekit SDK is upgraded."""
    alice = await livekit_connect("alice", "smoke")
    bob = await livekit_connect("bob", "smoke")
    got = Events(bob, "data_received")

    await alice.local_participant.publish_data(b"hello", topic="greetings")

    (packet,) = await got.next("data_received")
    assert packet.data == b"hello"
    assert packet.topic == "greetings"
    assert packet.kind == rtc.DataPacketKind.KIND_RELIABLE
    assert packet.participant.identity == "alice"
    assert packet.participant.sid == alice.local_participant.sid
    assert alice.local_participant.sid.startswith("PA_") and (await alice.sid).startswith("RM_")
    assert set(alice.remote_participants) == {"bob"} and set(bob.remote_participants) == {"alice"}
    assert {p.identity for p in await livekit_server.list_participants("smoke")} == {"alice", "bob"}


async def test_lossy_data_and_destinations(livekit_connect, livekit_server):
    alice = await livekit_connect("alice", "dest")
    bob = await livekit_connect("bob", "dest")
    carol = await livekit_connect("carol", "dest")
    bob_got, carol_got = Events(bob, "data_received"), Events(carol, "data_received")

    await alice.local_participant.publish_data(b"lossy", reliable=False, topic="t1")
    for got in (bob_got, carol_got):
        (packet,) = await got.next("data_received")
        assert (packet.data, packet.topic, packet.kind) == (b"lossy", "t1", rtc.DataPacketKind.KIND_LOSSY)

    await alice.local_participant.publish_data(b"for bob", topic="t2", destination_identities=["bob"])
    (packet,) = await bob_got.next("data_received")
    assert (packet.data, packet.topic, packet.participant.identity) == (b"for bob", "t2", "alice")
    # The server picks every recipient of a packet at once: carol got the broadcast only.
    assert await livekit_server.delivered("dest", "carol") == 1
    assert carol_got.pending() == []


async def test_rpc_between_participants(livekit_connect):
    alice = await livekit_connect("alice", "rpc")
    bob = await livekit_connect("bob", "rpc")

    @alice.local_participant.register_rpc_method("echo")
    async def echo(data: rtc.RpcInvocationData) -> str:
        return f"{data.caller_identity}:{data.payload}"

    assert await bob.local_participant.perform_rpc(
        destination_identity="alice", method="echo", payload="ping") == "bob:ping"


async def test_text_stream_on_lk_transcription_with_attributes(livekit_connect):
    alice = await livekit_connect("alice", "text")
    bob = await livekit_connect("bob", "text")
    received: asyncio.Queue[tuple[str, str, dict[str, str]]] = asyncio.Queue()

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


async def test_byte_stream(livekit_connect):
    alice = await livekit_connect("alice", "bytes")
    bob = await livekit_connect("bob", "bytes")
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


async def test_attributes_metadata_and_name(livekit_connect):
    alice = await livekit_connect("alice", "attrs", attributes={"role": "caller"})
    bob = await livekit_connect("bob", "attrs")
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


async def test_room_metadata(livekit_connect, livekit_server):
    alice = await livekit_connect("alice", "meta")
    events = Events(alice, "room_metadata_changed")
    await livekit_server.set_room_metadata("meta", "v1")
    _old, new = await events.next("room_metadata_changed")
    assert new == "v1" and alice.metadata == "v1"
    late = await livekit_connect("late", "meta")
    assert late.metadata == "v1"


async def test_join_and_leave(livekit_connect, livekit_server):
    alice = await livekit_connect("alice", "joins")
    events = Events(alice, "participant_connected", "participant_disconnected")
    bob = await livekit_connect("bob", "joins", name="Bob", metadata="m", kind="agent")

    (joined,) = await events.next("participant_connected")
    assert (joined.identity, joined.name, joined.metadata) == ("bob", "Bob", "m")
    assert joined.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT

    await bob.disconnect()
    (left,) = await events.next("participant_disconnected")
    assert left.identity == "bob" and "bob" not in alice.remote_participants
    assert [p.identity for p in await livekit_server.list_participants("joins")] == ["alice"]


async def test_hidden_participant_sees_everything_and_is_seen_by_no_one(livekit_connect, livekit_server):
    alice = await livekit_connect("alice", "hidden")
    alice_events = Events(alice, "participant_connected", "data_received")
    spy = await livekit_connect("spy", "hidden", hidden=True)
    spy_data = Events(spy, "data_received")
    assert set(spy.remote_participants) == {"alice"}

    # Signal messages are ordered: once alice hears of carol, she would have heard of spy.
    carol = await livekit_connect("carol", "hidden")
    (first,) = await alice_events.next("participant_connected")
    assert first.identity == "carol"
    assert set(alice.remote_participants) == {"carol"} and set(carol.remote_participants) == {"alice"}
    assert "spy" in {p.identity for p in await livekit_server.list_participants("hidden")}

    await carol.local_participant.publish_data(b"psst", topic="t")
    (packet,) = await spy_data.next("data_received")
    assert (packet.data, packet.participant.identity) == (b"psst", "carol")

    await spy.local_participant.publish_data(b"from the shadows")
    (packet,) = await alice_events.next("data_received", lambda p: p.data == b"from the shadows")
    assert packet.participant is None  # unknown to alice, as with LiveKit


async def test_data_permissions(livekit_connect, livekit_server):
    mute = await livekit_connect("mute", "perms", can_publish_data=False)
    deaf = await livekit_connect("deaf", "perms", can_subscribe=False)
    bob = await livekit_connect("bob", "perms")
    bob_got = Events(bob, "data_received")

    dropped = await livekit_server.dropped()
    await mute.local_participant.publish_data(b"ignored")
    await livekit_server.wait_until(lambda sfu: sfu.refused > dropped)  # refused, not forwarded
    await deaf.local_participant.publish_data(b"heard")
    (packet,) = await bob_got.next("data_received")
    assert packet.data == b"heard"
    assert bob_got.pending() == []
    assert await livekit_server.delivered("perms", "deaf") == 0


async def test_kick(livekit_connect, livekit_server):
    alice = await livekit_connect("alice", "kick")
    bob = await livekit_connect("bob", "kick")
    alice_events, bob_events = Events(alice, "disconnected"), Events(bob, "participant_disconnected")

    await livekit_server.kick("kick", "alice")

    (reason,) = await alice_events.next("disconnected")
    assert reason == rtc.DisconnectReason.PARTICIPANT_REMOVED
    (left,) = await bob_events.next("participant_disconnected")
    assert left.identity == "alice"


@pytest.mark.parametrize("fault", ["force_reconnect", "drop_signal"])
async def test_reconnect(livekit_connect, livekit_server, fault):
    alice = await livekit_connect("alice", f"re-{fault}")
    bob = await livekit_connect("bob", f"re-{fault}")
    alice_events = Events(alice, "reconnecting", "reconnected")
    bob_events = Events(bob, "participant_connected", "data_received")
    old_sid = alice.local_participant.sid

    await getattr(livekit_server, fault)(f"re-{fault}", "alice")

    await alice_events.next("reconnecting")
    await alice_events.next("reconnected")
    (now,) = [p for p in await livekit_server.list_participants(f"re-{fault}") if p.identity == "alice"]
    assert now.sid != old_sid  # a full reconnect: a new session
    (back,) = await bob_events.next("participant_connected", lambda p: p.sid != old_sid)
    assert back.identity == "alice"
    await alice.local_participant.publish_data(b"back")
    (packet,) = await bob_events.next("data_received")
    assert (packet.data, packet.participant.identity) == (b"back", "alice")


async def test_rooms_are_isolated(livekit_connect, livekit_server):
    alice = await livekit_connect("alice", "room-a")
    carol = await livekit_connect("carol", "room-a")
    bob = await livekit_connect("bob", "room-b")
    carol_got = Events(carol, "data_received")
    assert set(bob.remote_participants) == set()

    await alice.local_participant.publish_data(b"only room-a")
    (packet,) = await carol_got.next("data_received")
    assert packet.data == b"only room-a"
    assert await livekit_server.delivered("room-b", "bob") == 0
    assert {p.identity for p in await livekit_server.list_participants("room-b")} == {"bob"}


async def test_bad_token_is_refused(livekit_server):
    from tests.livekit_sfu import mint_token

    forged = mint_token(livekit_server.api_key, "not-the-secret-not-the-secret-xx", "mallory", "bad")
    room = rtc.Room()
    with pytest.raises(rtc.ConnectError):
        await room.connect(livekit_server.url, forged, rtc.RoomOptions(connect_timeout=5))
    assert await livekit_server.list_participants("bad") == []
