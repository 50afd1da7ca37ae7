"""The Ledger client against a real nats-server: append, dedup, conditions, read, follow."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from room_ledger import embedded
from room_ledger import events as ev
from room_ledger.client import ATOMIC_BATCH_SIZE, Ledger, Position, Record
from room_ledger.errors import (
    ConflictError,
    ConnectError,
    EventError,
    EventTooLarge,
    StreamConfigError,
    UnknownRoom,
)
from room_ledger.settings import Settings


def status(room: str, agent: str, n: int, *, id: str | None = None) -> ev.KnownEvent:
    return ev.make_event(
        room,
        ev.AgentStatus(agent_id=agent, status="processing", action_lock=n % 2 == 0, task=f"task {n}"),
        id=id,
        sender=ev.Sender(agent, "agent"),
    )


async def collect(ledger: Ledger, room: str, **kwargs: object) -> list[Record]:
    return [record async for record in ledger.read(room, **kwargs)]  # type: ignore[arg-type]


async def test_append_then_read_in_order(ledger: Ledger, room: str) -> None:
    sent = [status(room, "a", i) for i in range(5)]
    positions = [await ledger.append(e) for e in sent]
    assert [p.seq for p in positions] == sorted(p.seq for p in positions)
    records = await collect(ledger, room)
    assert [r.event for r in records] == sent
    assert [r.seq for r in records] == [p.seq for p in positions]
    assert all(r.subject == f"ledger.{room}.agent" for r in records)
    assert await ledger.room_last_seq(room) == positions[-1].seq


async def test_same_id_is_stored_once_and_reported_duplicate(ledger: Ledger, room: str) -> None:
    event = status(room, "a", 1)
    first = await ledger.append(event)
    again = await ledger.append(event)
    assert again.duplicate and again.seq == first.seq
    assert len(await collect(ledger, room)) == 1


async def test_append_many_keeps_order_and_acknowledges_every_event(ledger: Ledger, room: str) -> None:
    other = room + "-other"
    sent = [status(room if i % 3 else other, "a", i) for i in range(1_234)]
    positions = await ledger.append_many(sent)
    assert len(positions) == len(sent)
    assert [p.seq for p in positions] == list(range(positions[0].seq, positions[0].seq + len(sent)))
    mine = await collect(ledger, room)
    assert [r.event for r in mine] == [e for e in sent if e.room == room]


async def test_append_many_takes_events_already_encoded(ledger: Ledger, room: str) -> None:
    sent = [status(room, "a", i) for i in range(20)]
    positions = await ledger.append_many(sent, payloads=[ev.encode(e) for e in sent])
    assert [r.event for r in await collect(ledger, room)] == sent
    assert len(positions) == 20
    with pytest.raises(ValueError, match="2 payloads for 3 events"):
        await ledger.append_many(sent[:3], payloads=[b"{}", b"{}"])
    bad = ev.make_event(room, sent[0].body, id="has space")
    with pytest.raises(EventError, match="not usable"):
        await ledger.append_many([bad], payloads=[ev.encode(bad)])


@pytest.mark.parametrize("count", [ATOMIC_BATCH_SIZE + 1, 2 * ATOMIC_BATCH_SIZE + 1])
async def test_append_many_with_a_batch_of_one_at_the_tail(ledger: Ledger, room: str, count: int) -> None:
    # One more than a batch: the last atomic batch holds one event and must be acknowledged too.
    sent = [status(room, "a", i) for i in range(count)]
    positions = await asyncio.wait_for(ledger.append_many(sent, atomic=True), 30)
    assert len(positions) == count and not any(p.duplicate for p in positions)
    assert [r.event for r in await collect(ledger, room)] == sent


async def test_a_batch_the_server_finds_too_large_is_stored_anyway_and_batches_shrink(
        ledger: Ledger, room: str) -> None:
    # nats-server takes at most 1,000 messages per atomic batch; a client asking for more (as
    # against a server configured lower) gets the batch refused, nothing of it stored.
    ledger._log.atomic_batch_size = 1_500
    sent = [status(room, "a", i) for i in range(2_000)]
    positions = await asyncio.wait_for(ledger.append_many(sent, atomic=True), 60)
    assert len(positions) == 2_000 and not any(p.duplicate for p in positions)
    assert [r.event for r in await collect(ledger, room)] == sent
    assert ledger.atomic_batch_size <= 750


async def test_append_many_retry_stores_each_event_once(ledger: Ledger, room: str) -> None:
    first = [status(room, "a", i) for i in range(600)]
    await ledger.append_many(first[:250])
    # A retry overlapping what was stored, plus new events: duplicates reported, the rest stored.
    positions = await ledger.append_many(first)
    assert [p.duplicate for p in positions] == [True] * 250 + [False] * 350
    records = await collect(ledger, room)
    assert [r.event.id for r in records] == [e.id for e in first]


async def test_conditional_append_conflicts_when_the_room_moved(ledger: Ledger, room: str) -> None:
    assert await ledger.room_last_seq(room) == 0
    claim = ev.make_event(room, ev.FloorRequest(agent_id="a"))
    first = await ledger.append(claim, expect_room_seq=0)
    await ledger.append(status(room, "b", 1))
    late = ev.make_event(room, ev.FloorRequest(agent_id="c"))
    with pytest.raises(ConflictError) as caught:
        await ledger.append(late, expect_room_seq=first.seq)
    assert caught.value.expected == first.seq
    # Scoped to the floor category, the status event in between does not count.
    position = await ledger.append(late, expect_room_seq=first.seq, expect_category="floor")
    assert position.seq > first.seq


async def test_read_filters_by_range_and_type(ledger: Ledger, room: str) -> None:
    await ledger.append(ev.make_event(room, ev.FloorRequest(agent_id="a")))
    positions = [await ledger.append(status(room, "a", i)) for i in range(4)]
    await ledger.append(ev.make_event(room, ev.FloorRelease(agent_id="a")))
    window = await collect(ledger, room, after=positions[0].seq, until=positions[2].seq)
    assert [r.seq for r in window] == [positions[1].seq, positions[2].seq]
    floor = await collect(ledger, room, types=["floor.*"])
    assert [r.type for r in floor] == ["floor.request", "floor.release"]
    mixed = await collect(ledger, room, types=["floor.release", "agent.*"])
    assert [r.type for r in mixed] == ["agent.status"] * 4 + ["floor.release"]


async def test_read_from_wall_clock_time(ledger: Ledger, room: str) -> None:
    await ledger.append(status(room, "a", 0))
    records = await collect(ledger, room)
    cut = records[0].time + timedelta(microseconds=1)
    later = await ledger.append(status(room, "a", 1))
    since = await collect(ledger, room, since_time=cut)
    assert [r.seq for r in since] == [later.seq]
    assert await collect(ledger, room, since_time=datetime.now(UTC) + timedelta(hours=1)) == []


async def test_read_of_empty_room_returns_nothing(ledger: Ledger, room: str) -> None:
    assert await collect(ledger, room) == []
    with pytest.raises(UnknownRoom):
        await ledger.require_room(room)


async def test_unknown_room_suggests_close_names(ledger: Ledger, room: str) -> None:
    await ledger.append(status(room, "a", 0))
    with pytest.raises(UnknownRoom) as caught:
        await ledger.require_room(room + "x")
    assert room in caught.value.close_matches
    assert room in await ledger.rooms.names()


async def test_odd_room_names_are_separate_rooms(ledger: Ledger, room: str) -> None:
    names = [f"{room}.a", f"{room} a", f"{room}*", f"{room}>", f"{room}~2Ea", f"{room}-é🙂"]
    for name in names:
        await ledger.append(status(name, "a", 0))
    for name in names:
        records = await collect(ledger, name)
        assert [r.room for r in records] == [name]


async def test_event_over_the_size_limit_is_refused_before_sending(ledger: Ledger, room: str) -> None:
    huge = ev.make_event(room, ev.Data(topic="x", text="x" * (ledger.settings.max_msg_size + 1)))
    with pytest.raises(EventTooLarge, match="over the stream's limit"):
        await ledger.append(huge)
    with pytest.raises(EventTooLarge):
        await ledger.append_many([status(room, "a", 0), huge])
    assert await collect(ledger, room) == []


async def test_follow_gives_history_then_live_without_gap(ledger: Ledger, room: str) -> None:
    history = [await ledger.append(status(room, "a", i)) for i in range(3)]
    seen: list[int] = []
    done = asyncio.Event()

    async def follower() -> None:
        async for record in ledger.follow(room, after=history[0].seq):
            seen.append(record.seq)
            if len(seen) == 5:
                done.set()
                return

    task = asyncio.create_task(follower())
    live = [await ledger.append(status(room, "a", i)) for i in range(3, 6)]
    await asyncio.wait_for(done.wait(), 10)
    await task
    assert seen == [p.seq for p in history[1:]] + [p.seq for p in live]


async def test_stream_is_reconciled_with_settings(settings: Settings) -> None:
    async with Ledger(settings) as client:
        info = await client.stream.info()
        assert info.config.duplicate_window == pytest.approx(120)
        assert info.config.allow_atomic
        assert client.stream.differences(info.config) == {}


async def test_unreachable_nats_names_the_url_and_the_way_out(tmp_path: Path) -> None:
    settings = Settings(nats_urls=("nats://127.0.0.1:1",), home=tmp_path)
    with pytest.raises(ConnectError, match=r"cannot reach NATS at nats://127.0.0.1:1.*unset LEDGER_NATS_URL"):
        async with Ledger(settings):
            pass


async def test_follow_survives_a_nats_restart(tmp_path: Path, room: str) -> None:
    home = tmp_path / "restart"
    server = embedded.ensure_nats(home)
    try:
        settings = Settings(nats_urls=(server.url,), home=home)
        async with Ledger(settings) as client:
            before = [await client.append(status(room, "a", i)) for i in range(3)]
            seen: list[int] = []
            got_history = asyncio.Event()
            got_all = asyncio.Event()

            async def follower() -> None:
                async for record in client.follow(room):
                    seen.append(record.seq)
                    if len(seen) == 3:
                        got_history.set()
                    if len(seen) == 6:
                        got_all.set()
                        return

            task = asyncio.create_task(follower())
            await asyncio.wait_for(got_history.wait(), 10)
            embedded.stop_nats(home)
            restarted = embedded.ensure_nats(home, port=server.port)
            assert restarted.port == server.port
            after = []
            for i in range(3, 6):
                after.append(await _retry_append(client, status(room, "a", i)))
            await asyncio.wait_for(got_all.wait(), 30)
            await task
            assert seen == [p.seq for p in before + after]
    finally:
        embedded.stop_nats(home)


async def _retry_append(client: Ledger, event: ev.KnownEvent) -> Position:
    # The client reconnects by itself; an append during the reconnect may time out and is
    # safe to retry because the event id makes it idempotent.
    for _ in range(50):
        try:
            return await client.append(event)
        except Exception:
            await asyncio.sleep(0.2)
    raise AssertionError("NATS did not come back")


async def test_existing_stream_is_updated_to_the_configured_settings(settings: Settings) -> None:
    name = f"UPD_{uuid.uuid4().hex[:8]}"
    prefix = f"upd{uuid.uuid4().hex[:8]}"
    custom = settings.replace(stream=name, subject_prefix=prefix)
    async with Ledger(custom) as client:
        await client.connection.js.update_stream(
            name=name,
            subjects=[f"{prefix}.>"],
            duplicate_window=600,
            allow_atomic=True,
            allow_direct=True,
            max_msg_size=custom.max_msg_size,
        )
        assert client.stream.differences((await client.stream.info()).config)
        await client.stream.ensure()
        info = await client.stream.info()
        assert info.config.duplicate_window == pytest.approx(120)
        assert client.stream.differences(info.config) == {}
        await client.stream.delete()


async def test_subjects_taken_by_another_stream_fail_clearly(settings: Settings) -> None:
    prefix = f"ovl{uuid.uuid4().hex[:8]}"
    async with Ledger(settings) as client:
        await client.connection.js.add_stream(name=f"OTHER_{prefix}", subjects=[f"{prefix}.>"])
        try:
            with pytest.raises(StreamConfigError, match="another stream already holds these subjects"):
                async with Ledger(settings.replace(stream=f"MINE_{prefix}", subject_prefix=prefix)):
                    pass
        finally:
            await client.connection.js.delete_stream(f"OTHER_{prefix}")


async def test_event_ids_that_would_break_headers_are_refused(ledger: Ledger, room: str) -> None:
    with pytest.raises(EventError, match="not usable"):
        await ledger.append(status(room, "a", 0, id="bad\r\nNats-Msg-Id: x"))


async def test_head_and_read_all_skip_a_purged_tail(ledger: Ledger, room: str) -> None:
    """After the newest room is purged, the stream's last sequence names no stored message:
    readers that waited for it would wait forever."""
    kept = await ledger.append(status(room, "a", 0))
    await ledger.append_many([status(room + "-tail", "a", i) for i in range(3)])
    assert await ledger.rooms.purge(room + "-tail") == 3
    assert await ledger.head() >= kept.seq
    records = await asyncio.wait_for(_collect_all(ledger, after=kept.seq - 1), 10)
    assert records[0].seq == kept.seq
    assert all(r.room != room + "-tail" for r in records)


async def _collect_all(ledger: Ledger, *, after: int) -> list[Record]:
    return [record async for record in ledger.read_all(after=after)]


async def test_read_recent_equals_read_without_a_consumer(ledger: Ledger, room: str) -> None:
    sent = []
    for i in range(7):
        sent.append(status(room, "a", i))
        sent.append(status(room + "-other", "b", i))
    positions = await ledger.append_many(sent)
    after = positions[2].seq
    expected = await collect(ledger, room, after=after)
    # A batch of 2 makes the read page through several direct-get requests.
    recent = await ledger.read_recent(room, after=after, batch=2)
    assert [(r.seq, r.subject, r.time, r.event) for r in recent] == [
        (r.seq, r.subject, r.time, r.event) for r in expected
    ]
    assert await ledger.read_recent(room, after=positions[-1].seq) == []


async def test_a_stream_is_never_repointed_at_other_subjects(settings: Settings) -> None:
    name = f"PIN_{uuid.uuid4().hex[:8]}"
    first, second = f"p{uuid.uuid4().hex[:8]}", f"q{uuid.uuid4().hex[:8]}"
    async with Ledger(settings.replace(stream=name, subject_prefix=first)) as owner:
        with pytest.raises(StreamConfigError, match="set LEDGER_SUBJECT_PREFIX to match"):
            async with Ledger(settings.replace(stream=name, subject_prefix=second)):
                pass
        assert (await owner.stream.info()).config.subjects == [f"{first}.>"]
        await owner.stream.delete()
