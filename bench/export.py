"""``ledger export`` over many rooms: constant memory, and how fast.

Seeds ``--rooms`` rooms (and a tenth as many under another prefix) of a dozen events each (three
participants, transcripts, the agent's session feed with a tool call and its output, a handoff)
into a private stream on the embedded nats-server, then runs ``ledger export --prefix … --out …
--json`` as a process over each set. The baseline is the same export over the small set in the
same run: the peak RSS over ten times the rooms should stay within 1.25x of it (rooms are hydrated
a few at a time and written as they come). Log only (no PostgreSQL): every room is folded from
the log, the slower path.

    .venv/bin/python bench/export.py                  # 2,000 rooms
    .venv/bin/python bench/export.py --rooms 10000    # the issue's size
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import print_json, print_table
from room_ledger import embedded
from room_ledger import events as ev
from room_ledger.client import Ledger
from room_ledger.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
TARGET_RSS_RATIO = 1.25
T0 = datetime(2024, 5, 1, 10, tzinfo=UTC)


def room_events(room: str) -> list[ev.KnownEvent]:
    e = ev.make_event
    user, triage, billing = ev.Sender("caller", "standard"), ev.Sender("triage", "agent"), ev.Sender("billing", "agent")

    def at(s: float) -> datetime:
        return T0 + timedelta(seconds=s)

    item = ev.ConversationItem
    return [
        e(room, ev.ParticipantJoined(identity="caller", kind="standard"), sender=user, at=at(0)),
        e(room, ev.ParticipantJoined(identity="triage", kind="agent"), sender=triage, at=at(0.1)),
        e(room, ev.ParticipantJoined(identity="billing", kind="agent"), sender=billing, at=at(0.2)),
        e(room, ev.Transcript(speaker="triage", text="Hello, how can I help?", segment_id="s1"), sender=triage, at=at(1)),
        e(room, ev.Transcript(speaker="caller", text="I was charged twice for my order.", segment_id="s2"),
          sender=triage, at=at(3)),
        e(room, ev.Handoff(from_agent="triage", to_agent="billing", reason="billing"), sender=triage, at=at(4)),
        e(room, item(item_id="item_u1", role="user", text="Can I get the second charge back?"), sender=billing,
          at=at(5)),
        e(room, item(item_id="item_f1", item_type="function_call", name="refund", call_id="c1",
                     arguments='{"charge": "ch_2"}'), sender=billing, at=at(6)),
        e(room, item(item_id="item_o1", item_type="function_call_output", name="refund", call_id="c1",
                     output='{"refunded": true}'), sender=billing, at=at(7)),
        e(room, item(item_id="item_a1", role="assistant", text="Done: the second charge is refunded."),
          sender=billing, at=at(8)),
        e(room, ev.ParticipantLeft(identity="caller"), sender=user, at=at(9)),
    ]


async def seed(settings: Settings, prefix: str, rooms: int) -> int:
    events: list[ev.KnownEvent] = []
    stored = 0
    async with Ledger(settings) as ledger:
        for n in range(rooms):
            events.extend(room_events(f"{prefix}{n:05d}"))
            if len(events) >= 5000:
                stored += len(await ledger.append_many(events))
                events = []
        if events:
            stored += len(await ledger.append_many(events))
    return stored


def export(settings: Settings, prefix: str, out: Path) -> dict[str, Any]:
    """Run ``ledger export`` as a process; its summary plus peak RSS (KiB) and wall seconds."""
    env = {**os.environ, "LEDGER_NATS_URL": ",".join(settings.nats_urls or ()), "LEDGER_HOME": str(settings.home),
           "LEDGER_STREAM": settings.stream, "LEDGER_SUBJECT_PREFIX": settings.subject_prefix}
    env.pop("LEDGER_DATABASE_URL", None)
    # /usr/bin/time is not everywhere: a tiny Python parent reads the child's peak RSS.
    probe = (
        "import resource, subprocess, sys, json, time\n"
        "t = time.perf_counter()\n"
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "took = time.perf_counter() - t\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps({'rc': done.returncode, 'stdout': done.stdout, 'stderr': done.stderr[-2000:],"
        " 'peak_kib': peak, 'seconds': took}))\n"
    )
    argv = [sys.executable, "-c", probe, sys.executable, "-m", "room_ledger.cli.main", "export", "--prefix", prefix,
            "--out", str(out), "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    result = json.loads(done.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"ledger export failed: {result['stderr']}")
    summary: dict[str, Any] = json.loads(result["stdout"].strip().splitlines()[-1])
    summary.update(peak_kib=result["peak_kib"], wall_s=result["seconds"])
    return summary


async def main(args: argparse.Namespace) -> None:
    home = Path(tempfile.mkdtemp(prefix="ledger-bench-export-"))
    server = embedded.ensure_nats(home, sync_always=False)
    try:
        tag = uuid.uuid4().hex[:8]
        settings = Settings(nats_urls=(server.url,), home=home, stream=f"BENCH_{tag}", subject_prefix=f"bench{tag}")
        small_rooms = max(1, args.rooms // 10)
        started = time.perf_counter()
        stored = await seed(settings, "small-", small_rooms) + await seed(settings, "large-", args.rooms)
        seeded_s = time.perf_counter() - started
        small = export(settings, "small-", home / "small.jsonl")
        large = export(settings, "large-", home / "large.jsonl")
        assert large["conversations"] == args.rooms and small["conversations"] == small_rooms, (small, large)
        with (home / "large.jsonl").open() as lines:
            first = json.loads(next(lines))
        assert len(first["messages"]) == 6 and len(first["turns"]) == 7, first
        ratio = round(large["peak_kib"] / small["peak_kib"], 3)
        # Per room: the start-up both runs share (imports, connecting) taken out.
        rate = (args.rooms - small_rooms) / max(large["seconds"] - small["seconds"], 1e-6)
        print(f"ledger export: {args.rooms:,} rooms (and {small_rooms:,}) of 11 events, log only; seeded {stored:,} "
              f"events in {seeded_s:.1f}s")
        print_table([
            (f"export {args.rooms:,} rooms", f"{large['seconds']:.1f}s ({rate:,.0f} rooms/s past start-up), peak RSS "
             f"{large['peak_kib'] / 1024:.1f} MiB, {(home / 'large.jsonl').stat().st_size / 1e6:.1f} MB written"),
            (f"export {small_rooms:,} rooms (baseline)", f"{small['seconds']:.1f}s, peak RSS "
             f"{small['peak_kib'] / 1024:.1f} MiB"),
            ("peak RSS, 10x the rooms", f"{ratio:.2f}x (target <= {TARGET_RSS_RATIO})"),
        ])
        print_json(
            figures={"rooms": args.rooms, "export_s": round(large["seconds"], 2), "rooms_per_s": round(rate, 1),
                     "peak_rss_mib": round(large["peak_kib"] / 1024, 1)},
            baselines={"rooms": small_rooms, "peak_rss_mib": round(small["peak_kib"] / 1024, 1)},
            ratios={"peak_rss_10x_rooms": ratio},
            targets={"peak_rss_10x_rooms": TARGET_RSS_RATIO},
            met={"peak_rss_10x_rooms": ratio <= TARGET_RSS_RATIO},
        )
    finally:
        embedded.stop_nats(home)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=2000)
    asyncio.run(main(parser.parse_args()))
