"""Running the bridge: ``run_bridge`` (what ``ledger bridge`` wraps).

* ``room=None``: a LiveKit Agents worker (``AgentServer``) registered under
  ``LEDGER_BRIDGE_AGENT_NAME`` with hidden, subscribe-and-data-only permissions; each room it is
  dispatched to becomes a job (in a thread of this process) with its own ledger connection and
  writer. Many processes can register under one name; LiveKit spreads rooms over them.
* ``room="NAME"``: connect to one room directly with a hidden, subscribe-only token minted from
  ``LIVEKIT_API_KEY``/``LIVEKIT_API_SECRET``; reconnect (recording a gap) until ``stop`` is set.

Either way a room is a :class:`RoomPresence` in the process's :class:`BridgeProcess` (settings,
id, counters, passed in, never global): the modes differ only in how they connect and when they
leave. ``stop`` ends it: the writer flushes within ``flush_deadline`` seconds, and what it could
not write is saved under ``LEDGER_HOME`` for the next bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import math
import os
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from livekit import rtc

from room_ledger.bridge._sdk import only_own_room_events
from room_ledger.bridge.ingest import Ingest
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
    """What one bridge process shares between its rooms, passed to each of them: its settings, id
    and counters (read by ``ledger doctor``), and in worker mode the rooms it rejoined directly."""

    settings: Settings
    bridge_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    counters: Counters = field(default_factory=Counters)
    flush_deadline: float = 5.0
    #: Worker mode runs rooms in threads of their own: the counters they share change under it.
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Worker mode: the worker's own loop and stop event, and the rooms it rejoined directly.
    loop: asyncio.AbstractEventLoop | None = None
    stop: asyncio.Event | None = None
    rejoins: set[asyncio.Task[Counters]] = field(default_factory=set)

    @property
    def livekit_url(self) -> str:
        url, _, _ = _credentials(self.settings)
        return url

    def count_room(self, change: int) -> None:
        with self.lock:
            self.counters.rooms += change

    def write_stats(self, **extra: Any) -> None:
        write_stats(self.settings.home, self.bridge_id, self.counters, extra=extra)

    @contextlib.asynccontextmanager
    async def reporting(self, **extra: Any) -> AsyncIterator[None]:
        """The stats file, every second while the block runs, and once more, ``stopped``, after it."""
        done = asyncio.Event()

        async def every_second() -> None:
            while not done.is_set():
                self.write_stats(**extra)
                await _until(done, within=1.0)

        writing = asyncio.create_task(every_second(), name="bridge-stats")
        try:
            yield
        finally:
            done.set()
            await writing
            self.write_stats(**extra, stopped=True)

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
            task = asyncio.create_task(run_direct(self, room, stop, gap_since=gap_since), name="bridge-rejoin")
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


class RoomPresence:
    """One room bridged by this process, the same in both modes: its writer, the connections into
    it (each one a :class:`RoomBridge`), and what is recorded between them.

    The first connection records the bridge's arrival; one after a lost connection records the
    gap since then instead. A lost connection records no departure, so the gap stays open until
    the next connection (of this presence, or of the one that rejoins in its place).
    """

    def __init__(self, process: BridgeProcess, room: str, writer: BridgeWriter, *,
                 gap_since: datetime | None = None, ledger: Ledger | None = None) -> None:
        self.process = process
        self.room = room
        self.writer = writer
        self.ingest = writer.ingest(room)
        self.gap_since = gap_since
        #: The ledger connection this presence opened (and closes), if it opened one.
        self._ledger = ledger
        process.count_room(+1)

    @classmethod
    async def open(cls, process: BridgeProcess, room: str, *, bridge_id: str,
                   gap_since: datetime | None = None) -> RoomPresence:
        """A presence with a ledger connection and a writer of its own (closed by :meth:`close`)."""
        ledger = Ledger(process.settings, name="ledger-bridge")
        await ledger.connect()
        writer = BridgeWriter(ledger, home=process.settings.home, bridge_id=bridge_id, counters=process.counters,
                              stats_interval=0)
        try:
            await writer.start()
        except BaseException:
            await ledger.close()
            raise
        return cls(process, room, writer, gap_since=gap_since, ledger=ledger)

    async def close(self) -> None:
        """Flush the writer within the process's deadline (the rest is spilled for the next
        bridge) if this presence opened it; the room is no longer counted."""
        try:
            if self._ledger is not None:
                await self.writer.close(deadline=self.process.flush_deadline)
                await self._ledger.close()
        finally:
            self.process.count_room(-1)

    async def join(self, rtc_room: rtc.Room, connect: Callable[[], Awaitable[object]], *,
                   find_predecessors: bool = False) -> RoomBridge:
        """Connect to the room (one room at a time per process) and record the arrival, or the gap.

        The bridge is attached before connecting, so nothing said meanwhile is missed. A failed
        connection raises, leaving nothing attached and nothing recorded.
        ``find_predecessors``: an arrival also records the blind spot of a direct bridge of this
        LEDGER_HOME killed in this room (only a direct bridge's stats name its room).
        """
        bridge = RoomBridge(rtc_room, self.ingest, livekit_url=self.process.livekit_url)
        bridge.attach()
        try:
            async with _connect_slot():
                await connect()
                only_own_room_events(rtc_room)
        except Exception:
            await bridge.close(left=False)
            raise
        if self.gap_since is None:
            bridge.connected()
            if find_predecessors:
                _record_predecessor_gaps(self.process.settings, self.room, self.writer.bridge_id, self.ingest)
        else:
            bridge.resume_after(self.gap_since, "livekit connection lost")
            self.gap_since = None
        return bridge

    def not_connected(self) -> None:
        """A connection failed: once the room has been seen, the gap starts now."""
        if self.gap_since is None and self.writer.counters.typed:
            self.gap_since = utcnow()

    async def leave(self, bridge: RoomBridge, reason: str) -> None:
        """Record the bridge's departure from the room."""
        await bridge.close(reason)

    async def lose(self, bridge: RoomBridge) -> datetime:
        """The connection was lost: no departure; returns when the gap began."""
        gap_since = self.gap_since = bridge.gap_started() or utcnow()
        await bridge.close(left=False)
        return gap_since


async def _stay_directly(presence: RoomPresence, stop: asyncio.Event,
                         on_connected: Callable[[RoomBridge], None] | None = None) -> None:
    """Keep ``presence`` connected with the bridge's own token until ``stop`` or the room ends."""
    settings, room = presence.process.settings, presence.room
    url = presence.process.livekit_url
    identity = bridge_identity(presence.writer.bridge_id)
    delay = 0.2
    while not stop.is_set():
        rtc_room = rtc.Room()
        connect = functools.partial(rtc_room.connect, url, bridge_token(settings, room, identity),
                                    rtc.RoomOptions(auto_subscribe=False))
        try:
            bridge = await presence.join(rtc_room, connect, find_predecessors=True)
        except (rtc.ConnectError, OSError) as exc:
            log.warning("bridge: cannot connect to LiveKit (%s); retrying", type(exc).__name__)
            presence.not_connected()
            await _until(stop, within=delay)
            delay = min(delay * 2, 5.0)
            continue
        delay = 0.2
        log.info("bridge: in room (direct mode)")
        if on_connected is not None:
            on_connected(bridge)
        await _until(stop, bridge.disconnected)
        if stop.is_set():
            with contextlib.suppress(Exception):
                await rtc_room.disconnect()
            await presence.leave(bridge, "stopped")
            return
        reason = bridge.disconnect_reason
        if reason in _FINAL_REASONS:
            await presence.leave(bridge, reason.lower())
            log.info("bridge: room ended (%s)", reason)
            return
        await presence.lose(bridge)
        log.warning("bridge: disconnected from LiveKit (%s); rejoining", reason or "unknown")


async def bridge_one_room(settings: Settings, room: str, writer: BridgeWriter, stop: asyncio.Event, *,
                          on_connected: Callable[[RoomBridge], None] | None = None,
                          gap_since: datetime | None = None) -> None:
    """Keep one room bridged into ``writer`` until ``stop`` (direct mode, with its own token).

    ``gap_since``: the room was not seen since then (a worker job that lost its connection):
    the first connection records that gap instead of a fresh arrival.
    """
    process = BridgeProcess(settings, bridge_id=writer.bridge_id, counters=writer.counters)
    presence = RoomPresence(process, room, writer, gap_since=gap_since)
    try:
        await _stay_directly(presence, stop, on_connected)
    finally:
        await presence.close()


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


def _record_predecessor_gaps(settings: Settings, room: str, bridge_id: str, ingest: Ingest) -> None:
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


async def run_direct(process: BridgeProcess, room: str, stop: asyncio.Event, *,
                     gap_since: datetime | None = None) -> Counters:
    presence = await RoomPresence.open(process, room, bridge_id=process.bridge_id, gap_since=gap_since)
    try:
        await _stay_directly(presence, stop)
    finally:
        await presence.close()
    return process.counters


# --- worker mode --------------------------------------------------------------------------------


def _job_entry(process: BridgeProcess) -> Callable[[Any], Awaitable[None]]:
    """The entry of each dispatched room: a presence of its own (ledger connection and writer)
    in ``process`` (jobs run in threads of this process: JobExecutorType.THREAD)."""

    async def entry(ctx: Any) -> None:
        from livekit.agents import AutoSubscribe  # noqa: PLC0415 - livekit-agents (about a second to import) only in the dispatched worker mode

        room = ctx.job.room.name
        presence = await RoomPresence.open(process, room, bridge_id=f"{process.bridge_id}-{uuid.uuid4().hex[:6]}")
        bridge: RoomBridge | None = None

        async def on_shutdown(reason: str = "") -> None:
            # The SDK gave up reconnecting: not a leave but a blind spot, closed by a direct rejoin.
            lost = reason == "room disconnected" and bridge is not None \
                and bridge.disconnect_reason in _CONNECTION_LOST
            gap_since: datetime | None = None
            try:
                if bridge is not None and lost:
                    gap_since = await presence.lose(bridge)
                elif bridge is not None:
                    await presence.leave(bridge, reason or "job shutdown")
            finally:
                await presence.close()
            if gap_since is not None:
                log.warning("bridge: job lost its LiveKit connection; rejoining the room directly")
                process.rejoin(room, gap_since)

        ctx.add_shutdown_callback(on_shutdown)
        bridge = await presence.join(ctx.room, functools.partial(ctx.connect, auto_subscribe=AutoSubscribe.SUBSCRIBE_NONE))
        log.info("bridge: job started")
        # Return now: the job lasts until livekit-agents shuts it down (dispatch deleted, room
        # disconnected, worker stopping) and on_shutdown closes it. Shutdown callbacks run only once
        # the entrypoint has returned; an entrypoint that waited would hold every stop for 15 s.

    return entry


#: The most rooms one bridge process takes before LiveKit sends dispatches to another.
MAX_ROOMS_PER_WORKER = 200
#: livekit-agents' event-loop monitor threshold (ms; 0: off), read when each job starts.
LOOP_MONITOR_ENV = "LIVEKIT_AGENTS_LOOP_BLOCK_WARN_MS"
#: What AgentServer.run() writes into os.environ, and what the worker sets there itself.
_WORKER_ENVIRON = ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET", LOOP_MONITOR_ENV)


@contextlib.contextmanager
def _worker_environ() -> Iterator[None]:
    """The process environment the worker mode needs, put back as it was when the worker ends."""
    saved = {name: os.environ.get(name) for name in _WORKER_ENVIRON}
    # livekit-agents watches every job's event loop for blocking code (a voice pipeline's audio
    # jitter): a heartbeat and a watchdog thread waking every 20 ms per job. A bridge job has no
    # audio, and at 50 rooms those wake-ups were 38% of the bridge's CPU (bench/capture.py: 46% ->
    # 28% of a core at 50 rooms x 5/s, p99 10.6 -> 5.7 ms). Off unless the operator set it.
    os.environ.setdefault(LOOP_MONITOR_ENV, "0")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


async def run_worker(process: BridgeProcess, stop: asyncio.Event, *, http_port: int = 0,
                     on_registered: Callable[[str], None] | None = None) -> Counters:
    from livekit.agents import AgentServer, JobExecutorType, WorkerPermissions  # noqa: PLC0415 - livekit-agents (about a second to import) only in the dispatched worker mode

    settings = process.settings
    url, key, secret = _credentials(settings)
    # Rooms rejoined directly stop with the worker, however the worker ends.
    process.loop, process.stop = asyncio.get_running_loop(), asyncio.Event()
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

    server.rtc_session(_job_entry(process), agent_name=settings.bridge_agent_name, on_request=_accept_job)
    settle_heap()  # again, now that the agents framework is loaded
    # LiveKit offers a job only to workers registered when its dispatch arrives: say when that is.
    def registered(worker_id: str, _info: Any) -> None:
        log.info("bridge: worker %s registered as %r; rooms can dispatch it now", worker_id,
                 settings.bridge_agent_name)
        if on_registered is not None:
            on_registered(str(worker_id))

    server.on("worker_registered", registered)
    with _worker_environ():
        async with process.reporting(mode="worker", agent_name=settings.bridge_agent_name):
            run = asyncio.create_task(server.run(devmode=False), name="bridge-agent-server")
            log.info("bridge: worker registering as %r", settings.bridge_agent_name)
            try:
                await _until(stop, _done_event(run))
            finally:
                with contextlib.suppress(Exception):
                    await server.aclose()
                if not run.done():
                    run.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await run
                process.stop.set()
                if process.rejoins:
                    await asyncio.gather(*process.rejoins, return_exceptions=True)
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
    if room is None:
        return await run_worker(process, stop, http_port=http_port, on_registered=on_registered)
    async with process.reporting(mode="direct", room=room):
        return await run_direct(process, room, stop)
