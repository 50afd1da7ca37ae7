"""The bridge writer on a real NATS: order, batching, two bridges, outages, SIGTERM leftovers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

from room_ledger import embedded
from room_ledger import events as ev
from room_ledger.bridge.stats import read_stats
from room_ledger.bridge.writer import BridgeWriter, spill_dir
from room_ledger.client import Ledger
from room_ledger.settings import Settings


def seed(agent: str, n: int) -> bytes:
    return json.dumps({"agent_id": agent, "status": "processing" if n % 2 else "idle",
                       "action_lock": n % 2 == 1, "task": f"t{n}"}).encode()


async def all_records(ledger: Ledger, room: str) -> list[ev.Event]:
    return [r.event async for r in ledger.read(room)]


async def test_events_are_written_in_order_with_counters_and_stats(ledger: Ledger, room: str,
                                                                   tmp_path: Path) -> None:
    writer = BridgeWriter(ledger, home=tmp_path, stats_interval=0.05)
    await writer.start()
    ingest = writer.ingest(room)
    ingest.participant_joined("a", kind="agent", sid="PA_a")
    for i in range(1200):
        ingest.data_packet(seed("a", i), topic="state", sender_identity="a")
    ingest.data_packet(b"\xff", topic="x", sender_identity="a")
    assert await writer.flush(30)
    events = await all_records(ledger, room)
    assert len(events) == 1202
    tasks = [e.body.task for e in events if isinstance(e, ev.AgentStatusEvent)]
    assert tasks == [f"t{i}" for i in range(1200)]
    c = writer.counters
    assert (c.typed, c.rejected, c.written, c.submitted) == (1201, 1, 1202, 1202)
    await writer.close()
    (stats,) = read_stats(tmp_path)
    assert stats["counters"]["written"] == 1202 and stats["alive"] is True
    assert stats["counters"]["reasons"] == {"invalid utf-8": 1}


async def test_two_bridges_in_one_room_store_each_sourced_event_once(settings: Settings, room: str,
                                                                     tmp_path: Path) -> None:
    async with Ledger(settings) as one, Ledger(settings) as two:
        writers = [BridgeWriter(one, home=tmp_path / "a"), BridgeWriter(two, home=tmp_path / "b")]
        for w in writers:
            await w.start()
        ingests = [w.ingest(room) for w in writers]
        for ingest in ingests:
            ingest.snapshot([])
            ingest.participant_joined("u", sid="PA_u")
            for i in range(50):
                ingest.data_packet(json.dumps({"type": "floor.request", "id": f"f{i}", "agent_id": "a"}).encode(),
                                   topic="ledger", sender_identity="a")
                ingest.text_stream(f"line {i}", topic="lk.chat", stream_id=f"ST_{i}", sender_identity="u")
            ingest.participant_left("u", sid="PA_u")
        await asyncio.gather(*(w.flush(30) for w in writers))
        events = await all_records(one, room)
        assert len(events) == 102 and len({e.id for e in events}) == 102
        assert sum(w.counters.duplicates for w in writers) == 102
        for w in writers:
            await w.close()


async def _paced(seconds: float, every: float, action: object) -> int:
    """Run ``action(i)`` every ``every`` seconds for ``seconds`` (a room producing events)."""
    count = 0
    end = time.monotonic() + seconds
    tick = asyncio.Event()
    while time.monotonic() < end:
        action(count)  # type: ignore[operator]
        count += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tick.wait(), every)
    return count


async def test_nats_stopped_for_10s_mid_room_loses_nothing(tmp_path: Path, room: str) -> None:
    home = tmp_path / "outage"
    server = embedded.ensure_nats(home)
    try:
        settings = Settings(nats_urls=(server.url,), home=home)
        async with Ledger(settings) as ledger:
            # a small memory buffer, so the outage also goes through the spill file
            writer = BridgeWriter(ledger, memory_limit=300, retry_max=0.5)
            await writer.start()
            ingest = writer.ingest(room)
            n = 0

            def produce(_: int) -> None:
                nonlocal n
                ingest.data_packet(seed("a", n), topic="state", sender_identity="a")
                n += 1

            for i in range(100):
                produce(i)
            assert await writer.flush(20)
            embedded.stop_nats(home)
            await _paced(10.0, 0.005, produce)  # 10 s of room traffic with NATS down
            assert writer.pending > 300 and writer.counters.spilled > 0
            assert any(spill_dir(home).glob("*.jsonl"))
            restarted = embedded.ensure_nats(home, port=server.port)
            assert restarted.port == server.port
            assert await writer.flush(60), f"{writer.pending} events still pending"
            events = await all_records(ledger, room)
            tasks = [e.body.task for e in events if isinstance(e, ev.AgentStatusEvent)]
            assert tasks == [f"t{i}" for i in range(n)]
            assert writer.counters.append_failures >= 1 and writer.nats_ok
            await writer.close()
            assert not any(spill_dir(home).glob("*.jsonl"))
    finally:
        embedded.stop_nats(home)


async def test_sigterm_deadline_saves_leftovers_for_the_next_bridge(tmp_path: Path, room: str) -> None:
    home = tmp_path / "term"
    server = embedded.ensure_nats(home)
    try:
        settings = Settings(nats_urls=(server.url,), home=home)
        async with Ledger(settings) as ledger:
            writer = BridgeWriter(ledger, memory_limit=50, retry_max=0.2)
            await writer.start()
            ingest = writer.ingest(room)
            ingest.data_packet(seed("a", 0), topic="s", sender_identity="a")
            assert await writer.flush(20)
            embedded.stop_nats(home)
            for i in range(1, 200):
                ingest.data_packet(seed("a", i), topic="s", sender_identity="a")
            started = time.monotonic()
            left = await writer.close(deadline=1.0)
            assert time.monotonic() - started < 5
            assert left == 199
            assert len(list(spill_dir(home).glob("*.jsonl"))) == 1
        embedded.ensure_nats(home, port=server.port)
        async with Ledger(settings) as ledger:
            successor = BridgeWriter(ledger)
            await successor.start()
            assert await successor.flush(30)
            events = await all_records(ledger, room)
            assert [e.body.task for e in events] == [f"t{i}" for i in range(200)]  # type: ignore[union-attr]
            await successor.close()
        assert not any(spill_dir(home).glob("*.jsonl"))
    finally:
        embedded.stop_nats(home)


async def test_a_live_bridges_spill_file_is_not_adopted(ledger: Ledger, tmp_path: Path) -> None:
    first = BridgeWriter(ledger, home=tmp_path, memory_limit=0)
    first._to_spill(ev.make_event("r", ev.BridgeLeft(bridge_id="x")))
    second = BridgeWriter(ledger, home=tmp_path)
    await second.start()
    assert second.spill_pending == 0 and first.spill_pending == 1
    await second.close()
    first._spill.remove()  # type: ignore[union-attr]
