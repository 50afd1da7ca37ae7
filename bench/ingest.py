#!/usr/bin/env python
"""Ingest throughput: ``Ledger.append_many`` beside nats-py ``publish_async`` (Nats-Msg-Id), same run.

Both write the same encoded events (200 B to 2 KB: transcripts, statuses, conversation items,
session patches over 50 rooms) to the embedded nats-server with fsync on every write, the
ledger's default. Each figure is the median of ``--runs`` runs.

    python bench/ingest.py [--events 20000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nats
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import print_json
from room_ledger import embedded
from room_ledger import events as ev
from room_ledger.client import ATOMIC_BATCH_SIZE, Ledger
from room_ledger.settings import Settings

TARGET_EVENTS_PER_S = 30_000
TARGET_RATIO = 1.5


def realistic_events(count: int, run: int, rng: random.Random) -> list[ev.KnownEvent]:
    words = ["refund", "invoice", "account", "billing", "balance", "card", "payment", "please", "thanks", "transfer", "order", "number"]
    events: list[ev.KnownEvent] = []
    for i in range(count):
        room = f"bench-{run}-{i % 50}"
        agent = f"agent-{i % 3}"
        text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 250)))
        kind = i % 4
        body: ev.Body
        if kind == 0:
            body = ev.Transcript(speaker="caller", text=text, segment_id=f"seg-{i}", track_id="TR_x")
        elif kind == 1:
            body = ev.AgentStatus(agent_id=agent, status="processing", action_lock=True, task=text[:120])
        elif kind == 2:
            body = ev.ConversationItem(item_id=f"item_{i}", role="assistant", text=text, speaker=agent)
        else:
            body = ev.SessionPatch(patch={f"field_{j}": text[j * 10 : j * 10 + 30] for j in range(rng.randint(3, 20))})
        events.append(ev.make_event(room, body, sender=ev.Sender(agent, "agent")))
    return events


async def run_ledger(settings: Settings, events: list[ev.KnownEvent]) -> float:
    async with Ledger(settings) as ledger:
        started = time.perf_counter()
        positions = await ledger.append_many(events)
        elapsed = time.perf_counter() - started
    assert len(positions) == len(events) and not any(p.duplicate for p in positions)
    return len(events) / elapsed


async def run_publish_async(url: str, settings: Settings, events: list[ev.KnownEvent]) -> float:
    from room_ledger.subjects import Subjects

    subjects = Subjects(settings.subject_prefix)
    frames = [(subjects.event(e.room, e.type), ev.encode(e), e.id) for e in events]
    nc = await nats.connect(url)
    js = nc.jetstream()
    started = time.perf_counter()
    futures = [await js.publish_async(s, p, headers={"Nats-Msg-Id": i}) for s, p, i in frames]
    acks = await asyncio.gather(*futures)
    elapsed = time.perf_counter() - started
    await nc.close()
    assert len(acks) == len(events)
    return len(events) / elapsed


async def run_raw_atomic(url: str, settings: Settings, events: list[ev.KnownEvent]) -> float:
    """The fastest raw way we know: nats-py's core connection, atomic batches (of our size), each
    message published with its headers, one batch acknowledged before the next goes out."""
    from room_ledger.subjects import Subjects

    subjects = Subjects(settings.subject_prefix)
    frames = [(subjects.event(e.room, e.type), ev.encode(e), e.id) for e in events]
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    started = time.perf_counter()
    for start in range(0, len(frames), ATOMIC_BATCH_SIZE):
        batch = frames[start : start + ATOMIC_BATCH_SIZE]
        batch_id = uuid.uuid4().hex
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, max_msgs=2)
        for index, (subject, payload, event_id) in enumerate(batch):
            headers = {"Nats-Msg-Id": event_id, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(index + 1)}
            reply = inbox if index in (0, len(batch) - 1) else ""
            if index == len(batch) - 1:
                headers["Nats-Batch-Commit"] = "1"
            await nc.publish(subject, payload, reply=reply, headers=headers)
        await sub.next_msg(10)
        ack = await sub.next_msg(10)
        assert b'"error"' not in ack.data, ack.data
    elapsed = time.perf_counter() - started
    await nc.close()
    return len(events) / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(7)
    home = Path(tempfile.mkdtemp(prefix="ledger-bench-ingest-"))
    server = embedded.ensure_nats(home, sync_always=True)
    settings = Settings(nats_urls=(server.url,), home=home, stream=f"BENCH_{uuid.uuid4().hex[:6]}")
    ours: list[float] = []
    raw: list[float] = []
    atomic: list[float] = []
    sizes: list[int] = []
    try:
        async with Ledger(settings):
            pass  # creates the stream outside the timed part
        for run in range(args.runs):
            batch = realistic_events(args.events, run * 3, rng)
            sizes.extend(len(ev.encode(e)) for e in batch[:500])
            ours.append(await run_ledger(settings, batch))
            raw.append(await run_publish_async(server.url, settings, realistic_events(args.events, run * 3 + 1, rng)))
            atomic.append(await run_raw_atomic(server.url, settings, realistic_events(args.events, run * 3 + 2, rng)))
    finally:
        embedded.stop_nats(home)
        shutil.rmtree(home, ignore_errors=True)
    median_ours = statistics.median(ours)
    median_raw = statistics.median(raw)
    median_atomic = statistics.median(atomic)
    ratio = median_ours / median_raw
    table = Table(title=f"ingest: {args.events} events x {args.runs} runs, fsync on every write (median)")
    for column in ("figure", "ours", "baseline", "ratio", "target", "met"):
        table.add_column(column)
    table.add_row(
        "append_many events/s",
        f"{median_ours:,.0f}",
        f"{median_raw:,.0f} (publish_async)",
        f"{ratio:.2f}x",
        f">= {TARGET_EVENTS_PER_S:,} and >= {TARGET_RATIO}x",
        "yes" if median_ours >= TARGET_EVENTS_PER_S and ratio >= TARGET_RATIO else "no",
    )
    table.add_row(
        "  reference: raw atomic batches",
        "",
        f"{median_atomic:,.0f} (nats-py core, {ATOMIC_BATCH_SIZE}/batch)",
        f"{median_ours / median_atomic:.2f}x",
        "-",
        "-",
    )
    console = Console(width=130)
    console.print(table)
    console.print(
        f"event sizes: {min(sizes)}-{max(sizes)} B, median {statistics.median(sizes):.0f} B; "
        f"runs ours={[round(x) for x in ours]} publish_async={[round(x) for x in raw]} "
        f"raw atomic={[round(x) for x in atomic]}"
    )
    print_json(
        figures={"append_many_events_per_s": round(median_ours)},
        baselines={
            "publish_async_events_per_s": round(median_raw),
            "raw_atomic_batches_events_per_s": round(median_atomic),
        },
        ratios={
            "append_many_vs_publish_async": round(ratio, 2),
            "append_many_vs_raw_atomic_batches": round(median_ours / median_atomic, 2),
        },
        targets={"append_many_events_per_s": TARGET_EVENTS_PER_S, "append_many_vs_publish_async": TARGET_RATIO},
        met={"append_many_events_per_s": median_ours >= TARGET_EVENTS_PER_S,
             "append_many_vs_publish_async": ratio >= TARGET_RATIO},
    )


if __name__ == "__main__":
    asyncio.run(main())
