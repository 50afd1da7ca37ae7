"""StreamFeed, the projector's reader, against a real nats-server: order, each message once, and
recovery from a lost delivery, a deleted consumer and a restarted server."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time

from room_ledger import _wire, embedded
from room_ledger import events as ev
from room_ledger.client import Ledger
from room_ledger.feed import Delivery, StreamFeed
from room_ledger.settings import Settings
from tests.conftest import fresh_home


def status(room: str, n: int) -> ev.KnownEvent:
    return ev.make_event(room, ev.AgentStatus(agent_id="a", status="processing", task=f"task {n}"),
                         sender=ev.Sender("a", "agent"))


async def take_until(feed: StreamFeed, last_seq: int, *, timeout: float = 30.0) -> list[Delivery]:
    taken: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while not taken or taken[-1].seq < last_seq:
        assert time.monotonic() < deadline, f"feed stopped at {taken[-1].seq if taken else None} of {last_seq}"
        taken.extend(await feed.take(700, 1.0))
    return taken


async def test_feed_hands_out_every_message_once_in_stream_order(ledger: Ledger, room: str) -> None:
    start = await ledger.head()
    positions = await ledger.append_many([status(f"{room}-{i % 7}", i) for i in range(3_000)])
    # A window far smaller than the backlog: the feed has to ask again and again.
    async with StreamFeed(ledger, ledger.subjects.all_rooms(), after=start, window=400) as feed:
        taken = await take_until(feed, positions[-1].seq)
    ours = [d for d in taken if d.subject.startswith(f"ledger.{room}-")]
    assert [d.seq for d in ours] == [p.seq for p in positions]
    assert [d.seq for d in taken] == sorted({d.seq for d in taken})
    read = [r async for r in ledger.read(f"{room}-3")]
    by_seq = {d.seq: d for d in ours}
    assert all(by_seq[r.seq].time == r.time and ev.decode(by_seq[r.seq].data) == r.event for r in read)


async def test_a_lost_delivery_is_noticed_and_read_again(ledger: Ledger, room: str) -> None:
    start = await ledger.head()
    positions = await ledger.append_many([status(room, i) for i in range(500)])
    feed = StreamFeed(ledger, ledger.subjects.all_rooms(), after=start, window=200)
    delivered = feed._on_delivery
    calls = 0

    def lose_the_tenth(subject: bytes, reply: bytes, data: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls != 10:
            delivered(subject, reply, data)

    feed._on_delivery = lose_the_tenth  # type: ignore[method-assign]
    async with feed:
        taken = await take_until(feed, positions[-1].seq)
    assert feed.restarts >= 1
    assert [d.seq for d in taken if d.subject.startswith(f"ledger.{room}.")] == [p.seq for p in positions]


async def test_a_deleted_consumer_is_replaced_without_loss(ledger: Ledger, room: str) -> None:
    start = await ledger.head()
    first = await ledger.append_many([status(room, i) for i in range(300)])
    async with StreamFeed(ledger, ledger.subjects.all_rooms(), after=start, window=100, heartbeat=0.5) as feed:
        taken = await take_until(feed, first[-1].seq)
        assert feed._consumer is not None
        await ledger.connection.js.delete_consumer(ledger.settings.stream, feed._consumer)
        more = await ledger.append_many([status(room, i) for i in range(300, 600)])
        taken += await take_until(feed, more[-1].seq)
        assert feed.restarts >= 1
    assert [d.seq for d in taken if d.subject.startswith(f"ledger.{room}.")] == [p.seq for p in first + more]


async def test_feed_goes_on_after_the_server_restarts() -> None:
    home = fresh_home("feed-restart")
    server = embedded.ensure_nats(home)
    try:
        settings = Settings(nats_urls=(server.url,), home=home)
        async with Ledger(settings) as ledger:
            before = await ledger.append_many([status("restart-room", i) for i in range(200)])
            async with StreamFeed(ledger, ledger.subjects.all_rooms(), window=100, heartbeat=0.5) as feed:
                taken = await take_until(feed, before[-1].seq)
                embedded.stop_nats(home)
                embedded.ensure_nats(home, port=server.port)
                deadline = time.monotonic() + 30
                while True:
                    # Back when the restarted server answers for the stream again.
                    with contextlib.suppress(Exception):
                        await ledger.stream.info()
                        break
                    assert time.monotonic() < deadline, "the stream did not come back"
                    await asyncio.sleep(0.1)
                after = await ledger.append_many([status("restart-room", i) for i in range(200, 400)])
                taken += await take_until(feed, after[-1].seq)
                assert feed.restarts >= 1
        assert [d.seq for d in taken] == [p.seq for p in before + after]
    finally:
        embedded.stop_nats(home)
        shutil.rmtree(home, ignore_errors=True)


async def test_feed_is_correct_without_its_fast_path(ledger: Ledger, room: str) -> None:
    # If nats-py stopped routing deliveries through the wrapped parser hook, they would reach the
    # subscription callback: slower, but every message still arrives once and in order.
    start = await ledger.head()
    positions = await ledger.append_many([status(room, i) for i in range(300)])
    async with StreamFeed(ledger, ledger.subjects.all_rooms(), after=start, window=100) as feed:
        _wire.fast_path(ledger.connection.nc).clear()
        taken = await take_until(feed, positions[-1].seq)
    assert [d.seq for d in taken if d.subject.startswith(f"ledger.{room}.")] == [p.seq for p in positions]
