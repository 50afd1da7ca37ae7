"""The bridge's single ordered writer: one queue, batched appends, nothing lost while NATS is away.

``submit(event)`` never blocks and never raises: room callbacks (through :class:`bridge.ingest.Ingest`)
call it, and one task appends what has queued up, in order, with ``Ledger.append_many`` (JetStream
atomic batches). A failed append is retried with the same event ids, so a retry is stored once.

Buffering when NATS is unreachable, oldest first:

1. spill files left by a bridge that stopped before it could write everything (adopted at start);
2. memory, up to ``memory_limit`` events;
3. this process's spill file ``<LEDGER_HOME>/bridge/spill/<time>-<bridge_id>.jsonl`` (one encoded
   event per line): once memory is full, and for as long as the file has unwritten events, new
   events go there, so order is kept.

``close(deadline=…)`` (SIGTERM) writes what it can before the deadline and saves the rest into a
spill file that the next bridge on this LEDGER_HOME appends first.

Payloads above the inline limit wait in ``<LEDGER_HOME>/bridge/payloads/`` (:mod:`bridge.payloads`);
before a batch holding such an event is appended, its objects are put into the payload bucket
(once: an object already stored whole is kept), so no event ever points at nothing. A put that
fails is retried like an append; the files are removed once their events are acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Final

import nats.errors

from room_ledger import events as ev
from room_ledger.bridge import metrics
from room_ledger.bridge.ingest import Ingest
from room_ledger.bridge.payloads import PayloadSpool
from room_ledger.bridge.stats import Counters, write_stats
from room_ledger.client import Ledger, Position
from room_ledger.errors import EventError, LedgerError

log = logging.getLogger("bridge.writer")

DEFAULT_MEMORY_LIMIT: Final = 10_000
DEFAULT_BATCH: Final = 2000
_RETRYABLE: Final = (LedgerError, nats.errors.Error, OSError, TimeoutError, ConnectionError)


def spill_dir(home: Path) -> Path:
    return Path(home) / "bridge" / "spill"


class SpillFile:
    """An append-only file of encoded events, read from the front as they are written to NATS."""

    def __init__(self, path: Path, *, create: bool) -> None:
        self.path = path
        self._w: IO[bytes] | None = None
        self._r: IO[bytes] | None = None
        self.offset = 0
        self.unread = 0
        self.known_count = create
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._w = open(path, "ab")  # noqa: SIM115 - held open while the file is ours
            try:
                fcntl.flock(self._w.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.close_handles()
                raise
        self._r = open(path, "rb")  # noqa: SIM115

    @classmethod
    def adopt(cls, path: Path) -> SpillFile | None:
        """Take over a file no live bridge holds; None if one does (or it vanished)."""
        try:
            handle = open(path, "ab")  # noqa: SIM115
        except OSError:
            return None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return None
        spill = cls(path, create=False)
        spill._w = handle
        with open(path, "rb") as lines:
            spill.unread = sum(1 for _ in lines)
        spill.known_count = True
        return spill

    def append(self, data: bytes) -> None:
        assert self._w is not None
        self._w.write(data + b"\n")
        self.unread += 1

    def peek(self, limit: int) -> tuple[list[ev.KnownEvent], int, int]:
        """Up to ``limit`` events from the front, the byte offset after them, and lines read."""
        assert self._r is not None and self._w is not None
        self._w.flush()
        self._r.seek(self.offset)
        events: list[ev.KnownEvent] = []
        position = self.offset
        lines = 0
        while len(events) < limit:
            line = self._r.readline()
            if not line or not line.endswith(b"\n"):
                break  # the end, or a partial last line (a crash mid-write)
            position += len(line)
            lines += 1
            try:
                decoded = ev.decode(line[:-1])
            except LedgerError:
                log.warning("spill file %s: skipping an unreadable line", self.path.name)
                continue
            if not isinstance(decoded, ev.OpaqueEvent):
                events.append(decoded)
        return events, position, lines

    def advance(self, position: int, lines: int) -> None:
        self.offset = position
        self.unread = max(0, self.unread - lines)

    def close_handles(self) -> None:
        for handle in (self._r, self._w):
            if handle is not None:
                with contextlib.suppress(OSError):
                    handle.close()
        self._r = self._w = None

    def remaining_lines(self) -> list[bytes]:
        assert self._r is not None
        if self._w is not None:
            self._w.flush()
        self._r.seek(self.offset)
        return [line.rstrip(b"\n") for line in self._r.readlines() if line.endswith(b"\n")]

    def remove(self) -> None:
        self.close_handles()
        with contextlib.suppress(OSError):
            self.path.unlink()

    def flush(self) -> None:
        if self._w is not None:
            with contextlib.suppress(OSError):
                self._w.flush()
                os.fsync(self._w.fileno())


class BridgeWriter:
    """One ordered, batched writer per process (or per job). See the module docstring."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        home: Path | None = None,
        bridge_id: str | None = None,
        counters: Counters | None = None,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        batch_size: int = DEFAULT_BATCH,
        retry_initial: float = 0.1,
        retry_max: float = 2.0,
        stats_interval: float = 1.0,
        on_ack: Callable[[Sequence[ev.KnownEvent], Sequence[Position]], None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.home = Path(home) if home is not None else ledger.settings.home
        self.bridge_id = bridge_id or uuid.uuid4().hex[:12]
        self.counters = counters or Counters()
        self.memory_limit = memory_limit
        self.batch_size = max(1, batch_size)
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.stats_interval = stats_interval
        self.on_ack = on_ack
        self.spool = PayloadSpool(self.home / "bridge" / "payloads", uploader=ledger.payloads.upload)
        #: Events with their encoding when the submitter already had it (saves encoding twice).
        self._memory: deque[tuple[ev.KnownEvent, bytes | None]] = deque()
        self._orphans: list[SpillFile] = []
        self._spill: SpillFile | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self.nats_ok = True
        # moving averages: seconds per pipelined event, seconds per atomic batch
        self._per_event_s = 0.0005
        self._atomic_s = 0.02
        self._atomic_trials = 0
        metrics.track_writer(self)  # Prometheus reads the counters when it scrapes

    # --- public --------------------------------------------------------------------------------

    def ingest(self, room: str) -> Ingest:
        """An :class:`Ingest` for ``room`` feeding this writer (sharing its counters)."""

        settings = self.ledger.settings
        return Ingest(room, self.submit, bridge_id=self.bridge_id, counters=self.counters,
                      encoded_sink=self.submit, spool=self.spool, inline_limit=settings.inline_limit,
                      max_payload=settings.max_payload)

    @property
    def pending(self) -> int:
        """Events not yet acknowledged (memory and spill files)."""
        return len(self._memory) + sum(o.unread for o in self._orphans) + (self._spill.unread if self._spill else 0)

    @property
    def spill_pending(self) -> int:
        return sum(o.unread for o in self._orphans) + (self._spill.unread if self._spill else 0)

    def submit(self, event: ev.KnownEvent, encoded: bytes | None = None) -> None:
        """Queue one event. Never blocks, never raises (a closed writer spills it to disk)."""
        metrics.observed(event.type)
        try:
            if (self._spill is not None and self._spill.unread > 0) or len(self._memory) >= self.memory_limit \
                    or self._closed:
                self._to_spill(event, encoded)
            else:
                self._memory.append((event, encoded))
        except Exception as exc:  # a full disk must not kill the room callbacks
            self.counters.last_error = f"spill: {type(exc).__name__}"
            log.error("bridge writer: cannot spill an event (%s); keeping it in memory", type(exc).__name__)
            self._memory.append((event, encoded))
        self._idle.clear()
        self._wake.set()

    async def start(self) -> None:
        """Adopt spill files left by stopped bridges, then start writing."""
        directory = spill_dir(self.home)
        if directory.is_dir():
            for path in sorted(directory.glob("*.jsonl")):
                spill = SpillFile.adopt(path)
                if spill is None:
                    continue
                if spill.unread == 0:
                    spill.remove()
                    continue
                log.info("bridge writer: adopting %d unwritten events from %s", spill.unread, path.name)
                self._orphans.append(spill)
        if self._orphans:
            self._idle.clear()
            self._wake.set()
        self._task = asyncio.create_task(self._run(), name=f"bridge-writer-{self.bridge_id}")
        self._stats_task = asyncio.create_task(self._stats_loop(), name="bridge-writer-stats")

    async def flush(self, within: float | None = None) -> bool:
        """Wait until everything submitted so far is acknowledged; False on timeout."""
        try:
            await asyncio.wait_for(self._wait_idle(), within)
        except TimeoutError:
            return False
        return True

    async def _wait_idle(self) -> None:
        while self.pending:
            self._idle.clear()
            await self._idle.wait()

    async def close(self, *, deadline: float = 5.0) -> int:
        """Write what can be written within ``deadline`` seconds; save the rest to disk.

        Returns how many events were saved for the next bridge (0 when all were written).
        """
        if self._closed:
            return 0
        self._closing = True
        self._wake.set()
        await self.flush(deadline)
        self._closed = True
        for task in (self._task, self._stats_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        left = self._save_leftovers()
        self._write_stats()
        if left:
            log.warning("bridge writer: %d events not written before the deadline; saved for the next bridge", left)
        return left

    # --- internals -------------------------------------------------------------------------------

    def _new_spill(self) -> SpillFile:
        name = f"{time.time_ns():020d}-{self.bridge_id}.jsonl"
        return SpillFile(spill_dir(self.home) / name, create=True)

    def _to_spill(self, event: ev.KnownEvent, encoded: bytes | None = None) -> None:
        if self._spill is None:
            self._spill = self._new_spill()
            log.warning("bridge writer: buffering to disk (%s)", "memory full" if self.memory_limit else "no memory")
        self._spill.append(encoded or ev.encode(event))
        self.counters.spilled += 1

    def _save_leftovers(self) -> int:
        """Orphans, memory, own spill -> one new spill file in that (chronological) order."""
        lines: list[bytes] = []
        for orphan in self._orphans:
            lines.extend(orphan.remaining_lines())
        lines.extend(encoded if encoded is not None else ev.encode(e) for e, encoded in self._memory)
        if self._spill is not None:
            lines.extend(self._spill.remaining_lines())
        if lines:
            final = self._new_spill()
            for line in lines:
                final.append(line)
            final.flush()
            final.close_handles()
        for orphan in self._orphans:
            orphan.remove()
        if self._spill is not None:
            self._spill.remove()
        self._orphans.clear()
        self._memory.clear()
        self._spill = None
        return len(lines)

    def _next_batch(self) -> tuple[list[ev.KnownEvent], list[bytes | None] | None, Callable[[], None]]:
        """The oldest events, their encodings where known (None: none known), and a function that
        drops them from their source once acknowledged."""
        while self._orphans:
            orphan = self._orphans[0]
            events, position, lines = orphan.peek(self.batch_size)
            if events:
                return events, None, lambda o=orphan, p=position, n=lines: o.advance(p, n)
            orphan.remove()
            self._orphans.pop(0)
        if self._memory:
            count = min(len(self._memory), self.batch_size)
            queued = list(itertools.islice(self._memory, count))

            def drop_memory(n: int = count) -> None:
                for _ in range(n):
                    self._memory.popleft()

            return [event for event, _ in queued], [encoded for _, encoded in queued], drop_memory
        if self._spill is not None:
            events, position, lines = self._spill.peek(self.batch_size)
            if events:
                spill = self._spill
                return events, None, lambda s=spill, p=position, n=lines: s.advance(p, n)
            self._spill.advance(position, lines)
            if self._spill.unread == 0 or lines == 0:
                self._spill.remove()
                self._spill = None
                log.info("bridge writer: disk buffer drained")
        return [], None, lambda: None

    async def _run(self) -> None:
        delay = self.retry_initial
        while True:
            events, encodings, commit = self._next_batch()
            if not events:
                self._idle.set()
                self._wake.clear()
                if self.pending:
                    continue
                await self._wake.wait()
                continue
            started = time.perf_counter()
            try:
                await self._store_objects(events)
                positions = await self._append(events, self._payloads(events, encodings))
            except EventError:
                positions = await self._append_one_by_one(events)
            except asyncio.CancelledError:
                raise
            except _RETRYABLE as exc:
                self.counters.append_failures += 1
                self.counters.last_error = f"append: {type(exc).__name__}"
                if self.nats_ok:
                    log.warning("bridge writer: append failed (%s); buffering and retrying", type(exc).__name__)
                self.nats_ok = False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._sleep_forever(), delay)
                delay = min(delay * 2, self.retry_max)
                continue
            except Exception as exc:  # unexpected: keep the events, log, retry slowly
                self.counters.append_failures += 1
                self.counters.last_error = f"append: {type(exc).__name__}"
                log.exception("bridge writer: unexpected append failure; retrying")
                await asyncio.sleep(self.retry_max)
                continue
            if not self.nats_ok:
                log.info("bridge writer: appends succeed again")
            self.nats_ok = True
            delay = self.retry_initial
            commit()
            self._discard_objects(events)
            self.counters.written += len(positions)
            self.counters.duplicates += sum(1 for p in positions if p.duplicate)
            self.counters.last_write_at = time.time()
            metrics.written(events, positions, time.perf_counter() - started)
            if self.on_ack is not None:
                self.on_ack(events, positions)

    async def _store_objects(self, events: list[ev.KnownEvent]) -> None:
        """Put the payload files of these events into the bucket, before the events are appended."""
        for event in events:
            ref = event.payload
            if ref is None or ref.name in self.spool.stored:
                continue  # none, or put into the bucket while it arrived
            path = self.spool.path(ref.name)
            if path.is_file():
                await self.ledger.payloads.put(ref, path)
            elif await self.ledger.payloads.info(ref) is None:
                # Neither here nor stored: the file went missing (a wiped LEDGER_HOME). The event
                # still says what arrived; readers report the object as missing.
                self.counters.reject("payload file missing")
                log.error("bridge writer: a payload has no file and is not stored (%d bytes)", ref.size)

    def _discard_objects(self, events: list[ev.KnownEvent]) -> None:
        for event in events:
            if event.payload is not None:
                self.spool.discard(event.payload.name)

    @staticmethod
    def _payloads(events: list[ev.KnownEvent], encodings: list[bytes | None] | None) -> list[bytes]:
        """The events as ingest encoded them (encoded here when it did not, e.g. from a spill file)."""
        if encodings is None:
            return [ev.encode(event) for event in events]
        return [data if data is not None else ev.encode(event)
                for event, data in zip(events, encodings, strict=True)]

    async def _append(self, events: list[ev.KnownEvent], payloads: list[bytes]) -> list[Position]:
        """Pipelined appends or atomic batches, whichever is expected to be done sooner.

        An atomic batch costs the server one write for the batch, but its acknowledgement takes
        milliseconds; pipelined appends cost about one write each. Both are timed as they run
        (moving averages), so against a server that fsyncs every write, batches win sooner.
        """
        atomic_batch = self.ledger.atomic_batch_size
        atomic_size = min(len(events), atomic_batch)
        use_pipeline = self._per_event_s * atomic_size <= self._atomic_s or len(events) == 1
        if len(events) >= 100 and self._atomic_trials < 3:
            use_pipeline = False  # learn what an atomic batch costs, on a real backlog
            self._atomic_trials += 1
        started = time.perf_counter()
        if use_pipeline:
            positions = await self._append_pipelined(events, payloads)
            self._per_event_s += 0.2 * ((time.perf_counter() - started) / len(events) - self._per_event_s)
            return positions
        positions = await self.ledger.append_many(events, payloads=payloads)  # in atomic batches
        per_batch = (time.perf_counter() - started) / -(-len(events) // atomic_batch)
        self._atomic_s += 0.2 * (per_batch - self._atomic_s)
        return positions

    async def _append_pipelined(self, events: list[ev.KnownEvent], payloads: list[bytes]) -> list[Position]:
        """Every event published with its ``Nats-Msg-Id`` and reply, then all acks awaited at once."""
        return await self.ledger.append_many(events, atomic=False, payloads=payloads)

    @staticmethod
    async def _sleep_forever() -> None:
        await asyncio.Event().wait()

    async def _append_one_by_one(self, events: list[ev.KnownEvent]) -> list[Position]:
        """A batch holding an event the stream cannot take: replace that one by a ``data`` event."""
        positions: list[Position] = []
        for event in events:
            try:
                positions.append(await self.ledger.append(event))
            except EventError as exc:
                self.counters.reject("event refused")
                body = ev.Data(transport="internal", reason=f"event refused by the ledger: {str(exc)[:200]}",
                               size=len(ev.encode(event)), attributes={"type": event.type})
                replacement = ev.make_event(event.room, body, id=event.id, sender=event.sender, at=event.at)
                positions.append(await self.ledger.append(replacement))
        return positions

    def _write_stats(self) -> None:
        write_stats(self.home, self.bridge_id, self.counters,
                    extra={"pending": self.pending, "spill_pending": self.spill_pending, "nats_ok": self.nats_ok})

    async def _stats_loop(self) -> None:
        if self.stats_interval <= 0:
            return
        while True:
            await asyncio.sleep(self.stats_interval)
            self._write_stats()
            if self._spill is not None:
                self._spill.flush()
