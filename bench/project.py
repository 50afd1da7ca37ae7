"""Projector catch-up throughput over a realistic mixed log, beside a raw asyncpg COPY.

    python bench/project.py [--events 100000] [--rooms 200] [--runs 3]

Appends the log once (a private stream; embedded servers in a scratch home unless
LEDGER_NATS_URL / LEDGER_DATABASE_URL are set), then per run: empties the projection and
times a full catch-up from sequence 0; and times COPY of the same number of rows (room, seq,
JSONB document) into a scratch table. Prints a table, then one JSON line.
Targets (issue 3): >= 25k events/s and >= 0.25x the COPY rate.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import bench_settings, median, print_json, print_table
from room_ledger import db
from room_ledger import events as ev
from room_ledger.client import Ledger
from room_ledger.projections.migrate import upgrade
from room_ledger.projections.projector import DEFAULT_BATCH, Projector
from room_ledger.projections.sample import interleaved


async def main(args: argparse.Namespace) -> None:
    with bench_settings(args.home) as settings:
        await upgrade(settings)
        rooms = [f"bench-room-{i}" for i in range(args.rooms)]
        async with Ledger(settings) as ledger:
            events = list(interleaved(rooms, args.events // args.rooms))
            started = time.perf_counter()
            for i in range(0, len(events), 5000):
                await ledger.append_many(events[i:i + 5000])
            append_s = time.perf_counter() - started
            total = await ledger.head()
        conn = await db.connect(settings)
        docs = [ev.encode(e).decode() for e in events[:total]]
        project_rates: list[float] = []
        copy_rates: list[float] = []
        try:
            for run in range(args.runs):
                await conn.execute("TRUNCATE room_state, conversation_items, conversation_pages, "
                                   "projection_checkpoints, projection_errors")
                async with Projector(settings, projection=f"bench{run}", batch_size=args.batch_size, tune_gc=True,
                                     migrate=False) as projector:
                    started = time.perf_counter()
                    await projector.catch_up(until=total)
                    project_rates.append(total / (time.perf_counter() - started))
                await conn.execute("DROP TABLE IF EXISTS bench_copy")
                await conn.execute("CREATE TABLE bench_copy (room text, seq bigint, doc jsonb, "
                                   "PRIMARY KEY (room, seq))")
                records = [(e.room, i + 1, d) for i, (e, d) in enumerate(zip(events, docs, strict=False))]
                started = time.perf_counter()
                await conn.copy_records_to_table("bench_copy", records=records, columns=["room", "seq", "doc"])
                copy_rates.append(total / (time.perf_counter() - started))
            await conn.execute("DROP TABLE IF EXISTS bench_copy")
        finally:
            await conn.close()
    project_rate = median(project_rates)
    copy_rate = median(copy_rates)
    ratio = project_rate / copy_rate
    print(f"projector catch-up: {total} events over {args.rooms} rooms, median of {args.runs} runs")
    print_table([
        ("append (setup)", f"{total / append_s:,.0f} events/s"),
        ("projector catch-up", f"{project_rate:,.0f} events/s  (runs: {', '.join(f'{r:,.0f}' for r in project_rates)})"),
        ("asyncpg COPY baseline", f"{copy_rate:,.0f} rows/s  (runs: {', '.join(f'{r:,.0f}' for r in copy_rates)})"),
        ("projector / COPY", f"{ratio:.2f}x"),
    ])
    targets = {"events_per_s": 25_000, "ratio_to_copy": 0.25}
    print_json(
        figures={"events": total, "rooms": args.rooms, "projector_events_per_s": round(project_rate)},
        baselines={"copy_rows_per_s": round(copy_rate)},
        ratios={"projector_to_copy": round(ratio, 3)},
        targets=targets,
        met={"events_per_s": project_rate >= targets["events_per_s"],
             "ratio_to_copy": ratio >= targets["ratio_to_copy"]},
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rooms", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--home", help="keep servers in this LEDGER_HOME (default: a scratch one)")
    asyncio.run(main(parser.parse_args()))
