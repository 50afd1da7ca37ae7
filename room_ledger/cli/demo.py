"""``ledger demo``: the whole product in seconds, on the embedded default, with nothing configured.

1. Three agents take turns on one caller with action locks (seed 000): their coordination
   packets, speech and the caller's words go through the bridge's ingest path (the code that
   turns room observations into events, without WebRTC) and its ordered writer.  With
   ``LIVEKIT_URL`` set they are real participants in a real LiveKit room instead, and a bridge in
   that room records them (``room_ledger/cli/demo_live.py``).
2. The projector folds the log into PostgreSQL; the triage agent hands the caller to a billing
   specialist that runs in another process (seed 001). That process hydrates the room to the
   handoff's sequence: ~120 session fields, the conversation as a ChatContext, the floor.
3. The replay timeline, the floor lanes, the handoff with its dead air, and what the late
   joiner got, with measured timings (ingest events/s on a burst through the same path,
   hydrate ms in the other process).

Afterwards the demo's rooms are purged and the servers it started are stopped, unless ``--keep``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from room_ledger import embedded
from room_ledger.bridge.stats import stats_path
from room_ledger.bridge.writer import BridgeWriter
from room_ledger.cli import replay as core
from room_ledger.cli.common import CliError, format_duration
from room_ledger.cli.demo_live import live_room
from room_ledger.cli.ops import projection_rows, room_event_count
from room_ledger.cli.timeline import TimelinePrinter
from room_ledger.cli.views import render_floor, render_handoffs
from room_ledger.client import Ledger
from room_ledger.hydrate import close as close_hydration
from room_ledger.hydrate import hydrate
from room_ledger.projections.projector import Projector
from room_ledger.settings import Settings

#: Events pushed through the ingest path to measure its throughput.
BURST_EVENTS: Final = 5000
#: A pause between scripted steps, so the floor timeline has some width (real time, not sleeps in tests).
BEAT_S: Final = 0.04
FINAL = {"lk.transcription_final": "true"}
_REPO: Final = str(Path(__file__).resolve().parents[2])

CALLER = "caller"
AGENTS = ("triage", "lookup", "scribe")
SPECIALIST = "billing"


def session_fields() -> list[dict[str, Any]]:
    """The ~120 fields a real call accumulates (seed 001), in the patches that set them."""
    identity = {
        "caller_name": "Dana Whitfield", "caller_phone": "+1-555-0142", "caller_verified": True,
        "verification_method": "dob+zip", "account_id": "ACC-4471", "account_tier": "gold",
        "language": "en-US", "consent_recording": True,
    }
    account = {f"account_{k}": v for k, v in {
        "opened": "2019-03-02", "status": "active", "balance_usd": 142.5, "autopay": True,
        "billing_day": 14, "plan": "Family 4 lines", "lines": 4, "past_due": False,
        "last_payment_usd": 85.0, "last_payment_on": "2024-04-14",
    }.items()}
    invoice = {
        "invoice_id": "INV-2291", "invoice_total_usd": 127.5, "duplicate_charge_usd": 42.5,
        "duplicate_charge_on": "2024-05-01", "dispute_open": False,
    }
    address = {
        "address_old": {"street": "12 Elm St", "city": "Springfield", "zip": "62701"},
        "address_new": {"street": "400 Lake Rd", "city": "Springfield", "zip": "62704"},
        "address_updated": True,
    }
    workflow = {f"step_{i:02d}_{name}": done for i, (name, done) in enumerate([
        ("greet", True), ("identify", True), ("verify", True), ("lookup", True), ("address", True),
        ("route", True), ("billing", False), ("refund", False), ("survey", False),
    ])}
    facility = {f"facility_{i:03d}": {"code": f"F{i:03d}", "open": i % 3 != 0} for i in range(1, 58)}
    flags = {f"flag_{name}": value for name, value in {
        "vip": False, "fraud_watch": False, "paperless": True, "sms_ok": True, "email_ok": True,
        "callback_requested": False, "escalated": False, "repeat_caller": True, "sentiment_low": False,
        "needs_followup": True, "promo_eligible": True, "hardship": False, "spanish_pref": False,
        "tty": False, "accessibility": False, "military": False, "student": False, "senior": False,
        "business": False, "prepaid": False, "bundle": True, "device_protection": True,
        "intl_roaming": False, "data_cap_hit": False, "loyalty_offer": True, "survey_opt_in": False,
        "port_in": False, "esim": True,
    }.items()}
    return [identity, account, address, workflow, facility, flags, invoice]


class Script:
    """Drives the scripted session through the bridge's ingest path, one step at a time."""

    def __init__(self, writer: Any, room: str) -> None:
        self.writer = writer
        self.ingest = writer.ingest(room)
        self.room = room
        self._n = 0

    def _id(self) -> str:
        self._n += 1
        return f"{self.room}-{self._n:04d}"

    async def beat(self, pause: float = BEAT_S) -> None:
        if not await self.writer.flush(10.0):
            raise CliError("the bridge writer got no acknowledgement within 10s: is NATS healthy? (`ledger doctor`)")
        await asyncio.sleep(pause)

    def join(self, identity: str, kind: str) -> None:
        self.ingest.participant_joined(identity, kind=kind, sid=f"PA_{identity}", tracks=[f"TR_{identity}"],
                                       attributes={"lk.agent.state": "listening"} if kind == "agent" else {})

    def say(self, speaker: str, text: str, *, transcriber: str | None = None) -> None:
        """A final transcript of ``speaker``'s track, published by ``transcriber`` (default: itself)."""
        self.ingest.text_stream(
            text, topic="lk.transcription", stream_id=f"ST_{self._id()}", sender_identity=transcriber or speaker,
            attributes={**FINAL, "lk.segment_id": f"SG_{self._id()}", "lk.transcribed_track_id": f"TR_{speaker}"},
        )

    def state(self, agent: str, state: str, old: str | None = None) -> None:
        self.ingest.participant_attributes(agent, {"lk.agent.state": state}, old_agent_state=old)

    def status(self, agent: str, status: str, lock: bool, task: str | None = None) -> None:
        """The seed-000 coordination payload, as agents broadcast it on their own topic."""
        payload = {"agent_id": agent, "status": status, "action_lock": lock}
        if task:
            payload["task"] = task
        self.ingest.data_packet(json.dumps(payload).encode(), topic="agent-state", sender_identity=agent)

    def publish(self, agent: str, type_: str, **body: Any) -> None:
        """An event an agent publishes with the ledger protocol (topic ``ledger``)."""
        payload = {"type": type_, "id": self._id(), **body}
        self.ingest.data_packet(json.dumps(payload).encode(), topic="ledger", sender_identity=agent)


async def act_one(script: Script) -> None:
    """Seed 000: three agents on one caller, taking turns with action locks."""
    s = script
    s.ingest.bridge_joined("ws://embedded-demo")
    s.join(CALLER, "standard")
    for agent in AGENTS:
        s.join(agent, "agent")
    await s.beat()
    s.say(CALLER, "Hi, I was charged twice on my last invoice, and I also moved, so my address is wrong.",
          transcriber="triage")
    await s.beat()
    patches = session_fields()
    s.status("triage", "processing", True, "greet and identify")
    s.state("triage", "speaking", "listening")
    await s.beat()
    # While triage holds the floor, lookup claims it: it queues, in log order.
    s.status("lookup", "processing", True, "account lookup")
    s.say("triage", "Hello, I can help with both. Can you confirm your date of birth and zip code?")
    await s.beat()
    s.say(CALLER, "March 2nd 1985, and the zip is 62701.", transcriber="triage")
    s.publish("triage", "session.patch", patch=patches[0])
    await s.beat()
    s.status("triage", "resolved", False)
    s.state("triage", "listening", "speaking")
    await s.beat()
    s.state("lookup", "speaking", "listening")
    s.status("scribe", "processing", True, "update address")
    s.say("lookup", "Thanks Dana, you're verified. I have account ACC-4471 on the Family plan.")
    s.publish("lookup", "session.patch", patch={**patches[1], **patches[6]})
    await s.beat()
    s.status("lookup", "resolved", False)
    s.state("lookup", "listening", "speaking")
    await s.beat()
    s.state("scribe", "speaking", "listening")
    s.say(CALLER, "The new address is 400 Lake Road, Springfield, 62704.", transcriber="triage")
    await s.beat()
    s.say("scribe", "Got it: 400 Lake Road, Springfield 62704. Your address is updated.")
    s.publish("scribe", "session.patch", patch={**patches[2], **patches[3]})
    await s.beat()
    s.status("scribe", "resolved", False)
    s.state("scribe", "listening", "speaking")
    await s.beat()
    s.publish("triage", "session.patch", patch={**patches[4], **patches[5]})
    await s.beat()


async def act_two_handoff(script: Script) -> None:
    """Seed 001: triage hands the caller to billing, which runs in another process."""
    s = script
    s.say(CALLER, "Great. And the double charge?", transcriber="triage")
    s.status("triage", "processing", True, "route to billing")
    s.state("triage", "speaking", "listening")
    await s.beat()
    s.say("triage", "That one needs our billing specialist. I'm bringing them in now, one moment.")
    await s.beat()
    s.publish("triage", "handoff", from_agent="triage", to_agent=SPECIALIST,
              reason="duplicate charge on invoice INV-2291")
    s.state("triage", "listening", "speaking")
    await s.beat(0)


async def act_two_arrival(script: Script) -> None:
    s = script
    s.join(SPECIALIST, "agent")
    s.status(SPECIALIST, "processing", True, "refund duplicate charge")
    s.state(SPECIALIST, "speaking", "listening")
    await s.beat()
    s.say(SPECIALIST, "Hi Dana, billing here. I can see the duplicate $42.50 charge on invoice INV-2291 "
          "from May 1st. I've refunded it; it shows in 3 to 5 days.")
    s.publish(SPECIALIST, "session.patch", patch={"step_06_billing": True, "step_07_refund": True,
                                                   "dispute_open": False, "refund_usd": 42.5})
    s.ingest.participant_left("triage", sid="PA_triage", reason="handed off")
    await s.beat()
    s.say(CALLER, "Perfect, thank you!", transcriber=SPECIALIST)
    await s.beat()
    s.status(SPECIALIST, "resolved", False)
    s.state(SPECIALIST, "listening", "speaking")
    await s.beat(0)


async def burst(writer: Any, room: str) -> tuple[int, float]:
    """Push BURST_EVENTS transcripts through the same ingest path; returns (events, seconds)."""
    ingest = writer.ingest(room)
    ingest.participant_joined("load-agent", kind="agent")
    await writer.flush(10.0)
    started = time.perf_counter()
    for i in range(BURST_EVENTS):
        ingest.text_stream(
            f"segment {i}: the quick brown fox jumps over the lazy dog, again and again, as callers do.",
            topic="lk.transcription", stream_id=f"load-{room}-{i}", sender_identity="load-agent",
            attributes={**FINAL, "lk.segment_id": f"SG_{i}"},
        )
    if not await writer.flush(30.0):
        raise CliError("the ingest burst was not acknowledged within 30s")
    return BURST_EVENTS, time.perf_counter() - started


async def start_servers(settings: Settings) -> tuple[Settings, list[str]]:
    """Use the configured servers, or the embedded ones (started if needed). Returns who we started."""
    jobs: dict[str, Any] = {}
    if settings.embedded_nats:
        jobs["nats"] = asyncio.to_thread(embedded.ensure_nats, settings.home, sync_always=settings.nats_sync_always)
    if settings.embedded_postgres:
        jobs["postgres"] = asyncio.to_thread(embedded.ensure_postgres, settings.home)
    results = dict(zip(jobs, await asyncio.gather(*jobs.values()), strict=True))
    started = [name for name, info in results.items() if info.started_here]
    if "nats" in results:
        settings = settings.replace(nats_urls=(results["nats"].url,))
    if "postgres" in results:
        settings = settings.replace(database_url=results["postgres"].url)
    return settings, started


class OtherProcess:
    """The billing specialist in a process of its own (``python -m room_ledger.cli.demo_agent``)."""

    def __init__(self, settings: Settings, room: str, agent_id: str) -> None:
        self.settings = settings
        self.room = room
        self.agent_id = agent_id
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        s = self.settings
        env = {**os.environ, "LEDGER_NATS_URL": ",".join(s.nats_urls or ()), "LEDGER_HOME": str(s.home),
               "LEDGER_STREAM": s.stream, "LEDGER_SUBJECT_PREFIX": s.subject_prefix}
        if s.database_url:
            env["LEDGER_DATABASE_URL"] = s.database_url
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "room_ledger.cli.demo_agent", self.room, self.agent_id,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=_REPO,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    async def line(self, within: float, what: str) -> dict[str, Any]:
        """The process's next JSON line, waited for up to ``within`` seconds."""
        assert self.proc is not None and self.proc.stdout is not None
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), within)
        except TimeoutError:
            raise CliError(f"the {self.agent_id} process did not {what} within {within:.0f}s") from None
        if not raw:
            err = b""
            if self.proc.stderr is not None:
                err = await self.proc.stderr.read()
            last = (err.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise CliError(f"the {self.agent_id} process ended before it could {what}: {last}")
        data: dict[str, Any] = json.loads(raw)
        return data

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()


async def project(settings: Settings) -> tuple[int, float]:

    started = time.perf_counter()
    async with Projector(settings) as projector:
        seq = await projector.catch_up()
    return seq, time.perf_counter() - started


async def run_demo(settings: Settings, *, keep: bool, console: Console | None) -> dict[str, Any]:
    say = console.print if console is not None else (lambda *a, **k: None)
    t0 = time.perf_counter()
    timings: dict[str, Any] = {}
    run_id = uuid.uuid4().hex[:6]
    room = f"demo-{run_id}"
    load_room = f"demo-{run_id}-load"
    say(Text(f"ledger demo: room {room!r}", style="bold"))

    if settings.livekit_url and not (settings.livekit_api_key or settings.livekit_api_secret):
        # `livekit-server --dev`'s keys, as LiveKit's own tools assume for a local dev server
        settings = settings.replace(livekit_api_key="devkey", livekit_api_secret="secret")
        say(f"  LIVEKIT_URL={settings.livekit_url} without LIVEKIT_API_KEY/SECRET: using livekit-server --dev's"
            " keys (devkey/secret)")
    settings, started = await start_servers(settings)
    timings["servers_s"] = round(time.perf_counter() - t0, 3)
    nats_url = ",".join(settings.nats_urls or ())
    pg_url = Settings(database_url=settings.database_url).describe()["database_url"]
    say(f"  servers ready in {format_duration(timings['servers_s'])}: NATS {nats_url}, PostgreSQL {pg_url}"
        + (f" (started {' and '.join(started)} here)" if started else ""))
    summary: dict[str, Any] = {"room": room}

    writer: Any = None
    bridge_ids: list[str] = []
    specialist = OtherProcess(settings, room, SPECIALIST)
    live = contextlib.AsyncExitStack()  # the LiveKit room, when there is one
    try:
        # The specialist's worker starts now and warms up (loads LiveKit Agents) while act 1 plays.
        await specialist.start()
        async with Ledger(settings, name="ledger-demo") as ledger:
            writer = BridgeWriter(ledger, home=settings.home)
            bridge_ids.append(writer.bridge_id)
            await writer.start()
            script: Any
            if settings.livekit_url:

                script = await live.enter_async_context(live_room(settings, ledger, writer, room))
                say(f"  LiveKit {settings.livekit_url}: the bridge is in the room; callers and agents join it"
                    " as real participants")
            else:
                script = Script(writer, room)

            act = time.perf_counter()
            await act_one(script)
            timings["act_one_s"] = round(time.perf_counter() - act, 3)
            say(f"  act 1 (seed 000): three agents took turns with action locks on one caller "
                f"({await _count(ledger, room)} events)")

            seq, took = await project(settings)
            timings["projector_s"] = round(took, 3)
            say(f"  projector folded the log into PostgreSQL up to #{seq} in {format_duration(took)}")

            ready = await specialist.line(20.0, "get ready")
            await act_two_handoff(script)
            handoff_at = time.perf_counter()
            handoff_seq = await ledger.room_last_seq(room)
            say(f"  act 2 (seed 001): triage handed the caller to {SPECIALIST} at #{handoff_seq}; {SPECIALIST} "
                f"runs in another process (pid {specialist.pid}, warmed up in {ready['warm_ms']:.0f} ms)")
            late = await specialist.line(20.0, "hydrate the room")
            late["pid"] = specialist.pid
            late["handoff_to_ready_ms"] = round((time.perf_counter() - handoff_at) * 1000, 1)
            timings["hydrate_ms"] = late["timings_ms"]["hydrate"]
            timings["handoff_to_ready_ms"] = late["handoff_to_ready_ms"]
            say(f"  {SPECIALIST} hydrated #{late['seq']} in {late['timings_ms']['hydrate']} ms "
                f"({late['source']}): ChatContext of {late['chat_ctx_items']} items, {late['session_fields']} "
                f"session fields, floor {late['floor_holder'] or 'free'}")
            await act_two_arrival(script)
            await live.aclose()  # the participants leave; the bridge records it and leaves too

            seq, took = await project(settings)
            timings["projector_final_s"] = round(took, 3)

            warm = time.perf_counter()
            snapshot = await hydrate(ledger, room)
            timings["hydrate_warm_ms"] = round((time.perf_counter() - warm) * 1000, 1)

            await close_hydration(ledger)

            # Measured last and purged at once, so no projector ever folds the load room.
            count, seconds = await burst(writer, load_room)
            timings["ingest_events"] = count
            timings["ingest_events_per_s"] = round(count / seconds)
            say(f"  ingest path: {count:,} events in {format_duration(seconds)} = "
                f"{timings['ingest_events_per_s']:,} events/s (bridge ingest → ordered writer → JetStream, fsync)")
            await ledger.rooms.purge(load_room)
            await writer.close()
            writer = None


            rows = await core.handoffs(ledger, room)
            events = await _count(ledger, room)
            if console is not None:
                await _show(console, ledger, room, snapshot, late, rows)
            timings["total_s"] = round(time.perf_counter() - t0, 3)
            summary.update(
                events=events,
                floor_holder=snapshot.floor.holder,
                session_fields=len(snapshot.session),
                late_joiner=late,
                handoffs=[row.to_builtins() for row in rows],
                timings=timings,
            )
            if console is not None:
                _show_timings(console, timings)
            if not keep:
                summary["cleanup"] = await _cleanup(ledger, settings, room, bridge_ids)
    finally:
        with contextlib.suppress(Exception):
            await live.aclose()
        await specialist.stop()
        if writer is not None:
            with contextlib.suppress(Exception):
                await writer.close(deadline=2.0)
        if not keep:
            for name in started:
                await asyncio.to_thread(embedded.stop_nats if name == "nats" else embedded.stop_postgres,
                                        settings.home)
    summary["kept"] = keep
    if console is not None:
        if keep:
            console.print(Text(f"kept: try `ledger replay {room}`, `ledger replay {room} --floor`, "
                               f"`ledger state {room}`, `ledger rooms`", style="bold green"))
        else:
            console.print(Text("cleaned up (run with --keep to explore the room afterwards)", style="bright_black"))
    return summary


async def _count(ledger: Ledger, room: str) -> int:

    return await room_event_count(ledger, room)


async def _cleanup(ledger: Ledger, settings: Settings, room: str, bridge_ids: list[str]) -> dict[str, Any]:

    removed = await ledger.rooms.purge(room)
    for bridge_id in bridge_ids:

        with contextlib.suppress(OSError):
            stats_path(settings.home, bridge_id).unlink()
    rows = await projection_rows(settings, room, delete=True)
    return {"events_removed": removed, "projection_rows_removed": rows}


async def _show(console: Console, ledger: Ledger, room: str, snapshot: Any, late: dict[str, Any],
                handoff_rows: list[Any]) -> None:

    console.rule(f"ledger replay {room}")
    printer = TimelinePrinter(console)
    async for record in core.records(ledger, room):
        printer.print(record)
    console.rule(f"ledger replay {room} --floor")
    render_floor(console, await core.floor_timeline(ledger, room))
    console.rule(f"ledger replay {room} --handoffs")
    render_handoffs(console, handoff_rows, room)
    console.rule(f"what {SPECIALIST} hydrated in its own process")
    table = Table(show_header=False, box=None)
    table.add_column(style="bright_black")
    table.add_column()
    table.add_row("state as of", f"#{late['seq']} ({late['source']}, {late['caught_up']} log events folded on top "
                                 f"of the projection row at #{late['projection_seq']})")
    table.add_row("ChatContext", f"{late['chat_ctx_items']} items")
    table.add_row("session", f"{late['session_fields']} fields (version #{late['session_version']}), "
                             f"caller {late.get('caller')}")
    table.add_row("floor", f"{late['floor_holder'] or 'free'}"
                           + (f", queue {', '.join(late['floor_queue'])}" if late["floor_queue"] else ""))
    table.add_row("present", ", ".join(late["participants_present"]))
    table.add_row("timings", ", ".join(f"{k} {v} ms" for k, v in late["timings_ms"].items()))
    console.print(Panel(table, border_style="bright_black"))


def _show_timings(console: Console, timings: dict[str, Any]) -> None:
    table = Table(title="timings", title_justify="left", box=None)
    table.add_column("what", style="bright_black")
    table.add_column("measured", justify="right")
    labels: dict[str, tuple[str, Callable[[Any], str]]] = {
        "servers_s": ("servers ready", lambda v: format_duration(v)),
        "act_one_s": ("act 1 (paced like a call)", lambda v: format_duration(v)),
        "projector_s": ("projector catch-up", lambda v: format_duration(v)),
        "hydrate_ms": ("hydrate in the other process", lambda v: f"{v} ms"),
        "handoff_to_ready_ms": ("handoff → specialist has the room", lambda v: f"{v:.0f} ms"),
        "ingest_events_per_s": ("ingest path", lambda v: f"{v:,} events/s"),
        "hydrate_warm_ms": ("hydrate (warm, this process)", lambda v: f"{v} ms"),
        "total_s": ("demo total", lambda v: format_duration(v)),
    }
    for key, (label, fmt) in labels.items():
        if key in timings:
            table.add_row(label, fmt(timings[key]))
    console.print(table)
