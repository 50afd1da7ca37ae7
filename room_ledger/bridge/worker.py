"""Running the bridge: ``run_bridge`` (what ``ledger bridge`` wraps).

* ``room=None``: a LiveKit Agents worker (``AgentServer``) registered under
  ``LEDGER_BRIDGE_AGENT_NAME`` with hidden, subscribe-and-data-only permissions; each room it is
  dispatched to becomes a job (in a thread of this process) with its own ledger connection and
  writer. Many processes can register under one name; LiveKit spreads rooms over them.
* ``room="NAME"``: connect to one room directly with a hidden, subscribe-only token minted from
  ``LIVEKIT_API_KEY``/``LIVEKIT_API_SECRET``; reconnect (recording a gap) until ``stop`` is set.

Either way ``stop`` ends it: the writer flushes within ``flush_deadline`` seconds, and what it
could not write is saved under ``LEDGER_HOME`` for the next bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from livekit import rtc

from room_ledger.bridge._sdk import only_own_room_events
from room_ledger.bridge.room import RoomBridge
from room_ledger.bridge.stats import Counters, read_stats, write_stats
from room_ledger.bridge.tokens import _credentials, bridge_identity, bridge_token
from room_ledger.bridge.writer import BridgeWriter
from room_ledger.client import Ledger
from room_ledger.events import utcnow
from room_ledger.settings import Settings

log = logging.getLogger("bridge.worker")


class _NoPacketDumps(logging.Filter):
    """Drop libwebrtc's packet dumps (``LIVEKIT_RTC_DEBUG=1``): they carry data payloads in hex,
    transcripts, chat and identities included, which never go into the bridge's logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "SCTP_PACKET" in str(record.msg):
            return False
        return not any("text_pcap_packet_observer" in str(arg) for arg in (record.args or ()))


logging.getLogger("livekit").addFilter(_NoPacketDumps())

#: Room-level disconnect reasons after which a direct bridge does not rejoin.
_FINAL_REASONS = frozenset({"ROOM_DELETED", "ROOM_CLOSED"})
#: Disconnect reasons of a lost connection (not a decision by the room, the server or us): a
#: worker-mode job that ends with one of these is rejoined directly (see ``_job_entry``).
_CONNECTION_LOST = frozenset({"UNKNOWN_REASON", "SIGNAL_CLOSE", "CONNECTION_TIMEOUT", "MEDIA_FAILURE",
                              "SERVER_SHUTDOWN", "STATE_MISMATCH", "MIGRATION", ""})


@dataclass
class BridgeProcess:
    """Shared state of one bridge process: its id and counters (read by ``ledger doctor``)."""

    settings: Settings
    bridge_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    counters: Counters = field(default_factory=Counters)
    flush_deadline: float = 5.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Worker mode: the worker's own loop and stop event, and the rooms it rejoined directly.
    loop: asyncio.AbstractEventLoop | None = None
    stop: asyncio.Event | None = None
    rejoins: set[asyncio.Task[Counters]] = field(default_factory=set)

    def write_stats(self, **extra: Any) -> None:
        write_stats(self.settings.home, self.bridge_id, self.counters, extra=extra)

    def rejoin(self, room: str, gap_since: datetime) -> None:
        """Keep bridging ``room`` directly after its job lost the connection (worker mode).

        The SDK gives up reconnecting after ~20 s (a livekit-server restarted, a long network
        cut); the job then ends, and nothing dispatches the bridge again: a self-hosted server
        forgets its dispatches when it restarts. Thread-safe: called from the job's thread.
        """
        loop, stop = self.loop, self.stop
        if loop is None or stop is None or stop.is_set():
            return

        def start() -> None:
            task = asyncio.create_task(run_direct(self.settings, room, stop, process=self, gap_since=gap_since),
                                       name="bridge-rejoin")
            self.rejoins.add(task)
            task.add_done_callback(self.rejoins.discard)

        with contextlib.suppress(RuntimeError):  # the worker's loop has closed: it is stopping
            loop.call_soon_threadsafe(start)


async def _until(stop: asyncio.Event, *others: asyncio.Event, within: float | None = None) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in (stop, *others)]
    try:
        await asyncio.wait(waits, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def bridge_one_room(settings: Settings, room: str, writer: BridgeWriter, stop: asyncio.Event, *,
                          on_connected: Callable[[RoomBridge], None] | None = None,
                          gap_since: datetime | None = None) -> None:
    """Keep one room bridged into ``writer`` until ``stop`` (direct mode, with its own token).

    ``gap_since``: the room was not seen since then (a worker job that lost its connection):
    the first connection records that gap instead of a fresh arrival.
    """
    url, _, _ = _credentials(settings)
    ingest = writer.ingest(room)
    identity = bridge_identity(writer.bridge_id)
    gap_started = gap_since
    delay = 0.2
    writer.counters.rooms += 1
    try:
        while not stop.is_set():
            rtc_room = rtc.Room()
            bridge = RoomBridge(rtc_room, ingest, livekit_url=url)
            bridge.attach()
            try:
                async with _connect_slot():
                    await rtc_room.connect(url, bridge_token(settings, room, identity),
                                           rtc.RoomOptions(auto_subscribe=False))
                    only_own_room_events(rtc_room)
            except (rtc.ConnectError, OSError) as exc:
                log.warning("bridge: cannot connect to LiveKit (%s); retrying", type(exc).__name__)
                await bridge.close(left=False)
                if gap_started is None and writer.counters.typed:
                    gap_started = utcnow()
                await _until(stop, within=delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.2
            if gap_started is None:
                bridge.connected()
                _record_predecessor_gaps(settings, room, writer.bridge_id, ingest)
            else:
                bridge.resume_after(gap_started, "livekit connection lost")
                gap_started = None
            log.info("bridge: in room (direct mode)")
            if on_connected is not None:
                on_connected(bridge)
            await _until(stop, bridge.disconnected)
            if stop.is_set():
                with contextlib.suppress(Exception):
                    await rtc_room.disconnect()
                await bridge.close("stopped")
                return
            reason = bridge.disconnect_reason
            gap_started = bridge.gap_started() or utcnow()
            if reason in _FINAL_REASONS:
                await bridge.close(reason.lower())
                log.info("bridge: room ended (%s)", reason)
                return
            await bridge.close(left=False)
            log.warning("bridge: disconnected from LiveKit (%s); rejoining", reason or "unknown")
    finally:
        writer.counters.rooms -= 1


#: One room connecting at a time in this process (rooms run in threads, each with its own loop).
_CONNECTING = threading.Semaphore(1)


@contextlib.asynccontextmanager
async def _connect_slot() -> AsyncIterator[None]:
    """Hold the process's connect slot while a room connects.

    After its ConnectCallback, livekit's FFI waits only a few seconds for the room's loop to say
    it is ready, then panics, and the panic ends the whole process. A burst of dispatches (50
    rooms at once on a busy 2-core machine) started so many rooms together that some loops
    missed that window (bench/capture.py --burst); one at a time, they do not.
    """
    # Polled, not awaited in a thread: an acquire left running in a thread after its waiter
    # was cancelled would hold the slot for ever. Rooms live in different loops, so no
    # asyncio primitive is shared.
    while not _CONNECTING.acquire(blocking=False):  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    try:
        yield
    finally:
        _CONNECTING.release()


def _record_predecessor_gaps(settings: Settings, room: str, bridge_id: str, ingest: Any) -> None:
    """A bridge of this LEDGER_HOME that was killed in this room saw nothing from its last sign
    of life until now: record that blind spot as a gap, once."""
    now = utcnow()
    for stats in read_stats(settings.home):
        if (
            stats.get("mode") != "direct"
            or stats.get("room") != room
            or stats.get("bridge_id") == bridge_id
            or stats.get("alive")
            or stats.get("stopped")
            or stats.get("gap_recorded")
        ):
            continue
        last_seen = datetime.fromtimestamp(float(stats.get("updated_at", 0) or 0), UTC)
        ingest.bridge_gap(last_seen, now, reason=f"bridge {stats.get('bridge_id')} ended without leaving")
        with contextlib.suppress(OSError, ValueError):
            path = Path(str(stats["path"]))
            data = json.loads(path.read_text())
            data["gap_recorded"] = True
            path.write_text(json.dumps(data, indent=1, sort_keys=True))


def settle_heap() -> None:
    """Move everything alive now (the SDKs, protobuf descriptors, settings) out of the cyclic
    garbage collector's sight.

    The bridge process holds a large, permanent heap from its imports; every full collection
    walked all of it, a 40–70 ms stall in the room callbacks: at 1,000 packets/s that was the
    bridge's p99 (bench/bridge.py: 18–43 ms without, 1.2–5.8 ms with). Objects made later are
    collected as usual. Called once per process, after the imports and before any room: a
    freeze moves uncollected garbage out of reach too, so it is not repeated per job.
    """
    gc.collect()
    gc.freeze()


async def run_direct(settings: Settings, room: str, stop: asyncio.Event, *, process: BridgeProcess | None = None,
                     on_connected: Callable[[RoomBridge], None] | None = None,
                     gap_since: datetime | None = None) -> Counters:
    process = process or BridgeProcess(settings)
    async with Ledger(settings, name="ledger-bridge") as ledger:
        writer = BridgeWriter(ledger, home=settings.home, bridge_id=process.bridge_id, counters=process.counters,
                              stats_interval=0)
        await writer.start()
        try:
            await bridge_one_room(settings, room, writer, stop, on_connected=on_connected, gap_since=gap_since)
        finally:
            await writer.close(deadline=process.flush_deadline)
    return process.counters


# --- worker mode --------------------------------------------------------------------------------

#: The process whose jobs run in this process (jobs run in threads: JobExecutorType.THREAD).
_PROCESS: BridgeProcess | None = None


async def _job_entry(ctx: Any) -> None:
    """One dispatched room: its own ledger connection and writer, shared process counters."""
    from livekit.agents import AutoSubscribe  # noqa: PLC0415 - livekit-agents (about a second to import) only in the dispatched worker mode

    process = _PROCESS
    if process is None:  # pragma: no cover - only when the job runs in a separate process
        process = BridgeProcess(Settings.from_env())
    settings = process.settings
    ledger = Ledger(settings, name="ledger-bridge")
    await ledger.connect()
    writer = BridgeWriter(ledger, home=settings.home, bridge_id=f"{process.bridge_id}-{uuid.uuid4().hex[:6]}",
                          counters=process.counters, stats_interval=0)
    await writer.start()
    ingest = writer.ingest(ctx.job.room.name)
    bridge = RoomBridge(ctx.room, ingest, livekit_url=settings.livekit_url or "")
    bridge.attach()

    async def on_shutdown(reason: str = "") -> None:
        # The SDK gave up reconnecting: not a leave but a blind spot, closed by a direct rejoin.
        lost = reason == "room disconnected" and bridge.disconnect_reason in _CONNECTION_LOST
        gap_since = bridge.gap_started() or utcnow()
        await bridge.close(reason or "job shutdown", left=not lost)
        await writer.close(deadline=process.flush_deadline)
        await ledger.close()
        with process.lock:
            process.counters.rooms -= 1
        if lost:
            log.warning("bridge: job lost its LiveKit connection; rejoining the room directly")
            process.rejoin(ctx.job.room.name, gap_since)

    ctx.add_shutdown_callback(on_shutdown)
    with process.lock:
        process.counters.rooms += 1
    async with _connect_slot():
        await ctx.connect(auto_subscribe=AutoSubscribe.SUBSCRIBE_NONE)
        only_own_room_events(ctx.room)
    bridge.connected()
    log.info("bridge: job started")
    # Return now: the job lasts until livekit-agents shuts it down (dispatch deleted, room
    # disconnected, worker stopping) and on_shutdown closes it. Shutdown callbacks run only once
    # the entrypoint has returned; an entrypoint that waited would hold every stop for 15 s.


#: The most rooms one bridge process takes before LiveKit sends dispatches to another.
MAX_ROOMS_PER_WORKER = 200
#: livekit-agents' event-loop monitor threshold (ms; 0: off), read when each job starts.
LOOP_MONITOR_ENV = "LIVEKIT_AGENTS_LOOP_BLOCK_WARN_MS"


async def run_worker(settings: Settings, stop: asyncio.Event, *, process: BridgeProcess | None = None,
                     http_port: int = 0, on_registered: Callable[[str], None] | None = None) -> Counters:
    from livekit.agents import AgentServer, JobExecutorType, WorkerPermissions  # noqa: PLC0415 - livekit-agents (about a second to import) only in the dispatched worker mode

    global _PROCESS
    url, key, secret = _credentials(settings)
    process = process or BridgeProcess(settings)
    _PROCESS = process
    # Rooms rejoined directly stop with the worker, however the worker ends.
    process.loop, process.stop = asyncio.get_running_loop(), asyncio.Event()
    # AgentServer.run() writes LIVEKIT_* into os.environ; all of these are put back afterwards.
    saved_env = {name: os.environ.get(name)
                 for name in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET", LOOP_MONITOR_ENV)}
    # livekit-agents watches every job's event loop for blocking code (a voice pipeline's audio
    # jitter): a heartbeat and a watchdog thread waking every 20 ms per job. A bridge job has no
    # audio, and at 50 rooms those wake-ups were 38% of the bridge's CPU (bench/capture.py: 46% ->
    # 28% of a core at 50 rooms x 5/s, p99 10.6 -> 5.7 ms). Off unless the operator set it.
    os.environ.setdefault(LOOP_MONITOR_ENV, "0")
    server = AgentServer(
        ws_url=url, api_key=key, api_secret=secret, job_executor_type=JobExecutorType.THREAD,
        permissions=WorkerPermissions(can_publish=False, can_subscribe=True, can_publish_data=False,
                                      can_update_metadata=False, hidden=True),
        # No load threshold: with no job running yet, livekit-agents counts each accepted job
        # as a whole threshold's worth of load, so an idle worker refused every dispatch but the
        # first of a burst (livekit-server then drops them: "no workers with sufficient
        # capacity"). The room cap is enforced in _accept_job instead.
        port=http_port, num_idle_processes=0, load_threshold=math.inf,
        # Load is the share of MAX_ROOMS_PER_WORKER in use, not the host's CPU: a busy host would
        # otherwise refuse dispatches, and LiveKit does not offer a refused job again. The
        # server weighs workers by it when it picks one.
        load_fnc=lambda server: min(len(server.active_jobs) / MAX_ROOMS_PER_WORKER, 1.0),
        shutdown_process_timeout=process.flush_deadline + 5.0,
    )

    async def _accept_job(request: Any) -> None:
        if len(server.active_jobs) >= MAX_ROOMS_PER_WORKER:
            # not ``terminate``: livekit-server then offers the job to another worker
            await request.reject(terminate=False)
        else:
            await request.accept()

    server.rtc_session(_job_entry, agent_name=settings.bridge_agent_name, on_request=_accept_job)
    settle_heap()  # again, now that the agents framework is loaded
    # LiveKit offers a job only to workers registered when its dispatch arrives: say when that is.
    def registered(worker_id: str, _info: Any) -> None:
        log.info("bridge: worker %s registered as %r; rooms can dispatch it now", worker_id,
                 settings.bridge_agent_name)
        if on_registered is not None:
            on_registered(str(worker_id))

    server.on("worker_registered", registered)
    run = asyncio.create_task(server.run(devmode=False), name="bridge-agent-server")
    log.info("bridge: worker registering as %r", settings.bridge_agent_name)

    async def stats_loop() -> None:
        while True:
            process.write_stats(mode="worker", agent_name=settings.bridge_agent_name)
            await asyncio.sleep(1.0)

    stats = asyncio.create_task(stats_loop())
    try:
        await _until(stop, _done_event(run))
    finally:
        stats.cancel()
        with contextlib.suppress(Exception):
            await server.aclose()
        if not run.done():
            run.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await run
        process.stop.set()
        if process.rejoins:
            await asyncio.gather(*process.rejoins, return_exceptions=True)
        process.write_stats(mode="worker", agent_name=settings.bridge_agent_name, stopped=True)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if run.done() and not run.cancelled() and not stop.is_set():
        failure = run.exception()
        if failure is not None:
            raise failure
    return process.counters


def _done_event(task: asyncio.Task[Any]) -> asyncio.Event:
    event = asyncio.Event()
    task.add_done_callback(lambda _: event.set())
    return event


async def run_bridge(settings: Settings, *, room: str | None, stop: asyncio.Event,
                     flush_deadline: float = 5.0, http_port: int = 0,
                     on_registered: Callable[[str], None] | None = None) -> Counters:
    """Run the bridge until ``stop`` is set (the CLI sets it on SIGTERM/SIGINT).

    ``room``: bridge that one room directly; None: register as a worker and take dispatches.
    ``on_registered(worker_id)``: called each time LiveKit has registered the worker (again after
    a reconnection): from then on, a dispatch reaches it.
    Returns the counters; they are also written to ``<LEDGER_HOME>/bridge/stats-<id>.json``.
    """
    process = BridgeProcess(settings, flush_deadline=flush_deadline)
    settle_heap()
    if room is not None:
        stats_stop = asyncio.Event()

        async def stats_loop() -> None:
            while not stats_stop.is_set():
                process.write_stats(mode="direct", room=room, room_count=process.counters.rooms)
                await _until(stats_stop, within=1.0)

        stats = asyncio.create_task(stats_loop())
        try:
            return await run_direct(settings, room, stop, process=process)
        finally:
            stats_stop.set()
            await stats
            process.write_stats(mode="direct", room=room, stopped=True)
    return await run_worker(settings, stop, process=process, http_port=http_port, on_registered=on_registered)
