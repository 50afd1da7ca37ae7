"""Bridge benchmark: room callback -> queue -> ingest -> writer -> JetStream acknowledgement.

No WebRTC: a stand-in room object emits ``data_received`` through the bridge's real callback code
(``bridge.room.RoomBridge``), so the measured path is the bridge's own: copy out, enqueue, classify,
batch, append. Beside it, in the same run and on the same server, a raw publish of the same event
payloads (pipelined JetStream publishes with ``Nats-Msg-Id``, every ack awaited).

Figures (median of ``--runs`` runs):
* ``bridge_eps`` / ``raw_eps``: events per second, callback (or first publish) to last ack;
* ``p50_ms`` / ``p99_ms``: latency callback -> ack at a steady 1,000 events/s.

Targets: bridge >= 0.8x raw, p99 <= 10 ms. Prints a table, then one JSON line.

    .venv/bin/python bench/bridge.py [--events 20000] [--runs 5] [--rate 1000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from livekit import rtc

from bench._common import print_json, raw_nats
from room_ledger import embedded
from room_ledger import events as ev
from room_ledger.bridge.room import RoomBridge
from room_ledger.bridge.worker import settle_heap
from room_ledger.bridge.writer import BridgeWriter
from room_ledger.client import MSG_ID, Ledger
from room_ledger.settings import Settings


class FakeParticipant:
    def __init__(self, identity: str) -> None:
        self.identity = identity
        self.kind = 4  # agent


class FakeRoom:
    """Just what RoomBridge.attach touches: ``on`` and the stream handler tables."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}
        self._text_stream_handlers: dict[str, Any] = {}
        self._byte_stream_handlers: dict[str, Any] = {}
        self.remote_participants: dict[str, Any] = {}
        self.metadata = ""

    def on(self, event: str, callback: Any) -> Any:
        self.handlers[event] = callback
        return callback

    def emit_data(self, data: bytes, topic: str, participant: FakeParticipant) -> None:
        self.handlers["data_received"](packet(data, topic, participant))


def packet(data: bytes, topic: str, participant: FakeParticipant) -> rtc.DataPacket:
    """What the SDK hands the callback (built before the clock starts: it is the SDK's work)."""
    return rtc.DataPacket(data=data, kind=rtc.DataPacketKind.KIND_RELIABLE,
                          participant=participant, topic=topic)  # type: ignore[arg-type]


def payload(i: int) -> bytes:
    return json.dumps({"agent_id": f"agent-{i % 3}", "status": "processing" if i % 2 else "idle",
                       "action_lock": i % 2 == 1, "task": f"task-{i}"}).encode()


async def bridge_run(settings: Settings, n: int) -> tuple[float, list[ev.KnownEvent]]:
    """Events/s through the bridge; returns the events it produced (for the raw baseline)."""
    room_name = f"bench-{uuid.uuid4().hex[:8]}"
    done = asyncio.Event()
    written: list[ev.KnownEvent] = []

    def on_ack(events: Any, positions: Any) -> None:
        written.extend(events)
        if len(written) >= n:
            done.set()

    async with Ledger(settings) as ledger:
        writer = BridgeWriter(ledger, stats_interval=0, on_ack=on_ack, memory_limit=n + 10)
        await writer.start()
        fake = FakeRoom()
        bridge = RoomBridge(fake, writer.ingest(room_name))  # type: ignore[arg-type]
        bridge.attach()
        who = FakeParticipant("agent-0")
        packets = [packet(payload(i), "state", who) for i in range(n)]
        on_data = fake.handlers["data_received"]
        started = time.perf_counter()
        for i, data_packet in enumerate(packets):
            on_data(data_packet)
            if i % 500 == 499:
                await asyncio.sleep(0)  # callbacks arrive from the SDK's loop, interleaved with the writer
        try:
            await asyncio.wait_for(done.wait(), 120)
        except TimeoutError:
            # Say where everything stands before failing: which stage holds the missing events.
            print(f"stalled: {len(written)} of {n} acknowledged; room queue {bridge._queue.qsize()}, "
                  f"writer pending {writer.pending}, nats_ok {writer.nats_ok}, counters {writer.counters}",
                  file=sys.stderr, flush=True)
            for task in asyncio.all_tasks():
                task.print_stack(limit=6, file=sys.stderr)
            raise
        elapsed = time.perf_counter() - started
        await bridge.close(left=False)
        await writer.close()
    return n / elapsed, written


async def raw_run(settings: Settings, events: list[ev.KnownEvent]) -> float:
    """The same payloads published straight to JetStream (new ids, same sizes), every ack awaited."""
    room_name = f"raw-{uuid.uuid4().hex[:8]}"
    async with Ledger(settings) as ledger, raw_nats(settings) as nc:
        subject = ledger.subjects.event(room_name, "agent.status")
        bodies = [ev.encode(ev.make_event(room_name, e.body, sender=e.sender)) for e in events]
        inbox = nc.new_inbox()
        remaining = len(bodies)
        finished = asyncio.Event()

        async def on_ack(msg: Any) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                finished.set()

        sub = await nc.subscribe(f"{inbox}.*", cb=on_ack)
        started = time.perf_counter()
        for i, body in enumerate(bodies):
            await nc.publish(subject, body, reply=f"{inbox}.{i}", headers={MSG_ID: uuid.uuid4().hex})
        await asyncio.wait_for(finished.wait(), 300)
        elapsed = time.perf_counter() - started
        await sub.unsubscribe()
    return len(bodies) / elapsed


async def latency_run(settings: Settings, rate: float, seconds: float) -> tuple[float, float, float]:
    """p50, p99, max latency (ms) callback -> ack at a steady ``rate`` events/s."""
    room_name = f"lat-{uuid.uuid4().hex[:8]}"
    sent: dict[str, float] = {}
    latencies: list[float] = []
    total = int(rate * seconds)
    done = asyncio.Event()

    def on_ack(events: Any, positions: Any) -> None:
        now = time.perf_counter()
        for e in events:
            task = getattr(e.body, "task", None)
            if task in sent:
                latencies.append((now - sent.pop(task)) * 1000)
        if len(latencies) >= total:
            done.set()

    async with Ledger(settings) as ledger:
        writer = BridgeWriter(ledger, stats_interval=0, on_ack=on_ack)
        await writer.start()
        fake = FakeRoom()
        bridge = RoomBridge(fake, writer.ingest(room_name))  # type: ignore[arg-type]
        bridge.attach()
        who = FakeParticipant("agent-1")
        start = time.perf_counter()
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent[f"task-{i}"] = time.perf_counter()
            fake.emit_data(payload(i), "state", who)
        await asyncio.wait_for(done.wait(), 60)
        await bridge.close(left=False)
        await writer.close()
    latencies.sort()
    return (statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1], latencies[-1])


async def raw_latency_run(settings: Settings, rate: float, seconds: float) -> tuple[float, float, float]:
    """The same pacing with direct publishes (no bridge): the server's own ack latency here."""
    room_name = f"rawlat-{uuid.uuid4().hex[:8]}"
    total = int(rate * seconds)
    sent: dict[str, float] = {}
    latencies: list[float] = []
    done = asyncio.Event()
    async with Ledger(settings) as ledger, raw_nats(settings) as nc:
        subject = ledger.subjects.event(room_name, "agent.status")
        inbox = nc.new_inbox()

        async def on_ack(msg: Any) -> None:
            latencies.append((time.perf_counter() - sent.pop(msg.subject.rsplit(".", 1)[1])) * 1000)
            if len(latencies) >= total:
                done.set()

        sub = await nc.subscribe(f"{inbox}.*", cb=on_ack)
        start = time.perf_counter()
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = ev.encode(ev.make_event(room_name, ev.AgentStatus(agent_id="a", status="idle", task=f"t{i}")))
            sent[str(i)] = time.perf_counter()
            await nc.publish(subject, body, reply=f"{inbox}.{i}", headers={MSG_ID: uuid.uuid4().hex})
        await asyncio.wait_for(done.wait(), 60)
        await sub.unsubscribe()
    latencies.sort()
    return (statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1], latencies[-1])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--nats-url", default=None, help="an existing NATS (default: a fresh embedded one)")
    parser.add_argument("--sync-always", action="store_true",
                        help="embedded NATS fsyncs every write (the embedded default; NATS's own default is off)")
    args = parser.parse_args()

    # As `ledger bridge` does when it starts (bridge.worker.run_bridge).
    settle_heap()
    home = Path(tempfile.mkdtemp(prefix="bench-bridge-"))
    started_server = args.nats_url is None
    url = args.nats_url or embedded.ensure_nats(home, sync_always=args.sync_always).url
    settings = Settings(nats_urls=(url,), home=home, stream=f"BENCH_{uuid.uuid4().hex[:6]}",
                        subject_prefix=f"bench{uuid.uuid4().hex[:6]}")
    try:
        bridge_eps: list[float] = []
        raw_eps: list[float] = []
        for _ in range(args.runs):
            eps, events = await bridge_run(settings, args.events)
            bridge_eps.append(eps)
            raw_eps.append(await raw_run(settings, events))
        p50s, p99s, maxes, raw_p99s = [], [], [], []
        for _ in range(args.runs):
            # Each measurement starts without the garbage of the ones before it (the throughput
            # runs leave tens of thousands of objects for the collector).
            gc.collect()
            p50, p99, worst = await latency_run(settings, args.rate, args.seconds)
            p50s.append(p50)
            p99s.append(p99)
            maxes.append(worst)
            raw_p99s.append((await raw_latency_run(settings, args.rate, args.seconds))[1])
        async with Ledger(settings) as ledger:
            await ledger.stream.delete()
    finally:
        if started_server:
            embedded.stop_nats(home)
        shutil.rmtree(home, ignore_errors=True)

    figures = {"bridge_eps": round(statistics.median(bridge_eps)),
               "p50_ms": round(statistics.median(p50s), 3), "p99_ms": round(statistics.median(p99s), 3),
               "max_ms": round(statistics.median(maxes), 3)}
    baselines = {"raw_eps": round(statistics.median(raw_eps)), "raw_p99_ms": round(statistics.median(raw_p99s), 3)}
    figures["sync_always"] = args.sync_always
    ratios = {"bridge_over_raw": round(figures["bridge_eps"] / baselines["raw_eps"], 3)}
    targets = {"bridge_over_raw": ">= 0.8", "p99_ms": "<= 10"}
    met = {"bridge_over_raw": ratios["bridge_over_raw"] >= 0.8, "p99_ms": figures["p99_ms"] <= 10}

    print(f"bridge benchmark: {args.events} events x {args.runs} runs; latency at {args.rate:.0f}/s for "
          f"{args.seconds:.0f}s x {args.runs} runs (medians); NATS fsync every write: {args.sync_always}")
    rows = [
        ("bridge throughput (callback -> ack)", f"{figures['bridge_eps']:,} ev/s",
         " ".join(f"{x:,.0f}" for x in bridge_eps)),
        ("raw JetStream publish, same payloads", f"{baselines['raw_eps']:,} ev/s",
         " ".join(f"{x:,.0f}" for x in raw_eps)),
        ("bridge / raw", f"{ratios['bridge_over_raw']:.2f}x (target >= 0.8)", ""),
        ("latency p50 @ rate", f"{figures['p50_ms']:.2f} ms", " ".join(f"{x:.2f}" for x in p50s)),
        ("latency p99 @ rate", f"{figures['p99_ms']:.2f} ms (target <= 10)", " ".join(f"{x:.2f}" for x in p99s)),
        ("raw publish p99 @ rate (no bridge)", f"{baselines['raw_p99_ms']:.2f} ms",
         " ".join(f"{x:.2f}" for x in raw_p99s)),
        ("latency max @ rate", f"{figures['max_ms']:.2f} ms", " ".join(f"{x:.2f}" for x in maxes)),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, runs in rows:
        print(f"  {name:<{width}}  {value:<28}  runs: {runs}")
    print_json(figures=figures, baselines=baselines, ratios=ratios, targets=targets, met=met)


if __name__ == "__main__":
    asyncio.run(main())
