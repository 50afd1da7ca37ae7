"""The log: append, read and follow a room's events on the ledger's stream.

Appends go out pipelined on the shared connection's reply inbox (acknowledgements parsed with
msgspec), and ``append_many`` groups events into JetStream atomic batches so the server fsyncs
once per batch rather than once per event. Reads are ordered consumers drained a chunk at a
time, or batched direct gets for short tails; a record whose body lives in the Object Store is
resolved before it is handed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api as js_api

from room_ledger import _wire
from room_ledger import events as ev
from room_ledger.connection import ERR_WRONG_LAST_SEQUENCE, EXPECTED_LAST_SUBJECT_SEQ, Connection, PubAck
from room_ledger.errors import (
    AppendError,
    ConflictError,
    ConnectError,
    EventError,
    EventTooLarge,
    LedgerError,
    LogUnavailable,
)
from room_ledger.payloads import Payloads
from room_ledger.records import Position, Record, ack_position, needs_payload, rfc3339_time
from room_ledger.settings import DIRECT_BATCH
from room_ledger.stream import StreamLimits
from room_ledger.subjects import Subjects, category_of

log = logging.getLogger("ledger.client")

MSG_ID: Final = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: Final = "Nats-Expected-Last-Subject-Sequence-Subject"
BATCH_ID: Final = "Nats-Batch-Id"
BATCH_SEQUENCE: Final = "Nats-Batch-Sequence"
BATCH_COMMIT: Final = "Nats-Batch-Commit"

#: nats-server's default maximum of messages in one atomic batch. Fewer, larger batches keep the
#: server busier between acknowledgements (the bridge benchmark: 0.72x -> 0.82x of a raw
#: publish against batches of 500). A server configured with a lower maximum refuses the batch
#: and the client halves its size from then on.
ATOMIC_BATCH_SIZE: Final = 1000
#: JetStream's "atomic publish batch is too large" and "batch is incomplete" error codes.
ERR_BATCH_TOO_LARGE: Final = 10199
ERR_BATCH_INCOMPLETE: Final = 10176
#: "atomic publish batch contains duplicate message id": nothing of the batch was stored (an id in
#: it is within the stream's duplicate window); it is sent again event by event, which reports them.
ERR_BATCH_DUPLICATE: Final = 10201
#: "atomic publish is disabled" on this stream.
ERR_ATOMIC_DISABLED: Final = 10174
#: Per-event overhead on the wire besides the payload: subject, headers, reply.
_HEADER_ALLOWANCE: Final = 512
_EVENT_ID_RE: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: Messages a reader buffers before it holds the server back.
_READ_BUFFER: Final = 10_000
#: How long a read keeps asking a recovering cluster for its consumer.
READER_CREATE_TIMEOUT_S: Final = 30.0
#: How long a finished read waits for its consumer to be deleted (the server expires it anyway).
READER_DELETE_TIMEOUT_S: Final = 1.0


@dataclass(slots=True)
class _FramedBatch:
    batch_id: str
    frames: list[bytes]
    first_reply: str
    first_future: asyncio.Future[PubAck]
    commit_reply: str
    commit_future: asyncio.Future[PubAck]

    def forget(self, connection: Connection) -> None:
        """Unregister the replies of a batch that will not be sent."""
        for reply in (self.first_reply, self.commit_reply):
            connection.forget_reply(reply)


def _record(msg: Msg) -> Record:
    seq, stored_at = ack_position(msg.reply)
    return Record(seq=seq, subject=msg.subject, time=stored_at, event=ev.decode_lenient(msg.data))


def _type_matcher(types: Sequence[str] | None) -> Any:
    if not types:
        return None
    patterns = list(types)
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


class EventLog:
    """Every room's events on the stream: append, read, follow, and where the log ends."""

    def __init__(self, connection: Connection, subjects: Subjects, limits: StreamLimits, payloads: Payloads) -> None:
        self._connection = connection
        self.settings = connection.settings
        self.subjects = subjects
        self._limits = limits
        self._payloads = payloads
        #: Events per atomic batch now: ATOMIC_BATCH_SIZE, or less after the server refused it.
        self.atomic_batch_size = ATOMIC_BATCH_SIZE
        # One batch at a time, so events keep their order across concurrent append_many calls.
        self._append_lock = asyncio.Lock()

    async def head(self) -> int:
        """The sequence of the last event stored in the log (0 when there is none).

        Not the stream's ``last_seq``: after ``ledger purge`` of the newest room that number
        names a message that no longer exists, and a reader waiting for it would wait forever.
        """
        return await self._last_seq(self.subjects.all_rooms())

    def _encode_checked(self, event: ev.KnownEvent) -> bytes:
        return self._checked(event, ev.encode(event))

    def _checked(self, event: ev.KnownEvent, data: bytes) -> bytes:
        if not _EVENT_ID_RE.match(event.id):
            # The id travels in a header: CR/LF or spaces there would corrupt the protocol.
            raise EventError(
                f"event id {event.id[:80]!r} is not usable: expected 1-128 of A-Z a-z 0-9 . _ : - "
                "(derive one with ledger.events.derived_event_id)"
            )
        subject_len = len(self.subjects.event(event.room, event.type))
        if len(data) + subject_len + _HEADER_ALLOWANCE > self._limits.max_msg_size:
            raise EventTooLarge(
                event.id, len(data) + subject_len + _HEADER_ALLOWANCE, self._limits.max_msg_size
            )
        return data

    async def append(
        self,
        event: ev.KnownEvent,
        *,
        expect_room_seq: int | None = None,
        expect_category: str | None = None,
    ) -> Position:
        """Append one event; returns its position.

        ``expect_room_seq=N``: store it only if the room's last event is still at sequence N
        (0 = the room is empty), else raise :class:`ConflictError`. With ``expect_category``
        the check covers only that category of the room (e.g. ``"floor"``).
        """
        data = self._encode_checked(event)
        headers = {MSG_ID: event.id}
        if expect_room_seq is not None:
            scope = (
                self.subjects.room_category(event.room, expect_category)
                if expect_category
                else self.subjects.room(event.room)
            )
            headers[EXPECTED_LAST_SUBJECT_SEQ] = str(expect_room_seq)
            headers[EXPECTED_LAST_SUBJECT_SEQ_SUBJECT] = scope
        else:
            scope = ""
        reply, future = self._connection.expect_reply()
        await self._connection.nc.publish(self.subjects.event(event.room, event.type), data, reply=reply, headers=headers)
        ack = await self._connection.await_ack(future, f"event {event.id}")
        if ack.error is not None:
            if ack.error.err_code == ERR_WRONG_LAST_SEQUENCE:
                raise ConflictError(
                    scope,
                    expect_room_seq or 0,
                    f"{scope} moved past sequence {expect_room_seq}: "
                    f"{ack.error.description}; re-read the room and retry",
                )
            raise AppendError(
                f"stream refused event {event.id}: {ack.error.description} (err_code {ack.error.err_code})",
                err_code=ack.error.err_code,
            )
        return Position(ack.seq, ack.duplicate)

    async def append_many(
        self, events: Iterable[ev.KnownEvent], *, atomic: bool | None = None,
        payloads: Sequence[bytes] | None = None,
    ) -> list[Position]:
        """Append many events, in order, every one acknowledged.

        ``atomic`` (default: when the stream allows it) sends them in JetStream atomic batches
        of up to ``ATOMIC_BATCH_SIZE`` (1,000), one fsync per batch: the fastest way to a server
        that fsyncs every write. A batch the server rejects because it holds an already-stored id (a retry, or a
        second bridge) is sent again event by event, so each duplicate is reported as such and
        the rest are stored. ``atomic=False`` pipelines single publishes and waits once for all
        their acknowledgements: a lower latency for small groups on a server without fsync.
        ``payloads``, when given, are the events already encoded with ``ev.encode`` (the bridge
        encodes each event once, to check its size): they are checked, not encoded again.
        """
        items = list(events)
        if payloads is None:
            encoded = [self._encode_checked(e) for e in items]
        else:
            if len(payloads) != len(items):
                raise ValueError(f"{len(payloads)} payloads for {len(items)} events")
            encoded = [self._checked(e, data) for e, data in zip(items, payloads, strict=True)]
        use_atomic = self._limits.atomic if atomic is None else (atomic and self._limits.atomic)
        size = self.atomic_batch_size
        chunks = [(items[start : start + size], encoded[start : start + size]) for start in range(0, len(items), size)]
        positions: list[Position] = []
        async with self._append_lock:
            if not (use_atomic and len(items) > 1):
                for chunk, chunk_payloads in chunks:
                    positions.extend(await self._append_pipelined(chunk, chunk_payloads))
                return positions
            batch: _FramedBatch | None = self._frame_atomic(*chunks[0])
            following: _FramedBatch | None = None
            try:
                for index, (chunk, chunk_payloads) in enumerate(chunks):
                    assert batch is not None
                    await self._send_frames(batch.frames)
                    # Frame the next batch while the server stores this one: the client's work
                    # and the server's fsync overlap, yet batches go out one at a time, in order.
                    following = self._frame_atomic(*chunks[index + 1]) if index + 1 < len(chunks) else None
                    batch_positions = await self._finish_atomic(batch, len(chunk))
                    if batch_positions is None:
                        batch_positions = await self._append_pipelined(chunk, chunk_payloads)
                    positions.extend(batch_positions)
                    batch, following = following, None
            finally:
                # A batch framed but never sent must not leave its replies registered.
                for unsent in (batch, following):
                    if unsent is not None:
                        unsent.forget(self._connection)
        return positions

    def _frame_atomic(self, chunk: list[ev.KnownEvent], payloads: list[bytes]) -> _FramedBatch:
        """One atomic batch framed as HPUB commands (nats-py's publish() spends ~30 µs a
        message on headers, half the time of a batch), with its two acknowledgements awaited."""
        batch_id = uuid.uuid4().hex.encode()
        last = len(chunk) - 1
        first_reply, first_future = self._connection.expect_reply()
        # A batch of one (the tail of 1,001 or 2,001 … events) is its own first and commit message:
        # one reply comes, so both waits are on it (waiting for a second stalled the writer).
        commit_reply, commit_future = self._connection.expect_reply() if last > 0 else (first_reply, first_future)
        frames: list[bytes] = []
        event_subject = self.subjects.event
        for index, (event, payload) in enumerate(zip(chunk, payloads, strict=True)):
            header = b"NATS/1.0\r\nNats-Msg-Id: %s\r\nNats-Batch-Id: %s\r\nNats-Batch-Sequence: %d\r\n" % (
                event.id.encode(),
                batch_id,
                index + 1,
            )
            reply = b""
            if index == 0:
                reply = first_reply.encode() + b" "
            if index == last:
                header += b"Nats-Batch-Commit: 1\r\n"
                reply = commit_reply.encode() + b" "
            header += b"\r\n"
            subject = event_subject(event.room, event.type).encode()
            frames.append(
                b"HPUB %s %s%d %d\r\n%s%s\r\n"
                % (subject, reply, len(header), len(header) + len(payload), header, payload)
            )
        return _FramedBatch(batch_id.decode(), frames, first_reply, first_future, commit_reply, commit_future)

    async def _finish_atomic(self, batch: _FramedBatch, size: int) -> list[Position] | None:
        """The positions of a sent batch; None when it must be sent again event by event."""
        first = await self._connection.await_ack(batch.first_future, f"atomic batch {batch.batch_id}")
        commit = await self._connection.await_ack(batch.commit_future, f"atomic batch {batch.batch_id}")
        error = first.error or commit.error
        if error is not None:
            if error.err_code == ERR_BATCH_DUPLICATE:
                return None
            if error.err_code in (ERR_BATCH_TOO_LARGE, ERR_BATCH_INCOMPLETE) and size > 1:
                # Nothing of the batch was stored: send it again event by event, and smaller
                # batches from now on.
                self.atomic_batch_size = max(1, min(self.atomic_batch_size, size) // 2)
                log.info("the server refused an atomic batch of %d (%s); batches of %d from now on",
                         size, error.description, self.atomic_batch_size)
                return None
            if error.err_code == ERR_ATOMIC_DISABLED:
                self._limits.atomic = False
                return None
            raise AppendError(
                f"stream refused a batch of {size} events: {error.description} (err_code {error.err_code})",
                err_code=error.err_code,
            )
        first_seq = commit.seq - size + 1
        return [Position(first_seq + i) for i in range(size)]

    async def _send_frames(self, frames: list[bytes]) -> None:
        nc = self._connection.nc
        if nc.is_closed:
            raise ConnectError(f"the connection to NATS at {self._connection.url} is closed")
        await _wire.send_raw(nc, b"".join(frames))

    async def _append_pipelined(self, chunk: list[ev.KnownEvent], payloads: list[bytes]) -> list[Position]:
        futures: list[asyncio.Future[PubAck]] = []
        frames: list[bytes] = []
        for event, payload in zip(chunk, payloads, strict=True):
            reply, future = self._connection.expect_reply()
            futures.append(future)
            header = b"NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n" % event.id.encode()
            subject = self.subjects.event(event.room, event.type).encode()
            frames.append(
                b"HPUB %s %s %d %d\r\n%s%s\r\n"
                % (subject, reply.encode(), len(header), len(header) + len(payload), header, payload)
            )
        await self._send_frames(frames)
        _, pending = await asyncio.wait(futures, timeout=self._connection.ack_timeout_s)
        if pending:
            for future in pending:
                future.cancel()
            raise AppendError(
                f"{len(pending)} of {len(chunk)} appends not acknowledged within {self._connection.ack_timeout_s:.0f}s by NATS at "
                f"{self._connection.url}; they are safe to retry (same event ids)"
            )
        positions: list[Position] = []
        for event, future in zip(chunk, futures, strict=True):
            ack = future.result()
            if ack.error is not None:
                raise AppendError(
                    f"stream refused event {event.id}: {ack.error.description} (err_code {ack.error.err_code})",
                    err_code=ack.error.err_code,
                )
            positions.append(Position(ack.seq, ack.duplicate))
        return positions

    # --- read --------------------------------------------------------------------------------

    def _filter_for(self, room: str, types: Sequence[str] | None) -> str:
        if types:
            categories = {category_of(t) for t in types}
            # A glob like "floor.*" names one category; "*" or "*.state" could be any.
            if len(categories) == 1 and not any(ch in next(iter(categories)) for ch in "*?["):
                return self.subjects.room_category(room, next(iter(categories)))
        return self.subjects.room(room)

    async def room_last_seq(self, room: str) -> int:
        """The sequence of the room's last event, 0 when it has none."""
        return await self._last_seq(self.subjects.room(room))

    async def _last_seq(self, subject_filter: str) -> int:
        try:
            msg = await self._connection.js.get_last_msg(self.settings.stream, subject_filter, direct=True)
        except nats.js.errors.NotFoundError:
            return 0
        return int(msg.seq or 0)

    async def _deliveries(self, subject: str, config: js_api.ConsumerConfig) -> AsyncGenerator[list[Msg], None]:
        """Messages of an ordered consumer, handed over in the chunks they arrived in.

        nats-py's per-message async iterator costs more than the messages themselves, so the
        subscription callback fills a buffer and the reader drains it a chunk at a time. A
        full buffer makes the callback wait, which holds back flow-control replies and so
        slows the server down: memory stays bounded however large the room.
        """
        buffer: deque[Msg] = deque()
        arrived = asyncio.Event()
        room_for_more = asyncio.Event()
        room_for_more.set()

        async def on_message(msg: Msg) -> None:
            buffer.append(msg)
            arrived.set()
            if len(buffer) >= _READ_BUFFER:
                room_for_more.clear()
                await room_for_more.wait()

        sub = await self._subscribe_with_retries(subject, config, on_message)
        try:
            while True:
                if not buffer:
                    arrived.clear()
                    await arrived.wait()
                    continue
                chunk = list(buffer)
                buffer.clear()
                room_for_more.set()
                yield chunk
        finally:
            room_for_more.set()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            await self._delete_reader(sub)

    async def _delete_reader(self, sub: Any) -> None:
        """Delete a finished reader's consumer. Left alone, an ordered consumer outlives its reader
        by the server's inactive threshold (5 s), and many short reads in that time (log-only
        hydrations of large rooms, say) count against the stream's consumer limit."""
        name = _wire.consumer_name(sub)
        if name is None or not self._connection.is_open:
            return
        with contextlib.suppress(Exception):  # best effort: the server expires it anyway
            await asyncio.wait_for(self._connection.js.delete_consumer(self.settings.stream, name), READER_DELETE_TIMEOUT_S)

    async def _subscribe_with_retries(
        self, subject: str, config: js_api.ConsumerConfig, on_message: Callable[[Msg], Awaitable[None]]
    ) -> Subscription:
        # Creating a consumer goes through the cluster's meta leader; just after a node fails
        # that can take a few seconds to answer, which is an outage to wait out, not an error.
        deadline = time.monotonic() + READER_CREATE_TIMEOUT_S
        delay = 0.2
        while True:
            try:
                return await self._connection.js.subscribe(
                    subject,
                    stream=self.settings.stream,
                    ordered_consumer=True,
                    idle_heartbeat=2.0,
                    config=config,
                    cb=on_message,
                    pending_msgs_limit=4 * _READ_BUFFER,
                    pending_bytes_limit=256 * 1024 * 1024,
                )
            except (
                nats.errors.TimeoutError,
                nats.js.errors.ServiceUnavailableError,
                nats.errors.NoRespondersError,
            ) as exc:
                if time.monotonic() + delay > deadline:
                    raise LogUnavailable(
                        f"JetStream at {self._connection.url} did not create a reader for {subject} "
                        f"({type(exc).__name__}): is the stream {self.settings.stream!r} available? "
                        "`ledger doctor` shows its state"
                    ) from exc
                log.info("creating a reader for %s timed out; retrying", subject)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def read(
        self,
        room: str,
        *,
        after: int = 0,
        until: int | None = None,
        types: Sequence[str] | None = None,
        since_time: datetime | None = None,
        follow: bool = False,
    ) -> AsyncGenerator[Record, None]:
        """The room's events in order: after sequence ``after`` (or from ``since_time``).

        Without ``follow`` the read ends at the room's last event as of the call (or ``until``);
        with it the read continues with live events until the caller stops iterating. A stored
        event that does not decode comes back as an :class:`~room_ledger.events.OpaqueEvent` with
        its error, never as an exception that would end the read.
        """
        subject = self._filter_for(room, types)
        wanted = _type_matcher(types)
        # Where a non-following read ends: the room's last event as of now.
        last = 0 if follow else await self._last_seq(subject)
        if not follow and (last <= after or (until is not None and until <= after)):
            return
        if since_time is not None:
            if not follow and await self._nothing_since(subject, since_time):
                return
            config = js_api.ConsumerConfig(
                deliver_policy=js_api.DeliverPolicy.BY_START_TIME, opt_start_time=since_time, mem_storage=True
            )
        else:
            config = js_api.ConsumerConfig(
                deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=after + 1,
                mem_storage=True,
            )
        stop = last if until is None else min(last, until) if last else until
        # Closed on the way out (not when collected), so the reader's consumer is gone when the read ends.
        async with contextlib.aclosing(self._deliveries(subject, config)) as deliveries:
            async for chunk in deliveries:
                for msg in chunk:
                    record = _record(msg)
                    if until is not None and record.seq > until:
                        return
                    if wanted is None or wanted(record.type):
                        yield await self._payloads.resolve(record) if needs_payload(record.event) else record
                    if stop and record.seq >= stop:
                        return

    async def _nothing_since(self, subject: str, since_time: datetime) -> bool:
        """True when no message on ``subject`` was stored at or after ``since_time``."""
        request = msgspec.json.encode({"start_time": since_time, "next_by_subj": subject})
        try:
            reply = await self._connection.nc.request(
                f"$JS.API.DIRECT.GET.{self.settings.stream}", request, timeout=self._connection.ack_timeout_s
            )
        except nats.errors.Error as exc:
            raise LedgerError(f"cannot look up {subject} by time: {exc}") from exc
        status = (reply.headers or {}).get("Status", "")
        return status == "404"

    async def read_recent(self, room: str, *, after: int, batch: int = DIRECT_BATCH,
                          types: Sequence[str] | None = None) -> list[Record]:
        """The room's events after ``after`` (of ``types`` only, when given), up to its newest,
        without creating a consumer.

        For the short tails hydration folds on top of a projection row, and for the few events of
        one category a room listing needs: JetStream's batched direct get answers from the
        stream's subject index, where a consumer would first have to be created (and counted over
        the stream, against its consumer limit) for a handful of events.
        """
        subject = self._filter_for(room, types)
        wanted = _type_matcher(types)
        records: list[Record] = []
        next_seq = after + 1
        while True:
            inbox = self._connection.nc.new_inbox()
            sub = await self._connection.nc.subscribe(inbox)
            try:
                request = msgspec.json.encode({"seq": next_seq, "next_by_subj": subject, "batch": batch})
                await self._connection.nc.publish(f"$JS.API.DIRECT.GET.{self.settings.stream}", request, reply=inbox)
                pending = 0
                while True:
                    try:
                        msg = await sub.next_msg(timeout=self._connection.ack_timeout_s)
                    except nats.errors.TimeoutError as exc:
                        raise LogUnavailable(
                            f"no answer from JetStream at {self._connection.url} reading room {room!r}: "
                            "`ledger doctor` shows the stream's state"
                        ) from exc
                    headers = msg.headers or {}
                    status = headers.get("Status")
                    if status:
                        if status in ("204", "404"):
                            break
                        raise LedgerError(f"reading room {room!r} failed: {status} {headers.get('Description', '')}")
                    seq = int(headers["Nats-Sequence"])
                    records.append(
                        Record(
                            seq=seq,
                            subject=headers.get("Nats-Subject", msg.subject),
                            time=rfc3339_time(headers["Nats-Time-Stamp"]),
                            event=ev.decode_lenient(msg.data),
                        )
                    )
                    pending = int(headers.get("Nats-Num-Pending", "0") or 0)
                    next_seq = seq + 1
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            if not pending:
                if wanted is not None:
                    records = [r for r in records if wanted(r.type)]
                return [await self._payloads.resolve(r) if needs_payload(r.event) else r for r in records]

    async def follow(
        self, room: str, *, after: int = 0, types: Sequence[str] | None = None
    ) -> AsyncGenerator[Record, None]:
        """History after ``after``, then live events: no gap, no duplicate, across reconnects."""
        async with contextlib.aclosing(self.read(room, after=after, types=types, follow=True)) as records:
            async for record in records:
                yield record

    async def read_all(self, *, after: int = 0, follow: bool = False) -> AsyncGenerator[Record, None]:
        """Every room's events in stream order (for projectors and tools)."""
        last = 0 if follow else await self.head()
        if not follow and last <= after:
            return
        config = js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1, mem_storage=True
        )
        async with contextlib.aclosing(self._deliveries(self.subjects.all_rooms(), config)) as deliveries:
            async for chunk in deliveries:
                for msg in chunk:
                    record = _record(msg)
                    yield await self._payloads.resolve(record) if needs_payload(record.event) else record
                    if last and record.seq >= last:
                        return
