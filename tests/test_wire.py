"""The nats-py internals room_ledger/_wire.py relies on, one test each against the real nats-server:
a nats-py upgrade that changes one fails here, and only here."""

from __future__ import annotations

import asyncio
import contextlib
import inspect

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import api as js_api

from room_ledger import _wire
from room_ledger import events as ev
from room_ledger.client import Ledger, ack_position
from room_ledger.settings import Settings


async def _connect(settings: Settings) -> NatsClient:
    assert settings.nats_urls is not None  # the session's NATS (tests/conftest.py)
    nc: NatsClient = await nats.connect(list(settings.nats_urls))
    return nc


def test_the_internals_exist_with_the_shapes_used() -> None:
    assert inspect.iscoroutinefunction(NatsClient._send_command)
    assert inspect.iscoroutinefunction(NatsClient._flush_pending)
    # Called as self._parse_header_lines(raw): a static method, replaced on the instance.
    assert isinstance(inspect.getattr_static(NatsClient, "_parse_header_lines"), staticmethod)
    assert list(inspect.signature(NatsClient._parse_header_lines).parameters) == ["raw"]
    assert list(inspect.signature(NatsClient._process_msg).parameters) == [
        "self", "sid", "subject", "reply", "data", "headers"]


async def test_send_raw_writes_framed_commands(settings: Settings) -> None:
    nc = await _connect(settings)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        header = b"NATS/1.0\r\nNats-Msg-Id: abc\r\n\r\n"
        payload = b"hello"
        frame = b"HPUB %s %d %d\r\n%s%s\r\n" % (inbox.encode(), len(header), len(header) + len(payload), header,
                                                 payload)
        await _wire.send_raw(nc, frame * 2)
        got = [await sub.next_msg(timeout=5) for _ in range(2)]
        assert [(m.data, (m.headers or {}).get("Nats-Msg-Id")) for m in got] == [(b"hello", "abc")] * 2
    finally:
        await nc.close()


async def test_lazy_headers_replace_the_parser_of_one_connection(settings: Settings) -> None:
    nc = await _connect(settings)
    other = await _connect(settings)
    try:
        _wire.lazy_headers(nc)
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.flush()  # the server has the subscription before the other connection publishes
        await other.publish(inbox, b"x", headers={"Nats-Msg-Id": "id-1", "X-Other": "two words"})
        msg = await sub.next_msg(timeout=5)
        assert isinstance(msg.headers, _wire.LazyHeaders)
        assert msg.headers == {"Nats-Msg-Id": "id-1", "X-Other": "two words"}
        # The other connection keeps nats-py's own parser.
        inbox2 = other.new_inbox()
        sub2 = await other.subscribe(inbox2)
        await other.flush()
        await nc.publish(inbox2, b"y", headers={"A": "b"})
        # Sent now, not when nc's flusher task gets its turn (once, late in a loaded full run, the
        # message had not arrived within 5 s).
        await nc.flush()
        msg2 = await sub2.next_msg(timeout=5)
        assert not isinstance(msg2.headers, _wire.LazyHeaders) and msg2.headers == {"A": "b"}
    finally:
        await nc.close()
        await other.close()


async def test_fast_path_takes_jetstream_deliveries_of_its_subscriptions(ledger: Ledger, room: str) -> None:
    position = await ledger.append(ev.make_event(room, ev.AgentStatus(agent_id="a", status="idle"),
                                                 sender=ev.Sender("a", "agent")))
    nc, stream = ledger.connection.nc, ledger.settings.stream
    info = await ledger.connection.js.add_consumer(stream, js_api.ConsumerConfig(
        filter_subject=ledger.subjects.room(room), ack_policy=js_api.AckPolicy.NONE, inactive_threshold=30.0))
    inbox = nc.new_inbox()
    slow: list[Msg] = []
    fast: list[tuple[bytes, bytes, bytes]] = []
    arrived = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        slow.append(msg)

    def on_delivery(subject: bytes, reply: bytes, data: bytes) -> None:
        fast.append((subject, reply, data))
        arrived.set()

    sub = await nc.subscribe(inbox, cb=on_msg)
    _wire.fast_path(nc)[_wire.subscription_id(sub)] = on_delivery
    try:
        await nc.publish(f"{js_api.DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{info.name}", b'{"batch":1}',
                         reply=inbox)
        await asyncio.wait_for(arrived.wait(), 5)
        (subject, reply, data), = fast
        assert subject.decode().startswith(ledger.subjects.room(room).rstrip(">"))
        assert reply.startswith(b"$JS.ACK.") and ack_position(reply.decode())[0] == position.seq
        assert ev.decode(data).room == room
        assert slow == []  # the delivery did not also take the general path
    finally:
        _wire.fast_path(nc).pop(_wire.subscription_id(sub), None)
        await sub.unsubscribe()
        await ledger.connection.js.delete_consumer(stream, info.name)


async def test_consumer_name_is_the_ordered_consumers_current_one(ledger: Ledger, room: str) -> None:
    await ledger.append(ev.make_event(room, ev.FloorRelease(agent_id="a")))
    arrived = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        arrived.set()

    sub = await ledger.connection.js.subscribe(ledger.subjects.room(room), stream=ledger.settings.stream,
                                    ordered_consumer=True, cb=on_msg)
    try:
        await asyncio.wait_for(arrived.wait(), 5)
        name = _wire.consumer_name(sub)
        assert name is not None
        assert (await ledger.connection.js.consumer_info(ledger.settings.stream, name)).name == name
    finally:
        await sub.unsubscribe()
    await ledger.connection.js.delete_consumer(ledger.settings.stream, name)


async def test_a_finished_read_leaves_no_consumer(ledger: Ledger, room: str) -> None:
    """Ordered consumers outlive their reader by seconds unless deleted: many short reads (log-only
    hydrations of large rooms) would count against the stream's consumer limit meanwhile."""
    await ledger.append_many(ev.make_event(room, ev.FloorRelease(agent_id=f"a{i}")) for i in range(3))

    async def consumers() -> set[str]:
        return {c.name for c in await ledger.connection.js.consumers_info(ledger.settings.stream)}

    before = await consumers()
    assert len([r async for r in ledger.read(room)]) == 3
    async with contextlib.aclosing(ledger.follow(room)) as follower:
        async for _ in follower:
            break  # a follow its reader stops
    # Other tests' readers may expire meanwhile (fewer), never more: these two left none.
    assert await consumers() <= before


async def test_server_info_is_the_servers_info(settings: Settings) -> None:
    """``Client._server_info``: what ``ledger doctor`` shows of the server (name, version, JetStream)."""
    nc = await _connect(settings)
    try:
        info = _wire.server_info(nc)
        assert info["version"] and info["jetstream"] is True and info["server_name"]
    finally:
        await nc.close()
