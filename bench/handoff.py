#!/usr/bin/env python
"""Handoff dead air on the real livekit-server: cross-process (cold dispatch, warm standby) against
LiveKit's in-process handoff, with the same scripted LLM.

Each handoff is one call in a fresh room: the caller (an ``rtc.Room`` in this process) types on
``lk.chat`` — "my account is 7", then "I have a question about my bill" — and the triage agent
hands it to billing. **Dead air** is what the caller sees on ``lk.transcription``: from the end
of the last reply before billing's first (triage's "One moment, I'm transferring you now.") to
the start of billing's first reply, both taken on the caller's clock as the streams arrive.

* **cold**: ``examples/handoff`` workers in two processes; ``transfer_to`` dispatches billing
  (AgentDispatch), billing hydrates to the handoff's sequence and speaks.
* **warm**: the same, triage with ``HANDOFF_WARM=1``: billing was dispatched as a standby when
  the call started and follows the room's log; the handoff needs no dispatch and no hydration.
* **baseline (same run)**: LiveKit's own in-process handoff: one worker, one ``AgentSession``,
  triage's tool returns the billing ``Agent`` (after saying the same "One moment"), same scripted
  LLMs.

A ``ledger`` bridge (in this process) records the ledger runs' rooms; ``ledger replay --handoffs``
is read for each and its dead air reported beside the measured one. Without ``LIVEKIT_URL`` the
script re-runs itself in the tests' private network namespace and starts its own livekit-server
(``tests/livekit``); NATS is embedded in a scratch home. Prints a table, then one JSON line.

    .venv/bin/python bench/handoff.py [--handoffs 20] [--quick] [--voice]

``--voice``: the same calls by voice (the workers with ``HANDOFF_VOICE=1``: silero VAD,
pocketsphinx, espeak-ng; ``examples/voice/offline.py``). The caller speaks into a microphone
track and **dead air is what it hears**: from the last voiced 10 ms frame (an energy threshold)
of triage's "One moment, I'm transferring you now." to the first voiced frame of billing's
greeting. Beside it, what ``ledger replay --handoffs`` computes for the same handoff: from the
source's playout ending to the target's starting (agent states), which counts the TTS's own
trailing and leading silence as speech.

Targets (issue 14): warm p50 <= in-process p50 + 150 ms, warm p99 <= in-process p99 + 300 ms,
cold p50 <= 1.5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "handoff"
INPROC = ROOT / "bench" / "_handoff_inproc.py"
sys.path.insert(0, str(ROOT))

from bench._common import print_json, run_with_livekit  # noqa: E402 - needs ROOT on sys.path

TARGET_WARM_P50_OVER_MS = 150.0
TARGET_WARM_P99_OVER_MS = 300.0
TARGET_COLD_P50_MS = 1500.0
BILLING_PREFIX = "Hi Ana, billing here"


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def rnd(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# --- the caller ---------------------------------------------------------------------------------


@dataclass
class Heard:
    text: str
    started: float
    ended: float


@dataclass
class Caller:
    """The caller's side of one call: what it hears on lk.transcription, when."""

    room: Any
    heard: list[Heard] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def start(self) -> None:
        self.room.register_text_stream_handler("lk.transcription", self._on_stream)

    def _on_stream(self, reader: Any, identity: str) -> None:
        started = time.perf_counter()
        task = asyncio.create_task(self._read(reader, started))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _read(self, reader: Any, started: float) -> None:
        from livekit.rtc.data_stream import StreamError

        try:
            text = await reader.read_all()
        except StreamError:  # the call ended (the caller hung up) while an agent was still speaking
            return
        if text.strip():
            self.heard.append(Heard(text, started, time.perf_counter()))
            self.changed.set()

    async def until(self, predicate: Any, timeout: float = 30.0) -> Heard:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for heard in self.heard:
                        if predicate(heard):
                            return heard
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise RuntimeError(f"the call stalled; the caller heard {[h.text for h in self.heard]}") from None

    async def say(self, text: str) -> None:
        await self.room.local_participant.send_text(text, topic="lk.chat")

    def stream_opened(self, prefix: str) -> float:
        """When the caller began receiving the reply starting ``prefix`` (its perf_counter time)."""
        return next(h.started for h in self.heard if h.text.startswith(prefix))

    def dead_air_ms(self) -> float:
        first_b = next(i for i, h in enumerate(self.heard) if h.text.startswith(BILLING_PREFIX))
        if first_b == 0:
            raise RuntimeError("billing spoke first")
        # (in-process, billing's first words can start while triage's last are still arriving: 0)
        return max(0.0, (self.heard[first_b].started - self.heard[first_b - 1].ended) * 1000)


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Env:
    url: str
    key: str
    secret: str
    settings: Any
    scratch: Path
    tag: str
    voice: bool = False
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "LIVEKIT_URL": self.url, "LIVEKIT_API_KEY": self.key, "LIVEKIT_API_SECRET": self.secret,
                "LEDGER_NATS_URL": ",".join(self.settings.nats_urls), "LEDGER_HOME": str(self.settings.home),
                "LEDGER_STREAM": self.settings.stream, "LEDGER_SUBJECT_PREFIX": self.settings.subject_prefix,
                "PYTHONPATH": str(ROOT), "HANDOFF_LOG_LEVEL": "WARNING",
                "HANDOFF_LEDGER_LOG_LEVEL": os.environ.get("HANDOFF_LEDGER_LOG_LEVEL", "INFO"),
                **({"HANDOFF_VOICE": "1"} if self.voice else {}), **extra}

    def token(self, identity: str, room: str) -> str:
        from tests.livekit.server import mint_token

        return mint_token(self.key, self.secret, identity, room)


def spawn(env: Env, argv: list[str], agent_name: str, **extra: str) -> subprocess.Popen[bytes]:
    with (env.scratch / f"{agent_name}.log").open("ab") as log:
        # a group of its own: stopped with every process it starts (tests/processes.py)
        return subprocess.Popen([sys.executable, *argv], env=env.env(**extra), stdout=log, stderr=subprocess.STDOUT,
                                cwd=ROOT, start_new_session=True)


async def start_worker(env: Env, server: Any, argv: list[str], agent_name: str, **extra: str) -> None:
    mark = server.log_mark() if server is not None else 0
    proc = spawn(env, argv, agent_name, **extra)
    env.procs.append(proc)
    if server is not None:
        await server.worker_registered(agent_name, 90, after=mark)
    else:  # a remote server: no log to read; give the worker a moment to register
        await asyncio.sleep(5)
    if proc.poll() is not None:
        raise RuntimeError(f"{agent_name} exited with {proc.returncode}; see {env.scratch / agent_name}.log")


async def one_call(env: Env, lk: Any, agent_name: str, *, bridged: bool, writer: Any,
                   standby: str | None = None) -> tuple[float, str]:
    """One call in a fresh room, handed off once; returns (dead air ms, room)."""
    from livekit import api, rtc

    from room_ledger.bridge.worker import bridge_one_room
    from room_ledger.handoff import standing_by
    from room_ledger.state import fold
    from room_ledger.watch import watch

    room_name = f"handoff-{env.tag}-{uuid.uuid4().hex[:8]}"
    stop = asyncio.Event()
    bridge_task: asyncio.Task[None] | None = None
    if bridged:
        joined = asyncio.Event()
        bridge_task = asyncio.create_task(bridge_one_room(env.settings, room_name, writer, stop,
                                                          on_connected=lambda _: joined.set()))
        await asyncio.wait_for(joined.wait(), 30)
    room = rtc.Room()
    await room.connect(env.url, env.token("caller", room_name))
    caller = Caller(room)
    caller.start()
    voice: Any = None
    if env.voice:
        from examples.voice.offline import VoiceCaller

        voice = await VoiceCaller.create(room)
    try:
        await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(agent_name=agent_name, room=room_name))
        await caller.until(lambda h: True)  # the greeting
        if standby is not None:
            # the standby joins when the call starts; a real call lasts longer than this wait
            async with watch(writer.ledger, room_name) as log:
                await log.until(lambda rs: standing_by(fold(rs), standby), 30, what=f"{standby}'s standby")
        if voice is not None:
            await _quiet(voice, room)
            await voice.say("my account is seven")
        else:
            await caller.say("Hi, I'm Ana, my account is 7")
        await caller.until(lambda h: h.text.startswith("Thanks Ana"))
        if voice is not None:
            await _quiet(voice, room)
            await voice.say("i have a question about my bill")
        else:
            await caller.say("I have a question about my bill")
        await caller.until(lambda h: h.text.startswith(BILLING_PREFIX), timeout=60)
        if voice is not None:
            # (its transcript stream ends with the speech: its audio has been heard by now)
            return _voiced_dead_air_ms(voice, room, caller), room_name
        return caller.dead_air_ms(), room_name
    finally:
        if voice is not None:
            await voice.aclose()
        await room.disconnect()
        stop.set()
        if bridge_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(bridge_task, 20)


async def _quiet(voice: Any, room: Any) -> None:
    """Wait until no agent has been audible for 0.6 s (the caller speaks after the agent's turn)."""
    while True:
        last = max((t for p in voice.identities() for t in voice.voiced_times(p)[-1:]), default=0.0)
        if time.time() - last >= 0.6:
            return
        await asyncio.sleep(0.1)


def _voiced_dead_air_ms(voice: Any, room: Any, caller: Caller) -> float:
    """Silence the caller heard: from the last voiced frame before billing's greeting to its first.

    Billing's greeting starts at the first voiced run beginning after its transcript stream opened
    (a synchronised transcript opens with the speech; 0.25 s of slack for the stream arriving first
    or late); the voiced frame before that run, from anyone, is the end of triage's last words.
    """
    opened = time.time() - (time.perf_counter() - caller.stream_opened(BILLING_PREFIX))
    frames = sorted(t for p in voice.identities() for t in voice.voiced_times(p))
    for i, t in enumerate(frames):
        if t >= opened - 0.25 and (i == 0 or t - frames[i - 1] > 0.1):
            if i == 0:
                raise RuntimeError("billing's greeting is the first thing the caller heard")
            return float(max(0.0, (t - frames[i - 1]) * 1000))
    raise RuntimeError("billing's greeting was never audible")


async def replay_dead_air_ms(env: Env, room: str) -> float | None:
    from room_ledger.client import Ledger
    from room_ledger.timeline import handoffs

    async with Ledger(env.settings) as ledger:
        rows = [r for r in await handoffs(ledger, room) if r.via == "handoff"]
    if not rows or rows[0].dead_air_s is None:
        return None
    return rows[0].dead_air_s * 1000


async def controller(args: argparse.Namespace) -> int:
    from livekit import api

    from room_ledger import embedded
    from room_ledger.bridge.writer import BridgeWriter
    from room_ledger.client import Ledger
    from room_ledger.settings import Settings

    scratch = Path(tempfile.mkdtemp(prefix="bench-handoff-"))
    tag = uuid.uuid4().hex[:6]
    server: Any = None
    nats_started = False
    env: Env | None = None
    try:
        if url := os.environ.get("LIVEKIT_URL"):
            key, secret = os.environ["LIVEKIT_API_KEY"], os.environ["LIVEKIT_API_SECRET"]
        else:
            from tests.livekit.server import LocalLiveKit

            server = LocalLiveKit(scratch / "livekit").start()
            url, key, secret = server.url, server.api_key, server.api_secret
        nats_url = os.environ.get("LEDGER_NATS_URL")
        if not nats_url:
            nats_url = embedded.ensure_nats(scratch / "home", sync_always=False).url
            nats_started = True
        settings = Settings(nats_urls=tuple(nats_url.split(",")), home=scratch / "home", stream=f"BENCH_{tag}",
                            subject_prefix=f"bench{tag}", livekit_url=url, livekit_api_key=key,
                            livekit_api_secret=secret)
        env = Env(url, key, secret, settings, scratch, tag, voice=args.voice)
        names = {"cold": f"triage-{tag}", "warm": f"triage-warm-{tag}", "inproc": f"inproc-{tag}"}
        billing = f"billing-{tag}"
        common = {"HANDOFF_BILLING_AGENT": billing}
        await start_worker(env, server, [str(EXAMPLE / "billing.py")], billing, **common)
        await start_worker(env, server, [str(EXAMPLE / "triage.py")], names["cold"],
                           HANDOFF_TRIAGE_AGENT=names["cold"], **common)
        await start_worker(env, server, [str(EXAMPLE / "triage.py")], names["warm"],
                           HANDOFF_TRIAGE_AGENT=names["warm"], HANDOFF_WARM="1", **common)
        await start_worker(env, server, [str(INPROC)], names["inproc"],
                           HANDOFF_TRIAGE_AGENT=names["inproc"], **common)
        http = url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
        dead: dict[str, list[float]] = {mode: [] for mode in names}
        replayed: dict[str, list[float]] = {"cold": [], "warm": []}
        async with Ledger(settings) as ledger, api.LiveKitAPI(http, key, secret) as lk:
            writer = BridgeWriter(ledger, stats_interval=0)
            await writer.start()
            try:
                # interleaved, so a slow moment of the machine hits every mode alike
                for i in range(args.warmup + args.handoffs):
                    for mode in ("inproc", "cold", "warm"):
                        try:
                            ms, room = await one_call(env, lk, names[mode], bridged=mode != "inproc", writer=writer,
                                                      standby=billing if mode == "warm" else None)
                        except RuntimeError as exc:
                            raise RuntimeError(f"{mode}: {exc}; worker logs in {env.scratch}") from None
                        if i < args.warmup:
                            continue
                        dead[mode].append(ms)
                        if mode != "inproc" and (r := await replay_dead_air_ms(env, room)) is not None:
                            replayed[mode].append(r)
                    if i >= args.warmup:
                        print(f"handoff {i - args.warmup + 1}/{args.handoffs}: " + ", ".join(
                            f"{m} {dead[m][-1]:.0f} ms" for m in dead), flush=True)
            finally:
                await writer.close()
        return report(dead, replayed, args)
    finally:
        if env is not None:
            from tests.processes import stop_popen

            for proc in env.procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)  # all at once, then each waited for
            for proc in env.procs:
                stop_popen(proc)
        if server is not None:
            server.stop()
        if nats_started:
            from room_ledger import embedded as emb

            emb.stop_nats(scratch / "home")
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"scratch kept: {scratch}")


def report(dead: dict[str, list[float]], replayed: dict[str, list[float]], args: argparse.Namespace) -> int:
    figures: dict[str, Any] = {}
    for mode in ("cold", "warm"):
        figures[f"{mode}_p50_ms"] = rnd(pct(dead[mode], 50))
        figures[f"{mode}_p99_ms"] = rnd(pct(dead[mode], 99))
        figures[f"{mode}_replay_p50_ms"] = rnd(pct(replayed[mode], 50))
    figures["handoffs_per_mode"] = len(dead["cold"])
    baselines = {"inproc_p50_ms": rnd(pct(dead["inproc"], 50)), "inproc_p99_ms": rnd(pct(dead["inproc"], 99))}
    ratios = {
        "warm_p50_minus_inproc_ms": rnd((figures["warm_p50_ms"] or 0) - (baselines["inproc_p50_ms"] or 0)),
        "warm_p99_minus_inproc_ms": rnd((figures["warm_p99_ms"] or 0) - (baselines["inproc_p99_ms"] or 0)),
        "cold_p50_over_inproc": rnd((figures["cold_p50_ms"] or 0) / max(baselines["inproc_p50_ms"] or 1, 1e-9)),
    }
    targets = {"warm_p50_minus_inproc_ms": TARGET_WARM_P50_OVER_MS, "warm_p99_minus_inproc_ms": TARGET_WARM_P99_OVER_MS,
               "cold_p50_ms": TARGET_COLD_P50_MS}
    met = {
        "warm_p50_minus_inproc_ms": ratios["warm_p50_minus_inproc_ms"] is not None
        and ratios["warm_p50_minus_inproc_ms"] <= TARGET_WARM_P50_OVER_MS,
        "warm_p99_minus_inproc_ms": ratios["warm_p99_minus_inproc_ms"] is not None
        and ratios["warm_p99_minus_inproc_ms"] <= TARGET_WARM_P99_OVER_MS,
        "cold_p50_ms": figures["cold_p50_ms"] is not None and figures["cold_p50_ms"] <= TARGET_COLD_P50_MS,
    }
    print()
    heading = "dead air heard (ms)" if args.voice else "dead air (ms)"
    print(f"{heading:<28}{'p50':>10}{'p99':>10}{'replay p50':>12}   n={len(dead['cold'])}")
    for label, mode in (("in-process (LiveKit)", "inproc"), ("cold (dispatch)", "cold"), ("warm standby", "warm")):
        rp = pct(replayed.get(mode, []), 50)
        print(f"{label:<28}{pct(dead[mode], 50) or 0:>10.0f}{pct(dead[mode], 99) or 0:>10.0f}"
              f"{'' if rp is None else f'{rp:.0f}':>12}")
    print(f"targets: warm p50 <= in-process + {TARGET_WARM_P50_OVER_MS:g} ms ({'met' if met['warm_p50_minus_inproc_ms'] else 'missed'}), "
          f"warm p99 <= in-process + {TARGET_WARM_P99_OVER_MS:g} ms ({'met' if met['warm_p99_minus_inproc_ms'] else 'missed'}), "
          f"cold p50 <= {TARGET_COLD_P50_MS:g} ms ({'met' if met['cold_p50_ms'] else 'missed'})")
    if args.voice:
        print("by voice: dead air from the last voiced 10 ms frame the caller heard to the next; replay: from the "
              "source's playout end to the target's playout start (agent states), the TTS's own silence counted "
              "as speech")
    figures["mode"] = "voice" if args.voice else "text"
    print_json(figures=figures, baselines=baselines, ratios=ratios, targets=targets, met=met,
               samples_ms={m: [round(x, 1) for x in v] for m, v in dead.items()},
               median_ms={m: rnd(statistics.median(v)) if v else None for m, v in dead.items()})
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--handoffs", type=int, default=20, help="handoffs measured per mode (>= 20 for the issue)")
    parser.add_argument("--warmup", type=int, default=1, help="calls per mode run first and not counted")
    parser.add_argument("--quick", action="store_true", help="5 handoffs per mode")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (worker logs)")
    parser.add_argument("--voice", action="store_true",
                        help="by voice: dead air measured in the audio the caller hears (the offline voice stack)")
    args = parser.parse_args()
    if args.quick:
        args.handoffs = 5

    return run_with_livekit(__file__, controller(args))


if __name__ == "__main__":
    sys.exit(main())
