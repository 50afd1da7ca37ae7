"""The Postgres projector (``ledger project``): the log, folded by the reducers, into tables.

How it works
------------
- Reads the stream in order from its checkpoint + 1 with a :class:`~room_ledger.feed.StreamFeed`
  (a bounded window of deliveries taken straight from the protocol parser); each take is one
  batch (bounded by ``batch_size``; when caught up, whatever has arrived).
- Folds the batch in memory with :mod:`room_ledger.state`: room states come from an LRU
  cache, loaded for the batch's rooms in one query on a miss.
- Writes the batch in one transaction while the next batch is read and folded (at most one
  batch in flight; it is committed before the next starts, and before any room row is read):
  room rows (``INSERT … SELECT FROM unnest(…) ON CONFLICT DO UPDATE``) and conversation items
  (the same from ``json_to_recordset``): one statement per table, not per event; the rooms'
  conversation pages (``projections.tables``); error rows; and the checkpoint row, which is
  locked (``FOR UPDATE``) and compared with the value this worker expects, so two workers on one
  partition, or a rebuild swapping tables, are noticed (the worker then reloads from the database).
- Idempotent twice over: the checkpoint moves in the same transaction as the rows, and each room
  row carries its own last sequence (the reducers ignore records at or below it; the upsert
  keeps the newer row).
- An event that cannot be decoded, or that makes a reducer raise, is recorded in
  ``projection_errors`` (sequence, room, type, error) and skipped.
- NATS or Postgres unavailable: logs once per outage, retries with backoff, drops its cache and
  resumes from the committed checkpoint, so nothing is lost or applied twice.

Scale-out: ``partitions=N`` workers, worker ``i`` owns the rooms whose subject token hashes
(blake2b, stable across processes and versions) to ``i``. Every worker reads the whole stream
(skipping other rooms by subject, without decoding them) and keeps its own checkpoint
``(projection, i)``. A room is handled by exactly one worker, in stream order. This needs no
change to the stream (JetStream subject-mapping partitions would save the reading of other
partitions' messages but need a stream transform and a fixed N); because every room row carries
its own sequence, changing N is safe: a new worker starts from the lowest checkpoint.

Run one worker: ``python -m room_ledger.projections.projector [--partition I --partitions N] [--once]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import logging
import signal
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
import nats.errors
import nats.js.errors

from room_ledger import db
from room_ledger import events as ev
from room_ledger import state as rd
from room_ledger.client import Ledger, Record, needs_payload
from room_ledger.errors import CheckpointMoved
from room_ledger.errors import ConnectError as LedgerConnectError
from room_ledger.feed import DEFAULT_WINDOW, Delivery, StreamFeed
from room_ledger.projections import metrics
from room_ledger.projections import rows as pg_rows
from room_ledger.projections.admin import (  # `ledger doctor` and `ledger purge` find them here too
    CheckpointStatus as CheckpointStatus,
)
from room_ledger.projections.admin import ErrorRow as ErrorRow
from room_ledger.projections.admin import ProjectionStatus as ProjectionStatus
from room_ledger.projections.admin import purge_room as purge_room
from room_ledger.projections.admin import room_rows as room_rows
from room_ledger.projections.admin import status as status
from room_ledger.projections.tables import PAGE_ITEMS, ROOMS
from room_ledger.settings import Settings
from room_ledger.subjects import room_from_token

log = logging.getLogger("projections.projector")

Progress = Callable[[int, int], None]
"""progress(events_done, events_total): called after each committed batch."""

DEFAULT_BATCH = 10_000
#: The fold hands the event loop back this often, so the batch being written (a few round
#: trips to Postgres) moves on while the next is folded, instead of waiting for the whole fold.
_YIELD_EVERY = 100
DEFAULT_CACHE_ROOMS = 20_000


_gc_raised = 0
_gc_threshold: tuple[int, int, int] = (0, 0, 0)


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """Run the cyclic garbage collector less often while projecting (a projector with ``tune_gc``).

    A batch allocates tens of thousands of objects that live until it is written (messages,
    events, records); at CPython's default of a collection per 700 allocations they are
    traversed again and again, which cost ~10% of catch-up. The projector's own structures
    hold no cycles worth collecting that often.
    """
    global _gc_raised, _gc_threshold
    if _gc_raised == 0:
        _gc_threshold = gc.get_threshold()
        gc.set_threshold(max(_gc_threshold[0], 100_000), *_gc_threshold[1:])
    _gc_raised += 1
    try:
        yield
    finally:
        _gc_raised -= 1
        if _gc_raised == 0:
            gc.set_threshold(*_gc_threshold)


def partition_of(room_token: str, partitions: int) -> int:
    """The partition owning a room, from its subject token: stable across processes."""
    if partitions <= 1:
        return 0
    digest = hashlib.blake2b(room_token.encode("ascii"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


@dataclass(slots=True)
class BatchResult:
    first_seq: int
    last_seq: int
    events: int
    rooms: int
    errors: int


@dataclass(slots=True)
class _Tables:
    room_state: str = "room_state"
    conversation: str = "conversation_items"
    pages: str = "conversation_pages"


class _ItemRow(msgspec.Struct, gc=False):
    """One conversation item row, as the projector sends it (see ``_Rows.items``)."""

    room: str
    item_id: str
    seq: int
    type: str
    role: str | None
    speaker: str | None
    #: The item's JSON (kept verbatim by PostgreSQL's json type: it becomes ``item_text``).
    item: msgspec.Raw


_item_rows_encoder = msgspec.json.Encoder()


@dataclass(slots=True)
class _Rows:
    """One batch, ready for the upserts: column arrays of room rows (unnest) and the items as one
    JSON array (json_to_recordset). asyncpg type-checks every element of an array parameter in
    Python (abc checks: ~8% of the projector's time with ~28k item values per batch); one text
    parameter is parsed by PostgreSQL instead, on the other core."""

    rooms: tuple[list[Any], ...]
    items: str
    #: Room -> items written for it in this batch (new or changed).
    items_per_room: dict[str, int]
    errors: list[tuple[int, str | None, str | None, str]]


@dataclass(slots=True)
class _Pending:
    states: dict[str, rd.RoomState] = field(default_factory=dict)
    errors: list[tuple[int, str | None, str | None, str]] = field(default_factory=list)


class Projector:
    """One projector worker. ``await run(stop_event)`` follows the log until the event is set."""

    def __init__(
        self,
        settings: Settings,
        *,
        partition: int = 0,
        partitions: int = 1,
        projection: str = ROOMS,
        batch_size: int = DEFAULT_BATCH,
        cache_rooms: int = DEFAULT_CACHE_ROOMS,
        target: str = "live",
        migrate: bool = True,
        tune_gc: bool = False,
    ) -> None:
        if not 0 <= partition < partitions:
            raise ValueError(f"partition {partition} is not in 0..{partitions - 1}")
        self.settings = settings
        self.partition = partition
        self.partitions = partitions
        self.projection = projection
        self.batch_size = batch_size
        self.cache_rooms = cache_rooms
        self.tables = _Tables() if target == "live" else _Tables("room_state_next", "conversation_items_next",
                                                                     "conversation_pages_next")
        self.migrate = migrate
        #: Collect cyclic garbage less often while folding (see _fewer_collections). The threshold
        #: is process-wide, so only a process that does nothing but project turns this on
        #: (`ledger project`, `ledger rebuild`, the benchmarks); a library user's process keeps its own.
        self.tune_gc = tune_gc
        #: Last sequence committed to Postgres (with the rows), and last sequence folded in
        #: memory: one batch is written while the next is read and folded.
        self.checkpoint = 0
        self._folded = 0
        self._inflight: asyncio.Task[None] | None = None
        self._cache: OrderedDict[str, rd.RoomState] = OrderedDict()
        #: Room -> at least how many of its items follow its last page, as of the last commit.
        #: Only a hint (never below the truth) that spares the page query rooms that cannot
        #: fill a page yet; a room not in it is always asked.
        self._unpaged: dict[str, int] = {}
        self._ledger: Ledger | None = None
        self._conn: Any = None
        self._feed: StreamFeed | None = None
        self._prefix_len = len(settings.subject_prefix) + 1
        self._outage: str | None = None
        self.events_done = 0

    @property
    def ledger(self) -> Ledger | None:
        """The projector's connection to the log (None before :meth:`start` and after :meth:`close`)."""
        return self._ledger

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Projector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self.migrate:
            from room_ledger.projections.migrate import upgrade  # noqa: PLC0415 - alembic loads only when the projector migrates

            await upgrade(self.settings)
        if self._ledger is None:
            self._ledger = Ledger(self.settings, name=f"ledger-projector-{self.partition}")
            await self._ledger.connect()
        await self._connect_db()
        metrics.track_projector(self)

    async def close(self) -> None:
        if self._inflight is not None and self._conn is not None and not self._conn.is_closed():
            # What was folded before the stop is committed, as a clean stop should.
            with contextlib.suppress(Exception):
                await self._flush()
        await self._discard_inflight()
        await self._drop_consumer()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None
        if self._ledger is not None:
            await self._ledger.close()
            self._ledger = None

    async def _connect_db(self) -> None:
        if self._conn is None or self._conn.is_closed():
            # Rows and checkpoint are lost together or not at all on a server crash: no need to
            # wait for the WAL flush (the log is the source of truth; the projector catches up).
            # Set for the session, not per transaction: one round trip less per batch.
            self._conn = await db.connect(self.settings, server_settings={"synchronous_commit": "off"})
        self.checkpoint = self._folded = await self._load_checkpoint()

    # --- the loop ----------------------------------------------------------------------------

    async def run(self, stop_event: asyncio.Event, *, progress: Progress | None = None) -> None:
        """Follow the log, batch by batch, until ``stop_event`` is set. Survives outages."""
        await self._with_retries(stop_event, self.start)
        start = self.checkpoint
        with _fewer_collections() if self.tune_gc else contextlib.nullcontext():
            while not stop_event.is_set():
                result = await self._with_retries(stop_event, self._step, 1.0)
                if progress is not None and result is not None and result.events:
                    head = await self._head_or(self.checkpoint)
                    progress(self.checkpoint - start, max(head - start, self.checkpoint - start))

    async def catch_up(self, *, until: int | None = None, progress: Progress | None = None,
                       stop_event: asyncio.Event | None = None) -> int:
        """Project up to ``until`` (default: the head as of the call); returns the checkpoint."""
        stop = stop_event or asyncio.Event()
        await self._with_retries(stop, self.start)
        target = until if until is not None else await self._head_or(0)
        start = self.checkpoint
        if progress is not None:
            progress(0, max(target - start, 0))
        with _fewer_collections() if self.tune_gc else contextlib.nullcontext():
            while not stop.is_set():
                if self._folded < target:
                    await self._with_retries(stop, self._step, 0.5, target)
                elif self.checkpoint < target:
                    await self._with_retries(stop, self._flush)
                else:
                    break
                if progress is not None:
                    progress(min(self._folded, target) - start, max(target - start, 0))
        return self.checkpoint

    async def _head_or(self, default: int) -> int:
        try:
            assert self._ledger is not None
            return await self._ledger.head()
        except Exception:
            return default

    async def _with_retries(self, stop: asyncio.Event, fn: Callable[..., Any], *args: Any) -> Any:
        delay = 0.1
        while not stop.is_set():
            try:
                result = await fn(*args)
            except CheckpointMoved:
                log.info("checkpoint of %s/%d moved under this worker; reloading", self.projection,
                         self.partition)
                await self._reset()
                continue
            except _TRANSIENT as exc:
                what = exc.server if isinstance(exc, LedgerConnectError) else "NATS"
                if self._outage is None:
                    log.warning("%s unavailable (%s); retrying with backoff, nothing is lost",
                                what, type(exc).__name__)
                    self._outage = what
                await self._reset()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._outage is not None:
                log.warning("%s is back; projecting again from sequence %d", self._outage, self.checkpoint)
                self._outage = None
            return result
        return None

    async def _reset(self) -> None:
        """Forget everything not committed: cache, consumer; reconnect and reload the checkpoint."""
        await self._discard_inflight()
        self._cache.clear()
        self._unpaged.clear()
        await self._drop_consumer()
        self._folded = self.checkpoint
        if self._conn is not None and not self._conn.is_closed():
            try:
                self.checkpoint = self._folded = await self._load_checkpoint()
                return
            except Exception:
                with contextlib.suppress(Exception):
                    self._conn.terminate()
        self._conn = None
        with contextlib.suppress(Exception):
            await self._connect_db()

    # --- reading -----------------------------------------------------------------------------

    async def _drop_consumer(self) -> None:
        feed, self._feed = self._feed, None
        if feed is not None:
            await feed.close()

    async def _fetch(self, wait: float) -> list[Delivery]:
        if self._feed is None:
            assert self._ledger is not None
            self._feed = StreamFeed(self._ledger, self._ledger.subjects.all_rooms(), after=self._folded,
                                    window=max(DEFAULT_WINDOW, self.batch_size * 2))
            await self._feed.start()
        return await self._feed.take(self.batch_size, wait)

    # --- one batch ---------------------------------------------------------------------------

    async def _step(self, wait: float, until: int | None = None) -> BatchResult | None:
        if self._conn is None or self._conn.is_closed():
            # A reconnect that failed during the last outage left no connection: make one now
            # (raising a transient error, retried with backoff, if PostgreSQL is still away).
            self._conn = None
            await self._connect_db()
        msgs = await self._fetch(wait)
        if not msgs:
            await self._flush()
            return None
        started = time.perf_counter()
        pending = _Pending()
        records: list[tuple[str, Record]] = []
        first = last = 0
        prefix_len = self._prefix_len
        for position, msg in enumerate(msgs):
            if position % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            seq = msg.seq
            if seq <= self._folded:
                continue  # redelivered after a reconnect
            if until is not None and seq > until:
                break
            if first == 0:
                first = seq
            last = seq
            subject = msg.subject
            token = subject[prefix_len:].partition(".")[0]
            if self.partitions > 1 and partition_of(token, self.partitions) != self.partition:
                continue
            try:
                event = ev.decode(msg.data)
            except Exception as exc:
                room = _safe_room(token)
                pending.errors.append((seq, room, subject.rpartition(".")[2], f"decode: {exc}"))
                continue
            record = Record(seq=seq, subject=subject, time=msg.time, event=event)
            if needs_payload(event) and self._ledger is not None:
                # A body in the Object Store (above LEDGER_INLINE_LIMIT): folded whole; one that
                # cannot be loaded comes back opaque and is recorded as an error below.
                record = await self._ledger.payloads.resolve(record)
                if isinstance(record.event, ev.OpaqueEvent):
                    pending.errors.append((seq, record.event.room, record.type, record.event.error))
                    continue
            records.append((event.room, record))
        if last == 0:
            return None
        await self._load_states({room for room, _ in records})
        for position, (room, record) in enumerate(records):
            if position % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            state = self._cache.get(room)
            if state is None:
                state = rd.RoomState(room=room)
                self._cache[room] = state
            failure = rd.apply_safely(state, record)
            if failure is not None:
                pending.errors.append((record.seq, room, record.type, f"{type(failure).__name__}: {failure}"))
            pending.states[room] = state
        rows = self._rows(pending)
        for state in pending.states.values():
            state.forget_conversation()
        self._trim_cache()
        # The previous batch is committed before this one starts: one writer, in order, and the
        # checkpoint each commit expects is the one the previous commit left.
        await self._flush()
        self._inflight = asyncio.create_task(self._commit(rows, last))
        self._folded = last
        self.events_done += last - first + 1
        metrics.projected(self.partition, last - first + 1, len(pending.errors), time.perf_counter() - started)
        return BatchResult(first, last, last - first + 1, len(pending.states), len(pending.errors))

    async def _load_states(self, rooms: set[str]) -> None:
        missing = [r for r in rooms if r not in self._cache]
        for room in rooms:
            if room in self._cache:
                self._cache.move_to_end(room)
        if not missing:
            return
        # A room evicted from the cache may have its newest state in the batch being written.
        await self._flush()
        stored_as = {pg_rows.pg_text(room): room for room in missing}
        with db.database_errors("loading room states"):
            rows = await self._conn.fetch(
                f"SELECT room, state::text AS state FROM {self.tables.room_state} WHERE room = ANY($1::text[])",
                list(stored_as),
            )
        for row in rows:
            self._cache[stored_as.pop(row["room"], row["room"])] = pg_rows.decode_state(row["state"])
        # A room without a row has no items either (a room's row and items commit together).
        self._unpaged.update(dict.fromkeys(stored_as, 0))

    def _trim_cache(self) -> None:
        while len(self._cache) > self.cache_rooms:
            self._cache.popitem(last=False)

    # --- writing -----------------------------------------------------------------------------

    async def _load_checkpoint(self) -> int:
        with db.database_errors("loading the checkpoint"):
            return await self._read_checkpoint()

    async def _read_checkpoint(self) -> int:
        row = await self._conn.fetchrow(
            "SELECT seq FROM projection_checkpoints WHERE projection = $1 AND partition = $2",
            self.projection, self.partition,
        )
        if row is not None:
            return int(row["seq"])
        # A partition without a checkpoint may start where an older layout (another number of
        # partitions) left off: everything before its slowest worker is in the room rows. Rows
        # of the current layout say nothing about this partition's rooms (its siblings may be
        # far ahead), so they are not a starting point; from 0 is always safe, as room rows
        # ignore what they already hold.
        low = await self._conn.fetchval(
            "SELECT min(seq) FROM projection_checkpoints WHERE projection = $1 AND partitions <> $2",
            self.projection, self.partitions,
        )
        return int(low or 0)

    async def _flush(self) -> None:
        """Wait for the batch being written (raising what its commit raised)."""
        task, self._inflight = self._inflight, None
        if task is not None:
            await task

    async def _discard_inflight(self) -> None:
        task, self._inflight = self._inflight, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    def _rows(self, pending: _Pending) -> _Rows:
        """The batch's rows, encoded now, while the states are as folded."""
        rooms: list[str] = []
        seqs: list[int] = []
        firsts: list[int | None] = []
        activities: list[datetime | None] = []
        counts: list[int] = []
        holders: list[str | None] = []
        versions: list[int] = []
        covers: list[int | None] = []
        docs: list[str] = []
        item_rows: list[_ItemRow] = []
        items_per_room: dict[str, int] = {}
        for room, state in pending.states.items():
            index = state.index
            rooms.append(pg_rows.pg_text(room))
            seqs.append(index.last_seq)
            firsts.append(index.first_seq)
            activities.append(index.last_activity)
            counts.append(index.events)
            holders.append(pg_rows.pg_text(state.floor.holder) if state.floor.holder else None)
            versions.append(state.session_version)
            covers.append(state.summary.covers_seq if state.summary else None)
            docs.append(pg_rows.encode_state(state).decode())
            if state.conversation:
                room_key = pg_rows.pg_text(room)
                items_per_room[room_key] = len(state.conversation)
                for item in state.conversation:
                    item_rows.append(_ItemRow(
                        room=room_key, item_id=pg_rows.pg_text(item.item_id), seq=item.seq, type=item.type,
                        role=pg_rows.pg_text(item.role) if item.role else item.role,
                        speaker=pg_rows.pg_text(item.speaker) if item.speaker else item.speaker,
                        item=msgspec.Raw(pg_rows.encode_item(item)),
                    ))
        return _Rows(
            rooms=(rooms, seqs, firsts, activities, counts, holders, versions, covers, docs),
            items=_item_rows_encoder.encode(item_rows).decode() if item_rows else "",
            items_per_room=items_per_room,
            errors=list(pending.errors),
        )

    async def _commit(self, rows: _Rows, last: int) -> None:
        with db.database_errors("committing a batch"):
            await self._write_batch(rows, last)

    async def _write_batch(self, rows: _Rows, last: int) -> None:
        rs, ci = self.tables.room_state, self.tables.conversation
        conn = self._conn
        unpaged: dict[str, int] = {}
        async with conn.transaction():
            current = await conn.fetchval(
                "SELECT seq FROM projection_checkpoints WHERE projection = $1 AND partition = $2 FOR UPDATE",
                self.projection, self.partition,
            )
            if current is not None and int(current) != self.checkpoint:
                raise CheckpointMoved(f"the checkpoint of {self.projection}/{self.partition} is at {current}, "
                                      f"not {self.checkpoint}: another worker wrote it; reloading")
            if rows.rooms[0]:
                await conn.execute(
                    f"""
                    INSERT INTO {rs} AS t (room, seq, first_seq, last_activity, events, floor_holder,
                                           session_version, summary_covers_seq, state, updated_at)
                    SELECT u.room, u.seq, u.first_seq, u.last_activity, u.events, u.floor_holder,
                           u.session_version, u.summary_covers_seq, u.state::jsonb, now()
                    FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::timestamptz[], $5::bigint[],
                                $6::text[], $7::bigint[], $8::bigint[], $9::text[])
                         AS u(room, seq, first_seq, last_activity, events, floor_holder, session_version,
                              summary_covers_seq, state)
                    ON CONFLICT (room) DO UPDATE SET
                        seq = excluded.seq, first_seq = excluded.first_seq,
                        last_activity = excluded.last_activity, events = excluded.events,
                        floor_holder = excluded.floor_holder, session_version = excluded.session_version,
                        summary_covers_seq = excluded.summary_covers_seq, state = excluded.state,
                        updated_at = excluded.updated_at
                    WHERE t.seq < excluded.seq
                    """,
                    *rows.rooms,
                )
            if rows.items:
                # An item seen again keeps the place (sequence, time) of its first appearance.
                # Updated rows (xmax set: not a fresh insert) are returned, to refresh their page.
                changed = await conn.fetch(
                    f"""
                    WITH written AS (
                        INSERT INTO {ci} AS t (room, item_id, seq, type, role, speaker, item, item_text)
                        SELECT u.room, u.item_id, u.seq, u.type, u.role, u.speaker, u.item::jsonb, u.item::text
                        FROM json_to_recordset($1::json)
                             AS u(room text, item_id text, seq bigint, type text, role text, speaker text, item json)
                        ON CONFLICT (room, item_id) DO UPDATE SET
                            type = excluded.type, role = excluded.role, speaker = excluded.speaker,
                            item = excluded.item || jsonb_build_object('seq', t.item -> 'seq', 'time', t.item -> 'time'),
                            item_text = (excluded.item
                                         || jsonb_build_object('seq', t.item -> 'seq', 'time', t.item -> 'time'))::text
                        WHERE t.seq < excluded.seq
                        RETURNING t.room, t.seq, t.xmax::text <> '0' AS updated
                    )
                    SELECT room, seq FROM written WHERE updated
                    """,
                    rows.items,
                )
                unpaged = await self._write_pages(conn, rows.items_per_room, changed)
            if rows.errors:
                await conn.executemany(
                    """INSERT INTO projection_errors (projection, seq, room, event_type, error)
                       VALUES ($1, $2, $3, $4, $5) ON CONFLICT (projection, seq) DO NOTHING""",
                    [
                        (self.projection, s, pg_rows.pg_text(r) if r else r, pg_rows.pg_text(t) if t else t, pg_rows.pg_text(e))
                        for s, r, t, e in rows.errors
                    ],
                )
            await conn.execute(
                """INSERT INTO projection_checkpoints (projection, partition, partitions, seq, updated_at)
                   VALUES ($1, $2, $3, $4, now())
                   ON CONFLICT (projection, partition) DO UPDATE
                   SET seq = excluded.seq, partitions = excluded.partitions, updated_at = excluded.updated_at""",
                self.projection, self.partition, self.partitions, last,
            )
        self.checkpoint = last
        self._unpaged.update(unpaged)

    async def _write_pages(self, conn: Any, items_per_room: dict[str, int], changed: list[Any]) -> dict[str, int]:
        """Keep the rooms' conversation pages in step with their items (see projections.tables).

        A page whose item changed is re-joined in place (its range does not move: an item keeps
        the sequence of its first appearance). Then every complete run of PAGE_ITEMS items after
        a room's last page becomes a page. Pages are thus the room's items in runs of
        PAGE_ITEMS counted from its first item, however the log was batched. Returns, for the
        batch's rooms, at least how many items follow their last page now.
        """
        pages, ci = self.tables.pages, self.tables.conversation
        if changed:
            await conn.execute(
                f"""
                UPDATE {pages} AS p
                   SET body = (SELECT string_agg(i.item_text, ',' ORDER BY i.seq) FROM {ci} i
                                WHERE i.room = p.room AND i.seq BETWEEN p.start_seq AND p.end_seq)
                  FROM (SELECT DISTINCT room, seq FROM unnest($1::text[], $2::bigint[]) AS c(room, seq)) AS c
                 WHERE p.room = c.room AND p.start_seq <= c.seq AND p.end_seq >= c.seq
                """,
                [r["room"] for r in changed], [r["seq"] for r in changed],
            )
        unpaged: dict[str, int] = {}
        asking: list[str] = []
        for room, written in items_per_room.items():
            known = self._unpaged.get(room)
            if known is not None and known + written < PAGE_ITEMS:
                unpaged[room] = known + written
            else:
                asking.append(room)
        if not asking:
            return unpaged
        rows = await conn.fetch(
            f"""
            WITH numbered AS (
                SELECT i.room, i.seq, i.item_text,
                       (row_number() OVER (PARTITION BY i.room ORDER BY i.seq) - 1) / {PAGE_ITEMS} AS chunk,
                       count(*) OVER (PARTITION BY i.room) AS unpaged
                  FROM unnest($1::text[]) AS t(room)
                  CROSS JOIN LATERAL (
                      SELECT coalesce((SELECT p.end_seq FROM {pages} p WHERE p.room = t.room
                                        ORDER BY p.start_seq DESC LIMIT 1), 0) AS paged_to) AS last_page
                  JOIN {ci} i ON i.room = t.room AND i.seq > last_page.paged_to
            ), sealed AS (
                INSERT INTO {pages} (room, start_seq, end_seq, items, body)
                SELECT room, min(seq), max(seq), count(*), string_agg(item_text, ',' ORDER BY seq)
                  FROM numbered
                 WHERE chunk < unpaged / {PAGE_ITEMS}
                 GROUP BY room, chunk
            )
            SELECT room, max(unpaged) % {PAGE_ITEMS} AS unpaged FROM numbered GROUP BY room
            """,
            asking,
        )
        unpaged.update(dict.fromkeys(asking, 0))
        unpaged.update((row["room"], int(row["unpaged"])) for row in rows)
        return unpaged


def _safe_room(token: str) -> str | None:
    try:
        return room_from_token(token)
    except Exception:
        return None


#: What the projector waits out, retrying with backoff: a server away (typed at its boundary,
#: :func:`room_ledger.db.database_errors` for PostgreSQL) and nats-py's own errors (its client
#: reconnects by itself); a ConnectError at start (either server) is waited out too.
_TRANSIENT: tuple[type[BaseException], ...] = (LedgerConnectError, nats.errors.Error, TimeoutError)


# --- python -m room_ledger.projections.projector ----------------------------------------------------------


async def _main(args: argparse.Namespace) -> None:
    settings = Settings.from_env()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    projector = Projector(settings, partition=args.partition, partitions=args.partitions, tune_gc=True,
                          batch_size=args.batch_size, projection=args.projection)
    try:
        if args.once:
            started = time.perf_counter()
            seq = await projector.catch_up(stop_event=stop)
            print(f"projected to sequence {seq} in {time.perf_counter() - started:.2f}s", flush=True)
        else:
            await projector.run(stop)
    finally:
        await projector.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m room_ledger.projections.projector", description=__doc__.split("\n")[0])
    parser.add_argument("--partition", type=int, default=0)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--projection", default=ROOMS, help="checkpoint name (tests use their own)")
    parser.add_argument("--once", action="store_true", help="project up to the current head, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
