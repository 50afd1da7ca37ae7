#!/usr/bin/env python
"""Large-payload ingest: 1 MB byte streams through the bridge beside a raw Object Store put, same run.

Ours: each payload arrives as 15,000-byte stream chunks (LiveKit's chunk size) and goes the
bridge's way: spooled to disk as it arrives (``bridge.room._read_spooled``), ingested as a
``data`` event, its object put into the payload bucket by ``BridgeWriter`` and then its event
appended and acknowledged. Baseline: nats-py ``ObjectStore.put`` of the same bytes into a bucket
of the same configuration on the same server. Both on the embedded nats-server with fsync on
every write (the ledger's default). Runs alternate ours/raw; figures are medians, the ratio is
the median of each run's ours/raw.

    python bench/objects.py [--payloads 40] [--size 1048576] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import print_json, print_table, raw_nats
from room_ledger import embedded
from room_ledger.bridge.room import _read_spooled
from room_ledger.bridge.writer import BridgeWriter
from room_ledger.client import Ledger
from room_ledger.settings import Settings

TARGET_RATIO = 0.8
CHUNK = 15_000


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    """The payload as a LiveKit stream delivers it: chunk by chunk, the loop free in between
    (the writer stores the previous payload meanwhile, as in a live room)."""
    for start in range(0, len(data), CHUNK):
        await asyncio.sleep(0)
        yield data[start:start + CHUNK]


async def ours(ledger: Ledger, home: Path, payloads: list[bytes], run: int) -> float:
    """Seconds from the first chunk to the last event acknowledged."""
    writer = BridgeWriter(ledger, home=home, stats_interval=0)
    await writer.start()
    ingest = writer.ingest(f"bench-objects-{run}-{uuid.uuid4().hex[:6]}")
    started = time.perf_counter()
    for i, data in enumerate(payloads):
        stream_id = f"s{run}-{i}"
        head, spooled, error = await _read_spooled(_chunks(data), ingest, stream_id, "files")
        ingest.byte_stream(head, topic="files", stream_id=stream_id, sender_identity="uploader",
                           spooled=spooled, error=error)
    assert await writer.flush(600), "the writer did not finish"
    seconds = time.perf_counter() - started
    assert writer.counters.written == len(payloads), writer.counters
    await writer.close()
    return seconds


async def raw(ledger: Ledger, payloads: list[bytes], run: int) -> float:
    """Seconds for nats-py to put the same payloads into a bucket configured like ours."""
    config = ledger.payloads.desired_config()
    bucket = f"RAW{run}-{uuid.uuid4().hex[:6]}"
    async with raw_nats(ledger.settings) as nc:
        js = nc.jetstream()
        store = await js.create_object_store(bucket, config)
        started = time.perf_counter()
        for i, data in enumerate(payloads):
            await store.put(f"raw/{i}", data)
        seconds = time.perf_counter() - started
        await js.delete_object_store(bucket)
    return seconds


async def main(args: argparse.Namespace) -> None:
    home = Path(tempfile.mkdtemp(prefix="ledger-bench-objects-"))
    server = embedded.ensure_nats(home, sync_always=True)
    try:
        settings = Settings(nats_urls=(server.url,), home=home, stream=f"BENCH_{uuid.uuid4().hex[:8]}")
        payloads = [os.urandom(args.size) for _ in range(args.payloads)]
        megabytes = args.payloads * args.size / 1e6
        ours_rates: list[float] = []
        raw_rates: list[float] = []
        async with Ledger(settings) as ledger:
            await ledger.payloads.store()
            await raw(ledger, payloads[:2], -1)  # warm-up: connections, first stream files
            for run in range(args.runs):
                ours_rates.append(megabytes / await ours(ledger, home, payloads, run))
                raw_rates.append(megabytes / await raw(ledger, payloads, run))
        ours_mb = statistics.median(ours_rates)
        raw_mb = statistics.median(raw_rates)
        # Each run pairs ours with raw back to back: the median of the pairs' ratios is steadier
        # on a shared machine than the ratio of the medians.
        ratio = round(statistics.median(o / r for o, r in zip(ours_rates, raw_rates, strict=True)), 3)
        print(f"large payloads: {args.payloads} x {args.size:,} bytes x {args.runs} runs, fsync every write")
        print_table([
            ("bridge ingest (spool, put, append, ack)", f"{ours_mb:,.1f} MB/s   runs: "
             + " ".join(f"{r:.1f}" for r in ours_rates)),
            ("raw nats-py ObjectStore.put, same bytes", f"{raw_mb:,.1f} MB/s   runs: "
             + " ".join(f"{r:.1f}" for r in raw_rates)),
            ("ingest / raw put (median of runs)", f"{ratio:.2f}x (target >= {TARGET_RATIO})"),
        ])
        print_json(
            figures={"ingest_mb_per_s": round(ours_mb, 2), "payload_bytes": args.size, "payloads": args.payloads},
            baselines={"raw_object_put_mb_per_s": round(raw_mb, 2)},
            ratios={"ingest_vs_raw_put": ratio},
            targets={"ingest_vs_raw_put": TARGET_RATIO},
            met={"ingest_vs_raw_put": ratio >= TARGET_RATIO},
        )
    finally:
        embedded.stop_nats(home)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--payloads", type=int, default=40)
    parser.add_argument("--size", type=int, default=1024 * 1024)
    parser.add_argument("--runs", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
