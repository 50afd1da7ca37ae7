#!/usr/bin/env python
"""Soak: one simulated room at 500 events/s for 30 minutes, hydrated every second (not in CI).

    .venv/bin/python bench/soak.py [--minutes 30] [--rate 500] [--report-every 30] [--warmup 3]

Three processes on the same NATS and PostgreSQL (embedded ones in a scratch home, unless
LEDGER_NATS_URL / LEDGER_DATABASE_URL are set):

* the bridge: the bridge's own callback -> queue -> ingest -> writer path (``bridge.room.RoomBridge``,
  ``bridge.writer.BridgeWriter``) fed by a stand-in room (no WebRTC) with what agents publish on the
  ``ledger`` topic: conversation items, statuses, floor claims and releases, session patches, a
  rolling summary every 1,000 events, and plain data packets, paced at ``--rate``;
* the projector: ``projections.projector.Projector.run``;
* this process: ``hydrate(ledger, room)`` once a second, and a report every ``--report-every``
  seconds: RSS of the bridge and of the projector, projector lag (head - checkpoint), hydrate
  p50/p99 over the interval.

At the end: the bridge stops (flushing), the projector catches up, and the room's events in the log
are counted against what the bridge emitted (nothing lost, nothing duplicated). Targets: RSS growth
of each process under 10% from the end of warm-up to the end. Ends with one JSON line like the other
benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import print_json  # noqa: E402
from room_ledger.client import Ledger  # noqa: E402
from room_ledger.hydrate import hydrate  # noqa: E402
from room_ledger.settings import Settings  # noqa: E402

RSS_GROWTH_TARGET_PCT = 10.0


# --- the bridge process ------------------------------------------------------------------------


def agent_packet(i: int, last_seq: int) -> tuple[str, bytes]:
    """(topic, payload) of the i-th packet of the simulated room: what agents publish."""
    agent = f"agent-{i % 2}"
    kind = i % 10
    msg: dict[str, Any]
    if i % 1000 == 999:
        msg = {"type": "context.summary", "id": f"sum-{i}", "covers_seq": last_seq,
               "text": f"summary up to {last_seq}: the caller wants a refund for order {i}. " * 4}
    elif kind in (0, 1, 2, 3):
        role = "user" if kind % 2 == 0 else "assistant"
        msg = {"type": "conversation.item", "id": f"item-{i}", "item_id": f"item_{i}", "role": role,
               "speaker": "caller" if role == "user" else agent,
               "text": f"utterance {i}: " + "refund invoice account order please thanks " * (1 + i % 5)}
    elif kind in (4, 5):
        return "state", json.dumps({"agent_id": agent, "status": "processing" if i % 4 else "idle",
                                    "action_lock": bool(i % 4), "task": f"task-{i}"}).encode()
    elif kind == 6:
        msg = {"type": "floor.request", "id": f"floor-{i}", "agent_id": agent, "task": f"task-{i}"}
    elif kind == 7:
        msg = {"type": "floor.release", "id": f"release-{i}", "agent_id": f"agent-{(i + 1) % 2}"}
    elif kind == 8:
        msg = {"type": "session.patch", "id": f"patch-{i}",
               "patch": {"step": i, "customer": {"order": f"o-{i % 97}", "verified": bool(i % 3)},
                         f"scratch_{i % 20}": None if i % 40 == 0 else "x" * 20}}
    else:
        return "ui", json.dumps({"cursor": i, "view": "orders"}).encode()
    return "ledger", json.dumps(msg).encode()


async def bridge_role(args: argparse.Namespace) -> None:
    from bench.bridge import FakeParticipant, FakeRoom
    from room_ledger.bridge.room import RoomBridge
    from room_ledger.bridge.writer import BridgeWriter

    settings = Settings.from_env()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    last_seq = 0

    def on_ack(events: Any, positions: Any) -> None:
        nonlocal last_seq
        if positions:
            last_seq = max(last_seq, max(p.seq for p in positions))

    emitted = 0
    async with Ledger(settings, name="soak-bridge") as ledger:
        writer = BridgeWriter(ledger, home=settings.home, bridge_id="soak", stats_interval=1.0, on_ack=on_ack)
        await writer.start()
        room = FakeRoom()
        bridge = RoomBridge(room, writer.ingest(args.room))  # type: ignore[arg-type]
        bridge.attach()
        bridge.connected()
        agents = [FakeParticipant("agent-0"), FakeParticipant("agent-1")]
        tick = 0.01
        started = time.perf_counter()
        total = int(args.rate * args.seconds)
        while emitted < total and not stop.is_set():
            due = int((time.perf_counter() - started) * args.rate) + 1
            while emitted < min(due, total):
                topic, data = agent_packet(emitted, last_seq)
                room.emit_data(data, topic, agents[emitted % 2])
                emitted += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), tick)
        await bridge.close("soak over", left=True)
        saved = await writer.close(deadline=30)
        counters = writer.counters.as_dict()
    print(json.dumps({"role": "bridge", "emitted": emitted, "saved": saved, "counters": counters}), flush=True)


# --- the projector process -----------------------------------------------------------------------


async def projector_role(args: argparse.Namespace) -> None:
    from room_ledger.projections.projector import Projector

    settings = Settings.from_env()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    projector = Projector(settings, migrate=False, tune_gc=True)
    try:
        await projector.run(stop)
    finally:
        await projector.close()
    print(json.dumps({"role": "projector", "checkpoint": projector.checkpoint}), flush=True)


# --- the orchestrator ------------------------------------------------------------------------------


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


def child_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "LEDGER_NATS_URL": ",".join(settings.nats_urls or ()),
        "LEDGER_DATABASE_URL": settings.database_url or "",
        "LEDGER_STREAM": settings.stream,
        "LEDGER_SUBJECT_PREFIX": settings.subject_prefix,
        "LEDGER_HOME": str(settings.home),
        "LEDGER_REPLICAS": str(settings.replicas),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
    })
    return env


def spawn(role: str, settings: Settings, extra: list[str], log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, "--role", role, *extra], env=child_env(settings), text=True,
                            stdout=subprocess.PIPE, stderr=log.open("w"), cwd=ROOT)


def last_json(process: subprocess.Popen[str]) -> dict[str, Any]:
    out = process.stdout.read() if process.stdout else ""
    for line in reversed(out.splitlines()):
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict):
                return data
    return {}


async def room_events(ledger: Ledger, room: str) -> int:
    return await ledger.rooms.count(room)


async def orchestrate(args: argparse.Namespace) -> int:
    from bench._common import bench_settings
    from room_ledger.hydrate import close as close_hydrate
    from room_ledger.projections.admin import status as projection_status
    from room_ledger.projections.migrate import upgrade

    seconds = args.minutes * 60
    warmup = min(args.warmup * 60, seconds / 2)
    with bench_settings(args.home) as settings:
        await upgrade(settings)
        room = f"soak-{uuid.uuid4().hex[:8]}"
        logs = Path(settings.home) / "soak-logs"
        logs.mkdir(parents=True, exist_ok=True)
        async with Ledger(settings, name="soak-main"):
            pass  # the stream exists before the children start
        projector = spawn("projector", settings, [], logs / "projector.log")
        bridge = spawn("bridge", settings, ["--room", room, "--rate", str(args.rate), "--seconds", str(seconds)],
                       logs / "bridge.log")
        print(f"soak: room {room!r} at {args.rate:g} events/s for {args.minutes:g} min; bridge pid {bridge.pid}, "
              f"projector pid {projector.pid}; logs in {logs}", flush=True)
        print(f"{'t (s)':>7} {'head':>9} {'bridge MiB':>10} {'proj MiB':>9} {'lag':>7} {'hyd p50':>8} "
              f"{'hyd p99':>8} {'hyd max':>8}", flush=True)
        samples: list[dict[str, Any]] = []
        all_hydrate: list[float] = []
        window: list[float] = []
        max_lag = 0
        started = time.monotonic()
        next_report = started + args.report_every
        async with Ledger(settings, name="soak-hydrate") as ledger:
            try:
                tick = 0
                while bridge.poll() is None:
                    tick += 1
                    if await ledger.room_last_seq(room):
                        t0 = time.perf_counter()
                        await hydrate(ledger, room)
                        ms = (time.perf_counter() - t0) * 1000
                        window.append(ms)
                        if time.monotonic() - started >= warmup:
                            all_hydrate.append(ms)
                    if projector.poll() is not None:
                        raise RuntimeError(f"the projector exited ({projector.returncode}): see {logs}/projector.log")
                    now = time.monotonic()
                    if now >= next_report:
                        next_report += args.report_every
                        head = await ledger.head()
                        lag = (await projection_status(settings, head=head)).lag or 0
                        max_lag = max(max_lag, lag)
                        sample = {"t": round(now - started), "head": head, "bridge_rss_mib": rss_mib(bridge.pid),
                                  "projector_rss_mib": rss_mib(projector.pid), "lag": lag,
                                  "hydrate_p50_ms": round(pct(window, 50), 2),
                                  "hydrate_p99_ms": round(pct(window, 99), 2),
                                  "hydrate_max_ms": round(max(window, default=float("nan")), 2)}
                        samples.append(sample)
                        window = []
                        print(f"{sample['t']:>7} {head:>9,} {sample['bridge_rss_mib'] or 0:>10.1f} "
                              f"{sample['projector_rss_mib'] or 0:>9.1f} {lag:>7,} {sample['hydrate_p50_ms']:>8.2f} "
                              f"{sample['hydrate_p99_ms']:>8.2f} {sample['hydrate_max_ms']:>8.2f}", flush=True)
                    # Once a second, on the clock (not a fixed sleep after the work).
                    await asyncio.sleep(max(0.0, started + tick - time.monotonic()))
                bridge_result = last_json(bridge)
                # The projector catches up with the final head, then stops.
                head = await ledger.head()
                deadline = time.monotonic() + 120
                while (await projection_status(settings, head=head)).lag:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the projector did not catch up within 120 s of the end")
                    await asyncio.sleep(0.2)
                stored = await room_events(ledger, room)
                final = await hydrate(ledger, room)
            finally:
                for process in (bridge, projector):
                    if process.poll() is None:
                        process.send_signal(signal.SIGTERM)
                for process in (bridge, projector):
                    try:
                        process.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        process.kill()
                await close_hydrate(ledger)

    counters = bridge_result.get("counters", {})
    emitted = int(bridge_result.get("emitted", 0))
    # Every packet is one event (the bridge adds bridge.joined / bridge.left of its own): the log holds
    # exactly what the writer stored, and at least every packet.
    expected = int(counters.get("written", 0)) - int(counters.get("duplicates", 0))
    after = [s for s in samples if s["t"] >= warmup]

    def growth(key: str) -> float:
        values: list[float] = [s[key] for s in after if s[key]]
        if len(values) < 2:
            return float("nan")
        return (values[-1] - values[0]) / values[0] * 100

    bridge_growth, projector_growth = growth("bridge_rss_mib"), growth("projector_rss_mib")
    p50, p99 = pct(all_hydrate, 50), pct(all_hydrate, 99)
    print(f"\nemitted {emitted:,} packets; written {counters.get('written', 0):,} "
          f"(duplicates {counters.get('duplicates', 0)}, spilled {counters.get('spilled', 0)}, "
          f"append failures {counters.get('append_failures', 0)}); in the log: {stored:,} (expected {expected:,})")
    print(f"RSS growth after warm-up: bridge {bridge_growth:+.1f}%, projector {projector_growth:+.1f}% "
          f"(target < {RSS_GROWTH_TARGET_PCT:g}%); max projector lag {max_lag:,}; "
          f"hydrate p50 {p50:.2f} ms, p99 {p99:.2f} ms over {len(all_hydrate)} hydrations; final room seq {final.seq}")
    lossless = stored == expected and stored >= emitted and not bridge_result.get("saved")
    met = {
        "bridge_rss_growth_pct": bridge_growth < RSS_GROWTH_TARGET_PCT,
        "projector_rss_growth_pct": projector_growth < RSS_GROWTH_TARGET_PCT,
        "nothing_lost": lossless,
    }
    print_json(
        figures={"minutes": args.minutes, "rate": args.rate, "events": stored,
                 "bridge_rss_growth_pct": round(bridge_growth, 2),
                 "projector_rss_growth_pct": round(projector_growth, 2), "max_projector_lag": max_lag,
                 "hydrate_p50_ms": round(p50, 3), "hydrate_p99_ms": round(p99, 3), "nothing_lost": lossless,
                 "samples": samples},
        baselines={},
        ratios={},
        targets={"bridge_rss_growth_pct": f"< {RSS_GROWTH_TARGET_PCT:g}",
                 "projector_rss_growth_pct": f"< {RSS_GROWTH_TARGET_PCT:g}", "nothing_lost": "true"},
        met=met,
    )
    return 0 if all(met.values()) else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=500.0, help="events per second")
    parser.add_argument("--report-every", type=float, default=30.0, help="seconds between report lines")
    parser.add_argument("--warmup", type=float, default=3.0, help="minutes before RSS growth is measured")
    parser.add_argument("--home", help="keep the servers in this LEDGER_HOME (default: a scratch one)")
    parser.add_argument("--role", choices=["bridge", "projector"], help=argparse.SUPPRESS)
    parser.add_argument("--room", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "bridge":
        asyncio.run(bridge_role(args))
    elif args.role == "projector":
        asyncio.run(projector_role(args))
    else:
        sys.exit(asyncio.run(orchestrate(args)))


if __name__ == "__main__":
    main()
