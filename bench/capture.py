#!/usr/bin/env python
"""Capture on the real livekit-server: publish -> stored in JetStream through one ``ledger bridge``.

N rooms, one publishing agent in each (seed-shaped ``agent-state`` packets, reliable, at a steady
rate, each stamped with its send time), one ``ledger bridge`` worker process (``python -m room_ledger.cli.main
bridge``, worker mode) dispatched into every room through LiveKit's AgentDispatch service.

* **bridge latency** = the message's JetStream timestamp (the time nats-server stored it; its
  acknowledgement to the bridge leaves right after, after the fsync when ``--sync-always``) minus
  the publisher's wall-clock stamp taken just before ``publish_data``. Read by an ordered
  JetStream consumer on the stream, so the reader's own delay does not count.
* **baseline**, same rooms, same run: a plain ``livekit.rtc`` subscriber in every room, latency =
  wall clock at its ``data_received`` callback minus the same stamp (publish -> received).
* **capacity**: rooms step up at ``--capacity-rate`` events/s per room; the figure is the most
  rooms at which the bridge's p99 stays <= 50 ms with every packet stored.

Everything runs on this machine: livekit-server, nats-server, the bridge, the publishers and
baseline subscribers (``--procs`` subprocesses, each an ``rtc.Room`` per room and role). Without
``LIVEKIT_URL`` the script re-runs itself in a private network namespace and starts its own
livekit-server there (``tests/livekit``); NATS is embedded in a scratch ``LEDGER_HOME``.
Prints a table, then one JSON line.

    .venv/bin/python bench/capture.py [--rooms 100] [--rate 10] [--seconds 20]
                                      [--steps 25,50,100,150,200] [--capacity-rate 5] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import percentile, print_json, raw_nats, run_with_livekit  # noqa: E402 - needs ROOT on sys.path

TARGET_P99_OVER_BASELINE_MS = 15.0
TARGET_ROOMS = 200
CAPACITY_P99_MS = 50.0
TOPIC = "agent-state"


def pct(values: list[float], p: float) -> float | None:
    return percentile(values, p) if values else None


def rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


# --- publisher worker (a subprocess: ``--publisher``) -------------------------------------------


class PubRoom:
    """One room: a publishing agent and (optionally) a plain subscriber measuring the baseline."""

    def __init__(self, name: str, arrived: asyncio.Event) -> None:
        self.name = name
        self.pub: Any = None
        self.sub: Any = None
        self.received: dict[str, list[float]] = defaultdict(list)
        self.arrived = arrived

    def on_data(self, packet: Any) -> None:
        now = time.time_ns()
        try:
            tag, _, stamp = packet.data.decode().rsplit('"task": "', 1)[1].split('"', 1)[0].split("|")
        except (ValueError, IndexError):
            return
        self.received[tag].append((now - int(stamp)) / 1e6)
        self.arrived.set()


async def publisher_main() -> None:
    """Commands on stdin, one JSON line each; one JSON line answers each on stdout."""
    from livekit import rtc

    from room_ledger.bridge._sdk import only_own_room_events
    from tests.livekit import sees
    from tests.livekit.server import mint_token

    url = os.environ["LIVEKIT_URL"]
    key, secret = os.environ["LIVEKIT_API_KEY"], os.environ["LIVEKIT_API_SECRET"]
    rooms: list[PubRoom] = []
    arrived = asyncio.Event()
    out = sys.stdout

    def reply(**data: Any) -> None:
        out.write(json.dumps(data) + "\n")
        out.flush()

    async def join(name: str, baseline: bool, gate: asyncio.Semaphore) -> PubRoom:
        room = PubRoom(name, arrived)
        async with gate:
            room.pub = rtc.Room()
            # livekit-server closes a room in which only agents remain: the subscriber (a caller,
            # standard) keeps it open; without one, the publisher is standard itself.
            await room.pub.connect(url, mint_token(key, secret, f"pub-{name}", name,
                                                   kind="agent" if baseline else "standard"))
            # Many rooms share this process: each room's loop is spared the others' events, as
            # in the bridge (a room alone in its process would never see them).
            only_own_room_events(room.pub)
            if baseline:
                room.sub = rtc.Room()
                room.sub.on("data_received", room.on_data)
                await room.sub.connect(url, mint_token(key, secret, f"sub-{name}", name, can_publish=False,
                                                       can_publish_data=False))
                only_own_room_events(room.sub)
                # the subscriber is up once the server announces the publisher to it
                await sees(room.sub, f"pub-{name}", timeout=30)
        return room

    async def pace(room: PubRoom, rate: float, seconds: float, start: float, tag: str,
                   lags: list[float]) -> int:
        identity = f"pub-{room.name}"
        phase = random.random() / rate
        count = int(rate * seconds)
        for k in range(count):
            due = start + phase + k / rate
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            stamp = time.time_ns()
            lags.append(stamp / 1e9 - due)
            payload = (f'{{"agent_id": "{identity}", "status": "processing", "action_lock": false, '
                       f'"task": "{tag}|{k}|{stamp}"}}')
            await room.pub.local_participant.publish_data(payload.encode(), reliable=True, topic=TOPIC)
        return count

    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "join":
                started = time.monotonic()
                gate = asyncio.Semaphore(8)
                rooms.extend(await asyncio.gather(*(join(n, cmd["baseline"], gate) for n in cmd["rooms"])))
                reply(ok=True, joined=len(cmd["rooms"]), seconds=round(time.monotonic() - started, 2))
            elif cmd["cmd"] == "run":
                tag, rate, seconds = cmd["tag"], cmd["rate"], cmd["seconds"]
                lags: list[float] = []
                counts = await asyncio.gather(*(pace(r, rate, seconds, cmd["start_at"], tag, lags) for r in rooms))
                sent = sum(counts)
                expected = sent if any(r.sub for r in rooms) else 0
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(cmd.get("settle", 10.0)):
                        while sum(len(r.received[tag]) for r in rooms) < expected:
                            arrived.clear()
                            await arrived.wait()
                latencies = [x for r in rooms for x in r.received.pop(tag, [])]
                reply(ok=True, sent=sent, received=len(latencies), latencies=[round(x, 3) for x in latencies],
                      lag_p99_ms=rounded((pct(lags, 99) or 0) * 1000))
            elif cmd["cmd"] == "quit":
                break
        except Exception as exc:  # answer, so the controller can say what went wrong
            reply(ok=False, error=f"{type(exc).__name__}: {exc}")
    for room in rooms:
        for r in (room.pub, room.sub):
            if r is not None:
                with contextlib.suppress(Exception):
                    await r.disconnect()
    reply(ok=True, bye=True)


class Publishers:
    """The publisher subprocesses; rooms are dealt round-robin."""

    def __init__(self, procs: int, env: dict[str, str], logs: Path) -> None:
        self.procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--publisher"], cwd=ROOT,
                                       env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=(logs / f"publisher-{i}.log").open("wb"), text=True)
                      for i in range(procs)]
        self.next = 0

    async def _ask(self, proc: subprocess.Popen[str], cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(cmd) + "\n")
        proc.stdin.flush()
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)
        if not line:
            raise RuntimeError(f"a publisher process ended (exit {proc.poll()}); see its log")
        answer: dict[str, Any] = json.loads(line)
        if not answer.get("ok"):
            raise RuntimeError(f"publisher: {answer.get('error')}")
        return answer

    async def join(self, rooms: list[str], baseline: bool) -> float:
        deal: list[list[str]] = [[] for _ in self.procs]
        for name in rooms:
            deal[self.next % len(self.procs)].append(name)
            self.next += 1
        answers = await asyncio.gather(*(self._ask(p, {"cmd": "join", "rooms": d, "baseline": baseline},
                                                   60 + 2 * len(d)) for p, d in zip(self.procs, deal, strict=True) if d))
        return max((a["seconds"] for a in answers), default=0.0)

    async def run(self, tag: str, rate: float, seconds: float, start_at: float) -> list[dict[str, Any]]:
        cmd = {"cmd": "run", "tag": tag, "rate": rate, "seconds": seconds, "start_at": start_at}
        return await asyncio.gather(*(self._ask(p, cmd, seconds + 120) for p in self.procs))

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                assert proc.stdin is not None
                proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                proc.stdin.flush()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- the controller ------------------------------------------------------------------------------


@dataclass
class Capture:
    """What the ordered consumer saw: bridge.joined rooms, and latencies per run tag."""

    joined: set[str] = field(default_factory=set)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    keys: dict[str, set[tuple[str, str]]] = field(default_factory=lambda: defaultdict(set))
    duplicates: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_msg(self, msg: Any) -> None:
        try:
            self._on_msg(msg)
        except Exception as exc:  # nats-py would swallow it
            print(f"capture: cannot read message {msg.subject}: {type(exc).__name__}: {exc}", file=sys.stderr)

    def _on_msg(self, msg: Any) -> None:
        stored = msg.metadata.timestamp.timestamp() * 1000
        event = json.loads(msg.data)
        kind = event.get("type")
        if kind == "agent.status":
            tag, k, stamp = str(event["body"].get("task", "")).split("|")
            key = (event["room"], k)
            if key in self.keys[tag]:
                self.duplicates += 1
                return
            self.keys[tag].add(key)
            self.latencies[tag].append(stored - int(stamp) / 1e6)
            self.changed.set()
        elif kind == "bridge.joined":
            self.joined.add(event["room"])
            self.changed.set()


async def close_quietly(ledger: Any) -> None:
    """Close the bench's own connection; a failure there must not cost the figures."""
    try:
        await ledger.close()
    except Exception as exc:
        print(f"bench/capture: closing the ledger connection failed ({type(exc).__name__}: {exc})",
              file=sys.stderr)


def start_bridge(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``ledger bridge`` in worker mode, as an operator runs it."""
    return subprocess.Popen([sys.executable, "-m", "room_ledger.cli.main", "bridge"], cwd=ROOT, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Step:
    rooms: int
    rate: float
    seconds: float
    sent: int = 0
    stored: int = 0
    received: int = 0
    bridge_p50: float | None = None
    bridge_p99: float | None = None
    bridge_max: float | None = None
    base_p50: float | None = None
    base_p99: float | None = None
    lag_p99: float | None = None
    bridge_cpu: float = 0.0
    server_cpu: float = 0.0
    publisher_cpu: float = 0.0


async def controller(args: argparse.Namespace) -> int:
    from nats.js import api as js_api

    from room_ledger import embedded
    from room_ledger.bridge.tokens import create_dispatch
    from room_ledger.client import Ledger
    from room_ledger.settings import Settings

    scratch = Path(tempfile.mkdtemp(prefix="bench-capture-"))
    logs = scratch / "logs"
    logs.mkdir()
    server: Any = None
    bridge: subprocess.Popen[bytes] | None = None
    stream_messages = 0
    publishers: Publishers | None = None
    nats_started = False
    tag = uuid.uuid4().hex[:6]
    try:
        if url := os.environ.get("LIVEKIT_URL"):
            key, secret = os.environ["LIVEKIT_API_KEY"], os.environ["LIVEKIT_API_SECRET"]
        else:
            from tests.livekit.server import LocalLiveKit

            server = LocalLiveKit(scratch / "livekit").start()
            url, key, secret = server.url, server.api_key, server.api_secret
        nats_url = os.environ.get("LEDGER_NATS_URL")
        if not nats_url:
            nats_url = embedded.ensure_nats(scratch / "home", sync_always=args.sync_always).url
            nats_started = True
        settings = Settings(nats_urls=tuple(nats_url.split(",")), home=scratch / "home", stream=f"BENCH_{tag}",
                            subject_prefix=f"bench{tag}", livekit_url=url, livekit_api_key=key,
                            livekit_api_secret=secret, bridge_agent_name=f"bench-bridge-{tag}")
        env = {**os.environ, "LIVEKIT_URL": url, "LIVEKIT_API_KEY": key, "LIVEKIT_API_SECRET": secret,
               "LEDGER_NATS_URL": nats_url, "LEDGER_HOME": str(settings.home), "LEDGER_STREAM": settings.stream,
               "LEDGER_SUBJECT_PREFIX": settings.subject_prefix,
               "LEDGER_BRIDGE_AGENT_NAME": settings.bridge_agent_name,
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}

        capture = Capture()
        async with contextlib.AsyncExitStack() as stack:
            ledger = Ledger(settings)
            await ledger.connect()
            stack.push_async_callback(close_quietly, ledger)
            raw = await stack.enter_async_context(raw_nats(settings))
            sub = await raw.jetstream().subscribe(f"{settings.subject_prefix}.>", stream=settings.stream,
                                                  ordered_consumer=True, cb=capture.on_msg,
                                                  config=js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.NEW),
                                                  pending_msgs_limit=1_000_000)
            mark = server.log_mark() if server else 0
            bridge = start_bridge(env, logs / "bridge.log")
            if server is not None:
                await server.worker_registered(settings.bridge_agent_name, 60, after=mark)
            publishers = Publishers(args.procs, env, logs)

            async def add_rooms(count: int) -> float:
                """Join publishers (and baseline subscribers) in ``count`` new rooms, dispatch the bridge."""
                names = [f"bench-{tag}-{len(rooms) + i:04d}" for i in range(count)]
                took = await publishers.join(names, baseline=not args.no_baseline)
                # One dispatch at a time by default: jobs starting together in one bridge process
                # have starved one another's event loops past the FFI's connect handshake timeout
                # ("timed out waiting for ReadyForRoomEventRequest"), a panic that ends the whole
                # process. --burst dispatches them all at once.
                if args.burst:
                    await asyncio.gather(*(create_dispatch(settings, name) for name in names))
                for name in names:
                    if not args.burst:
                        await create_dispatch(settings, name)
                    async with asyncio.timeout(60 if args.burst else 30):
                        while name not in capture.joined:
                            if bridge is not None and bridge.poll() is not None:
                                raise RuntimeError(f"the bridge exited ({bridge.returncode}); see "
                                                   f"{logs / 'bridge.log'}")
                            capture.changed.clear()
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(capture.changed.wait(), 1.0)
                    rooms.append(name)
                return took

            async def measure(rate: float, seconds: float) -> Step:
                step = Step(len(rooms), rate, seconds)
                run_tag = f"r{len(rooms)}x{rate:g}-{uuid.uuid4().hex[:4]}"
                pids = {"bridge": [bridge.pid] if bridge else [], "server": [server._proc.pid] if server else [],
                        "publishers": [p.pid for p in publishers.procs] if publishers else []}
                before = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
                started = time.monotonic()
                assert publishers is not None
                answers = await publishers.run(run_tag, rate, seconds, time.time() + 1.0)
                step.sent = sum(a["sent"] for a in answers)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(15):
                        while len(capture.latencies[run_tag]) < step.sent:
                            capture.changed.clear()
                            await capture.changed.wait()
                wall = time.monotonic() - started
                after = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
                cores = {k: round((after[k] - before[k]) / wall * 100) for k in pids}
                step.bridge_cpu, step.server_cpu, step.publisher_cpu = cores["bridge"], cores["server"], cores["publishers"]
                bridge_ms = capture.latencies.pop(run_tag, [])
                base_ms = [x for a in answers for x in a["latencies"]]
                step.stored, step.received = len(bridge_ms), len(base_ms)
                step.bridge_p50, step.bridge_p99 = rounded(pct(bridge_ms, 50)), rounded(pct(bridge_ms, 99))
                step.bridge_max = rounded(max(bridge_ms) if bridge_ms else None)
                step.base_p50, step.base_p99 = rounded(pct(base_ms, 50)), rounded(pct(base_ms, 99))
                step.lag_p99 = max((a["lag_p99_ms"] or 0) for a in answers)
                print(f"  {step.rooms:>4} rooms x {rate:g}/s for {seconds:g}s: sent {step.sent}, stored {step.stored},"
                      f" bridge p50/p99 {step.bridge_p50}/{step.bridge_p99} ms, baseline p50/p99 "
                      f"{step.base_p50}/{step.base_p99} ms, publisher lag p99 {step.lag_p99} ms, CPU % bridge "
                      f"{step.bridge_cpu} server {step.server_cpu} publishers {step.publisher_cpu}", flush=True)
                return step

            rooms: list[str] = []
            steps = sorted(set(args.steps) | {args.rooms})
            capacity: list[Step] = []
            comparison: list[Step] = []
            held = 0
            reached = 0
            stopped_by = ""
            for target in steps:
                try:
                    took = await add_rooms(target - len(rooms))
                except (RuntimeError, TimeoutError) as exc:
                    stopped_by = f"could not reach {target} rooms: {type(exc).__name__}: {exc}"
                    print(f"  {stopped_by}", flush=True)
                    break
                reached = len(rooms)
                print(f"  {len(rooms)} rooms: publishers joined in {took:.1f} s, bridge in every room", flush=True)
                if target in args.steps:
                    step = await measure(args.capacity_rate, args.seconds)
                    capacity.append(step)
                    if step.stored == step.sent and (step.bridge_p99 or 1e9) <= CAPACITY_P99_MS:
                        held = max(held, step.rooms)
                if target == args.rooms:
                    for _ in range(args.runs):
                        comparison.append(await measure(args.rate, args.seconds))
                # Further steps only while the bridge keeps up at all: the figure is the step before.
                if capacity and capacity[-1].rooms == target and target >= args.rooms and (
                        capacity[-1].stored < capacity[-1].sent
                        or (capacity[-1].bridge_p99 or 0) > 10 * CAPACITY_P99_MS):
                    stopped_by = f"p99 {capacity[-1].bridge_p99} ms at {target} rooms"
                    break
            await sub.unsubscribe()
            # What the stream holds, beside what the consumer saw: tells a bridge that fell
            # behind from a reader that did.
            stream_messages = (await ledger.stream.info()).state.messages
            duplicates = capture.duplicates
    finally:
        if publishers is not None:
            publishers.close()
        if bridge is not None and bridge.poll() is None:
            stopping = time.monotonic()
            bridge.terminate()
            try:
                bridge.wait(120)
                print(f"  the bridge stopped {time.monotonic() - stopping:.1f} s after SIGTERM", flush=True)
            except subprocess.TimeoutExpired:
                print("  the bridge did not stop within 120 s of SIGTERM: killed", flush=True)
                bridge.kill()
                bridge.wait()
        if server is not None:
            server.stop()
        if nats_started:
            embedded.stop_nats(scratch / "home")
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    def median_of(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return round(statistics.median(present), 2) if present else None

    bridge_p50 = median_of([s.bridge_p50 for s in comparison])
    bridge_p99 = median_of([s.bridge_p99 for s in comparison])
    base_p50 = median_of([s.base_p50 for s in comparison])
    base_p99 = median_of([s.base_p99 for s in comparison])
    lost = sum(s.sent - s.stored for s in comparison + capacity)
    seen = sum(s.stored for s in comparison + capacity)
    over = round(bridge_p99 - base_p99, 2) if bridge_p99 is not None and base_p99 is not None else None
    figures = {"rooms": args.rooms, "rate_per_room": args.rate, "seconds": args.seconds,
               "bridge_p50_ms": bridge_p50, "bridge_p99_ms": bridge_p99, "rooms_held": held,
               "rooms_reached": reached, "capacity_rate_per_room": args.capacity_rate,
               "p99_minus_baseline_ms": over,
               "lost": lost, "duplicates": duplicates, "sync_always": args.sync_always,
               "stream_messages": stream_messages, "status_events_seen": seen,
               "steps": [vars(s) for s in capacity], "comparison_runs": [vars(s) for s in comparison]}
    baselines = {"rtc_p50_ms": base_p50, "rtc_p99_ms": base_p99}
    ratios = {"bridge_p99_over_baseline_p99": round(bridge_p99 / base_p99, 2) if bridge_p99 and base_p99 else None}
    targets = {"p99_minus_baseline_ms": f"<= {TARGET_P99_OVER_BASELINE_MS:g} (at >= 100 rooms x 10/s)",
               "rooms_held": f">= {TARGET_ROOMS}", "lost": "== 0"}
    met = {"p99_minus_baseline_ms": over is not None and over <= TARGET_P99_OVER_BASELINE_MS
           and args.rooms >= 100 and args.rate >= 10,
           "rooms_held": held >= TARGET_ROOMS, "lost": lost == 0 and duplicates == 0}

    print(f"\ncapture benchmark: {args.rooms} rooms x {args.rate:g} events/s for {args.seconds:g} s"
          f" ({len(comparison)} run(s), medians); capacity at {args.capacity_rate:g}/s per room, steps "
          f"{','.join(map(str, args.steps))}; {args.procs} publisher processes; NATS fsync every write: "
          f"{args.sync_always}" + (f"; stopped: {stopped_by}" if stopped_by else ""))
    rows = [
        ("bridge: publish -> stored in JetStream p50", f"{bridge_p50} ms"),
        ("bridge: publish -> stored in JetStream p99", f"{bridge_p99} ms"),
        ("baseline: rtc subscriber publish -> received p50", f"{base_p50} ms"),
        ("baseline: rtc subscriber publish -> received p99", f"{base_p99} ms"),
        ("bridge p99 - baseline p99", f"{over} ms (target <= {TARGET_P99_OVER_BASELINE_MS:g} at 100 rooms x 10/s)"),
        (f"rooms one bridge holds at p99 <= {CAPACITY_P99_MS:g} ms", f"{held} (target >= {TARGET_ROOMS}; "
                                                                      f"reached {reached})"),
        ("packets not stored within 15 s of the run / stored twice", f"{lost} / {duplicates}"),
    ]
    width = max(len(k) for k, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print_json(figures=figures, baselines=baselines, ratios=ratios, targets=targets, met=met)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rooms", type=int, default=100, help="rooms of the bridge-vs-baseline comparison")
    parser.add_argument("--rate", type=float, default=10.0, help="events/s per room in the comparison")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each measurement")
    parser.add_argument("--runs", type=int, default=1, help="comparison runs (medians)")
    parser.add_argument("--steps", default="25,50,100,150,200", help="room counts of the capacity steps")
    parser.add_argument("--capacity-rate", type=float, default=5.0, help="events/s per room in the steps")
    parser.add_argument("--procs", type=int, default=2, help="publisher subprocesses")
    parser.add_argument("--no-baseline", action="store_true", help="no rtc subscribers (halves the connections)")
    parser.add_argument("--burst", action="store_true", help="dispatch each step's new rooms all at once")
    parser.add_argument("--sync-always", action="store_true", help="embedded NATS fsyncs every write")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs)")
    parser.add_argument("--quick", action="store_true", help="10 rooms x 10/s for 5 s, steps 5,10")
    parser.add_argument("--publisher", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publisher:
        asyncio.run(publisher_main())
        return 0
    if args.quick:
        args.rooms, args.seconds, args.steps = 10, 5.0, "5,10"
    args.steps = sorted({int(s) for s in str(args.steps).split(",") if s.strip()})

    return run_with_livekit(__file__, controller(args))


if __name__ == "__main__":
    sys.exit(main())
