"""Benchmark: ``ledger replay --json`` of a 100k-event room beside a raw ordered-consumer read.

    .venv/bin/python bench/replay.py [--events 100000] [--runs 5]

On the embedded nats-server (fsync on every write) in a temporary LEDGER_HOME, unless
LEDGER_NATS_URL is set. One room of realistic events (200 B to 2 KB) is written once; then, in
the same run, several rounds of:

* raw      - nats-py's ordered consumer on the room's subjects, counting messages (the baseline);
* ndjson   - the CLI's NDJSON path in this process (read, decode, encode, write to a sink);
* cli      - the real ``ledger replay <room> --json`` in a subprocess, its stdout read through a
             pipe: time to the first line from process start (interpreter and imports included),
             events/s over the whole run, peak memory (it streams: no full load).

Medians are reported. The last line is one JSON object: figures, baselines, ratios, targets, met.
Targets (issue 6): NDJSON at least 0.5x the raw read; the first line within 300 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import print_json  # noqa: E402
from room_ledger import embedded  # noqa: E402
from room_ledger import events as ev  # noqa: E402
from room_ledger.client import Ledger  # noqa: E402
from room_ledger.settings import Settings  # noqa: E402
from room_ledger.subjects import room_token  # noqa: E402
from room_ledger.timeline import write_ndjson  # noqa: E402

_CHILD = (
    "import atexit, sys\n"
    "atexit.register(lambda: sys.stderr.write(next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))))\n"
    "from room_ledger.cli.main import app\n"
    "sys.argv[0] = 'ledger'\n"
    "app()\n"
)
TARGET_RATIO = 0.5
TARGET_FIRST_LINE_MS = 300.0
#: Start-up a person feels ("The house, second step"): a new process's first line, and --help.
TARGET_START_MS = 300.0
TARGET_HELP_MS = 150.0
STARTS = 10
WORDS = ["account", "invoice", "refund", "charge", "address", "billing", "triage", "caller", "verified", "plan", "line", "device", "payment", "autopay", "schedule", "agent", "transfer", "hold", "moment", "thanks", "sure", "okay", "let", "me", "check", "that", "for", "you"]


def realistic_events(room: str, n: int, seed: int = 7) -> list[ev.KnownEvent]:
    """Mostly transcripts (200 B - 2 KB), with status, floor and session events mixed in."""
    rng = random.Random(seed)
    agents = [ev.Sender(a, "agent") for a in ("triage", "lookup", "scribe", "billing")]
    out: list[ev.KnownEvent] = []
    for i in range(n):
        agent = agents[i % len(agents)]
        roll = rng.random()
        if roll < 0.7:
            words = rng.randint(20, 300)
            body: ev.Body = ev.Transcript(speaker=agent.identity if i % 2 else "caller",
                                          text=" ".join(rng.choice(WORDS) for _ in range(words)),
                                          segment_id=f"SG_{i}", track_id=f"TR_{i % 5}", language="en")
        elif roll < 0.85:
            body = ev.AgentStatus(agent_id=agent.identity, status=rng.choice(["processing", "idle", "resolved"]),
                                  action_lock=rng.random() < 0.5, task="lookup")
        elif roll < 0.93:
            body = ev.SessionPatch(patch={f"field_{rng.randint(0, 150)}": rng.randint(0, 10**6) for _ in range(8)})
        else:
            body = ev.FloorRequest(agent_id=agent.identity, task="answer")
        out.append(ev.make_event(room, body, sender=agent))
    return out


async def write_room(settings: Settings, room: str, n: int) -> float:
    events = realistic_events(room, n)
    started = time.perf_counter()
    async with Ledger(settings) as ledger:
        for start in range(0, n, 5000):
            await ledger.append_many(events[start : start + 5000])
    return time.perf_counter() - started


async def raw_read(settings: Settings, room: str, n: int) -> dict[str, float]:
    """The baseline: nats-py's ordered consumer on the room's subjects, counting messages."""
    import nats
    from nats.js import api

    started = time.perf_counter()
    nc = await nats.connect(servers=list(settings.nats_urls or ()))
    js = nc.jetstream()
    sub = await js.subscribe(
        f"{settings.subject_prefix}.{room_token(room)}.>", stream=settings.stream, ordered_consumer=True,
        config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL, mem_storage=True),
        pending_msgs_limit=1_000_000, pending_bytes_limit=512 * 1024 * 1024,
    )
    count = 0
    first = 0.0
    async for _msg in sub.messages:
        count += 1
        if count == 1:
            first = time.perf_counter()
        if count >= n:
            break
    done = time.perf_counter()
    await sub.unsubscribe()
    await nc.close()
    return {"events": count, "seconds": done - started, "first_ms": (first - started) * 1000}


class _Sink(io.RawIOBase):
    """A binary stdout that counts bytes and remembers when the first line arrived."""

    def __init__(self) -> None:
        self.bytes = 0
        self.first: float | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.first is None:
            self.first = time.perf_counter()
        self.bytes += len(data)
        return len(data)


async def ndjson_read(settings: Settings, room: str) -> dict[str, float]:
    """The CLI's NDJSON path in this process, from connecting to the last line."""
    sink = _Sink()
    out = io.BufferedWriter(sink, buffer_size=64 * 1024)
    started = time.perf_counter()
    async with Ledger(settings, name="bench-replay") as ledger:
        # What `ledger replay --json` runs: the room's records, each an NDJSON line (ledger.timeline).
        await ledger.require_room(room)
        count = await write_ndjson(ledger.read(room), out)
    done = time.perf_counter()
    first = sink.first or done
    return {"events": count, "seconds": done - started, "first_ms": (first - started) * 1000,
            "mb": sink.bytes / 1e6}


def cli_read(settings: Settings, room: str, *, as_json: bool = True) -> dict[str, float]:
    """The real command in a subprocess, ``ledger replay <room> [--json]``, read through a pipe."""
    started = time.perf_counter()
    # The child reports its own peak memory (VmHWM belongs to the exec'd image, unlike ru_maxrss,
    # which would count the pages of this large parent process it was forked from).
    argv = [sys.executable, "-c", _CHILD, "replay", room] + (["--json"] if as_json else [])
    proc = subprocess.Popen(argv, cwd=ROOT, env=_child_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    first_line = proc.stdout.readline()
    first = time.perf_counter()
    count = 1 if first_line else 0
    for chunk in iter(lambda: proc.stdout.read(1 << 20), b""):  # type: ignore[union-attr]
        count += chunk.count(b"\n")
    code = proc.wait()
    done = time.perf_counter()
    err = proc.stderr.read().decode() if proc.stderr else ""
    if code != 0:
        raise SystemExit(f"ledger replay failed: {err}")
    peak = [line.split()[1] for line in err.splitlines() if line.startswith("VmHWM:")]
    if not as_json:
        count -= 2  # the date header and the closing count line
    return {"events": count, "seconds": done - started, "first_ms": (first - started) * 1000,
            "rss_mb": int(peak[-1]) / 1024 if peak else 0.0}


def _child_env(settings: Settings) -> dict[str, str]:
    # Bytecode on, as a pip-installed package has it: without it (PYTHONDONTWRITEBYTECODE in this
    # environment) every start compiles the product's modules again, 70 ms no user pays.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "LEDGER_NATS_URL": ",".join(settings.nats_urls or ()), "LEDGER_HOME": str(settings.home)}


def cli_first_line_small(settings: Settings, room: str, *, as_json: bool = True) -> float:
    """Time to the first line of ``ledger replay <room> [--json]`` as a new process (a small room:
    the start-up a person feels)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "room_ledger.cli.main", "replay", room,
                             *(["--json"] if as_json else [])], cwd=ROOT, env=_child_env(settings),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    proc.stdout.readline()
    first = time.perf_counter()
    proc.stdout.read()
    proc.wait()
    return (first - started) * 1000


def import_ms(settings: Settings) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import room_ledger.cli.main"], cwd=ROOT, check=True, env=_child_env(settings))
    return (time.perf_counter() - started) * 1000


def help_ms(settings: Settings) -> float:
    """``ledger --help`` as a new process, to its exit."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "room_ledger.cli.main", "--help"], cwd=ROOT, check=True,
                   env=_child_env(settings), stdout=subprocess.DEVNULL)
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    home: Path | None = None
    settings = Settings.from_env()
    if settings.embedded_nats:
        home = Path(tempfile.mkdtemp(prefix="ledger-bench-replay-"))
        info = embedded.ensure_nats(home, sync_always=True)
        settings = settings.replace(nats_urls=(info.url,), home=home)
    room = f"bench-replay-{uuid.uuid4().hex[:8]}"
    try:
        wrote = asyncio.run(write_room(settings, room, args.events))
        print(f"room {room}: {args.events:,} events written in {wrote:.1f}s "
              f"(NATS {settings.nats_urls[0] if settings.nats_urls else '?'}, fsync on every write)", flush=True)
        rounds: dict[str, list[dict[str, float]]] = {"raw": [], "ndjson": [], "cli": []}
        for i in range(args.runs):
            rounds["raw"].append(asyncio.run(raw_read(settings, room, args.events)))
            rounds["ndjson"].append(asyncio.run(ndjson_read(settings, room)))
            rounds["cli"].append(cli_read(settings, room))
            r = {k: v[-1] for k, v in rounds.items()}
            print(f"  round {i + 1}: raw {r['raw']['events'] / r['raw']['seconds']:,.0f}/s, "
                  f"ndjson {r['ndjson']['events'] / r['ndjson']['seconds']:,.0f}/s, "
                  f"cli {r['cli']['events'] / r['cli']['seconds']:,.0f}/s, "
                  f"cli first line {r['cli']['first_ms']:.0f} ms", flush=True)
        for kind, results in rounds.items():
            bad = [x["events"] for x in results if x["events"] != args.events]
            if bad:
                raise SystemExit(f"{kind} read {bad} events, expected {args.events}")
        timeline = cli_read(settings, room, as_json=False)
        small_room = f"{room}-small"
        asyncio.run(write_room(settings, small_room, 10))
        help_ms(settings)  # writes the bytecode the runs below read
        small_first = [cli_first_line_small(settings, small_room) for _ in range(STARTS)]
        small_timeline = [cli_first_line_small(settings, small_room, as_json=False) for _ in range(STARTS)]
        helps = [help_ms(settings) for _ in range(STARTS)]
        imports = [import_ms(settings) for _ in range(3)]

        def med(kind: str, key: str) -> float:
            return statistics.median(x[key] for x in rounds[kind])

        def rate(kind: str) -> float:
            return statistics.median(x["events"] / x["seconds"] for x in rounds[kind])

        figures = {
            "events": args.events,
            "ndjson_events_per_s": round(rate("ndjson")),
            "cli_events_per_s": round(rate("cli")),
            "first_line_ms": round(med("ndjson", "first_ms"), 1),
            "cli_first_line_ms": round(med("cli", "first_ms"), 1),
            "cli_first_line_small_room_ms": round(statistics.median(small_first), 1),
            "cli_timeline_first_line_small_room_ms": round(statistics.median(small_timeline), 1),
            "cli_help_ms": round(statistics.median(helps), 1),
            "cli_import_ms": round(statistics.median(imports), 1),
            "cli_peak_rss_mb": round(max(x["rss_mb"] for x in rounds["cli"]), 1),
            "timeline_events_per_s": round(timeline["events"] / timeline["seconds"]),
            "ndjson_mb": round(med("ndjson", "mb"), 1),
        }
        baselines = {"raw_ordered_consumer_events_per_s": round(rate("raw")),
                     "raw_first_message_ms": round(med("raw", "first_ms"), 1)}
        ratios = {"ndjson_vs_raw": round(figures["ndjson_events_per_s"] / baselines["raw_ordered_consumer_events_per_s"], 3),
                  "cli_vs_raw": round(figures["cli_events_per_s"] / baselines["raw_ordered_consumer_events_per_s"], 3)}
        targets = {"ndjson_vs_raw": TARGET_RATIO, "first_line_ms": TARGET_FIRST_LINE_MS,
                   "cli_timeline_first_line_small_room_ms": TARGET_START_MS, "cli_help_ms": TARGET_HELP_MS}
        met = {"ndjson_vs_raw": ratios["ndjson_vs_raw"] >= TARGET_RATIO,
               "first_line_ms": figures["first_line_ms"] <= TARGET_FIRST_LINE_MS,
               "cli_first_line_ms": figures["cli_first_line_ms"] <= TARGET_FIRST_LINE_MS,
               "cli_timeline_first_line_small_room_ms":
                   figures["cli_timeline_first_line_small_room_ms"] <= TARGET_START_MS,
               "cli_help_ms": figures["cli_help_ms"] <= TARGET_HELP_MS}

        print()
        print(f"{'':34}{'events/s':>12}{'first line':>14}{'vs raw':>9}")
        print(f"{'raw ordered consumer (nats-py)':34}{baselines['raw_ordered_consumer_events_per_s']:>12,}"
              f"{baselines['raw_first_message_ms']:>11.0f} ms{'1.00x':>9}")
        print(f"{'replay --json (in process)':34}{figures['ndjson_events_per_s']:>12,}"
              f"{figures['first_line_ms']:>11.0f} ms{ratios['ndjson_vs_raw']:>8.2f}x")
        print(f"{'ledger replay --json (subprocess)':34}{figures['cli_events_per_s']:>12,}"
              f"{figures['cli_first_line_ms']:>11.0f} ms{ratios['cli_vs_raw']:>8.2f}x")
        print(f"medians of {args.runs} runs over {args.events:,} events ({figures['ndjson_mb']} MB of NDJSON); "
              f"CLI: imports {figures['cli_import_ms']:.0f} ms, first line on a small room "
              f"{figures['cli_first_line_small_room_ms']:.0f} ms, peak RSS {figures['cli_peak_rss_mb']} MB")
        print(f"readable timeline (no --json) through a pipe: {figures['timeline_events_per_s']:,} events/s")
        print(f"start-up, medians of {STARTS} new processes: `ledger replay <small room>` first line "
              f"{figures['cli_timeline_first_line_small_room_ms']:.0f} ms (target {TARGET_START_MS:.0f}), "
              f"`ledger --help` {figures['cli_help_ms']:.0f} ms (target {TARGET_HELP_MS:.0f})")
        print(f"targets: NDJSON >= {TARGET_RATIO}x raw: {'met' if met['ndjson_vs_raw'] else 'NOT met'}; "
              f"first line <= {TARGET_FIRST_LINE_MS:.0f} ms: in process {'met' if met['first_line_ms'] else 'NOT met'}, "
              f"CLI subprocess {'met' if met['cli_first_line_ms'] else 'NOT met'}")
        print_json(figures=figures, baselines=baselines, ratios=ratios, targets=targets, met=met)
    finally:
        async def cleanup() -> None:
            async with Ledger(settings) as ledger:
                for name in (room, f"{room}-small"):
                    await ledger.rooms.purge(name)

        try:
            asyncio.run(cleanup())
        except Exception as exc:  # the figures are printed already; say why cleanup failed
            print(f"cleanup failed: {exc}", file=sys.stderr)
        if home is not None:
            embedded.stop_nats(home)
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
