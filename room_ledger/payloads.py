"""Payloads in the Object Store: event bodies above the inline limit, stored beside the stream.

Each payload is one object of the payload bucket, named by its event; the event carries a
:class:`~room_ledger.events.PayloadRef` (name, size, sha256) and readers load the body through
:meth:`Payloads.resolve` before handing the record out.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

import msgspec
import nats.errors
import nats.js.errors
from nats.js import api as js_api
from nats.js.object_store import ObjectStore

from room_ledger import events as ev
from room_ledger.connection import ERR_WRONG_LAST_SEQUENCE, EXPECTED_LAST_SUBJECT_SEQ, Connection, PubAck
from room_ledger.errors import AppendError, LedgerError, LogUnavailable, StreamConfigError
from room_ledger.records import Record

#: Object Store chunk size (nats-py's default) and chunks a payload put keeps in flight.
_PUT_CHUNK: Final = 128 * 1024
_PUT_WINDOW: Final = 8


class _NoHash:
    """A digest already known (the spool hashed the bytes as they arrived)."""

    def __init__(self, value: bytes) -> None:
        self._value = value

    def update(self, data: bytes) -> None:
        pass

    def digest(self) -> bytes:
        return self._value


def _object_sha256(info: js_api.ObjectInfo) -> str:
    """An object's digest (``SHA-256=<base64url>``) as hex."""
    digest = (info.digest or "").split("=", 1)[-1] if info.digest else ""
    try:
        return base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    except ValueError:
        return ""


class ObjectUpload:
    """One payload put into the payload bucket while its bytes arrive.

    nats-py's ``ObjectStore.put`` protocol (chunks on ``$O.<bucket>.C.<nuid>``, then the meta
    message on ``$O.<bucket>.M.<name>`` with a rollup), so any client reads the object; but the
    chunks go out as they fill, up to ``_PUT_WINDOW`` in flight, while the stream is still being
    read: a large stream is stored about when it ends. Until ``finish`` publishes the meta message
    the chunks are no object; a failed upload purges them (best effort) and leaves the caller to
    put the spooled file again.
    """

    def __init__(self, payloads: Payloads, name: str, *, existing: js_api.ObjectInfo | bool | None = False,
                 max_buffered: int = 8 * 1024 * 1024) -> None:
        self._payloads = payloads
        self._connection = payloads.connection
        self.name = name
        self.bucket = payloads.settings.payload_bucket
        self.size = 0
        self.chunks = 0
        #: Why the upload stopped early ("" while it goes well).
        self.failed = ""
        self._nuid = self._connection.nuid.next().decode()
        self._subject = f"$O.{self.bucket}.C.{self._nuid}"
        self._buffer = bytearray()
        self._max_buffered = max_buffered
        self._in_flight: deque[asyncio.Future[PubAck]] = deque()
        self._existing = existing
        self._kick = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._closing = False
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._pump(), name=f"object-upload-{name}")
        self._task.add_done_callback(self._pumped)
        # Whether the name is already stored is asked while the bytes arrive, not after.
        self._lookup: asyncio.Task[js_api.ObjectInfo | None] | None = (
            loop.create_task(self._existing_info()) if existing is False else None)
        if self._lookup is not None:
            self._lookup.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def _existing_info(self) -> js_api.ObjectInfo | None:
        store = await self._payloads.store()
        try:
            return await store.get_info(self.name)
        except nats.js.errors.ObjectNotFoundError:
            return None

    def _pumped(self, task: asyncio.Task[None]) -> None:
        # A pump that failed (NATS away past the ack timeout) unblocks writers at once.
        if not task.cancelled() and task.exception() is not None and not self.failed:
            exc = task.exception()
            self.failed = f"{type(exc).__name__}: {exc}"
            self._buffer.clear()
            self._drained.set()
            self._purge_later()

    def feed(self, data: bytes) -> None:
        """Queue bytes (never blocks): a stream callback's side. Past ``max_buffered`` bytes not yet
        sent (NATS slow or away) the upload gives up; the spooled file is put later instead."""
        if self.failed or self._closing:
            return
        self._buffer += data
        if len(self._buffer) > self._max_buffered:
            self._stop("NATS did not keep up with the stream")
            return
        if len(self._buffer) >= _PUT_CHUNK:
            self._drained.clear()
            self._kick.set()

    async def write(self, data: bytes) -> None:
        """Queue bytes and wait while more than a window is unsent (a file's side)."""
        self.feed(data)
        while len(self._buffer) >= _PUT_CHUNK * _PUT_WINDOW and not self.failed:
            await self._drained.wait()
        if self.failed:
            raise AppendError(f"payload {self.name} not stored: {self.failed}")

    async def _pump(self) -> None:
        connection = self._connection
        while True:
            await self._kick.wait()
            self._kick.clear()
            while len(self._buffer) >= _PUT_CHUNK or (self._closing and self._buffer):
                n = min(_PUT_CHUNK, len(self._buffer))
                data = bytes(self._buffer[:n])
                del self._buffer[:n]  # bytearray drops its front without moving the rest
                reply, future = connection.expect_reply()
                await connection.nc.publish(self._subject, data, reply=reply)
                self.size += n
                self.chunks += 1
                self._in_flight.append(future)
                if len(self._in_flight) >= _PUT_WINDOW:
                    await self._settle(self._in_flight.popleft())
            self._drained.set()
            if self._closing:
                break
        while self._in_flight:
            await self._settle(self._in_flight.popleft())

    async def _settle(self, future: asyncio.Future[PubAck]) -> None:
        ack = await self._connection.await_ack(future, f"a chunk of payload {self.name}")
        if ack.error is not None:
            raise AppendError(f"stream refused a chunk of payload {self.name}: {ack.error.description}",
                              err_code=ack.error.err_code)

    def _stop(self, why: str) -> None:
        self.failed = self.failed or why
        if self._lookup is not None and not self._lookup.done():
            self._lookup.cancel()
        self._buffer.clear()
        self._drained.set()
        if not self._task.done():
            self._task.cancel()
        self._purge_later()

    def _purge_later(self) -> None:
        # Chunks without a meta message are no object, but they take room: purged now, and again
        # after the next put that succeeds (chunks nats-py held while NATS was away are sent when
        # it is back, after a purge tried during the outage).
        self._payloads.unpurged_chunks.add(self._subject)

        async def purge() -> None:
            for future in self._in_flight:
                future.cancel()
            with contextlib.suppress(Exception):
                await self._connection.js.purge_stream(f"OBJ_{self.bucket}", subject=self._subject)

        self._connection.in_background(purge())

    def abort(self) -> None:
        self._stop("aborted")

    async def finish(self, sha256: str, *, check_existing: bool = True) -> js_api.ObjectInfo:
        """Send the rest and publish the meta message (``sha256``: hex digest of all bytes fed).

        An object already stored under the name with the same bytes (a retry, a second bridge)
        is kept and this upload's chunks dropped. Raises when the upload failed.
        """
        self._closing = True
        self._kick.set()
        try:
            await self._task
        except asyncio.CancelledError:
            if not self.failed:
                raise
        except BaseException as exc:
            if not self.failed:
                self._stop(f"{type(exc).__name__}: {exc}")
            raise AppendError(f"payload {self.name} not stored: {self.failed}") from exc
        if self.failed:
            raise AppendError(f"payload {self.name} not stored: {self.failed}")
        js = self._connection.js
        existing = self._existing
        try:
            if check_existing and self._lookup is not None:
                existing = await self._lookup
            if isinstance(existing, js_api.ObjectInfo) and existing.size == self.size \
                    and _object_sha256(existing) == sha256 and not existing.deleted:
                self._purge_later()
                return existing
            info = js_api.ObjectInfo(
                name=self.name, bucket=self.bucket, nuid=self._nuid, size=self.size, chunks=self.chunks,
                digest="SHA-256=" + base64.urlsafe_b64encode(bytes.fromhex(sha256)).decode(),
                mtime=datetime.now(UTC).isoformat(), options=js_api.ObjectMetaOptions(max_chunk_size=_PUT_CHUNK),
            )
            meta_subject = f"$O.{self.bucket}.M.{base64.urlsafe_b64encode(self.name.encode()).decode()}"
            headers: dict[str, str] = {js_api.Header.ROLLUP: "sub"}
            if existing is None:
                # First writer wins: two uploads of one name (two bridges in a room) both found no
                # object when they started. The second meta would replace the first and leave its
                # chunks stored under no object until max age; expecting no meta yet makes the
                # second upload see the first and drop its own chunks instead.
                headers[EXPECTED_LAST_SUBJECT_SEQ] = "0"
            try:
                await js.publish(meta_subject, msgspec.json.encode(info.as_dict()), headers=headers)
            except nats.js.errors.APIError as exc:
                if exc.err_code != ERR_WRONG_LAST_SEQUENCE:
                    raise
                winner = await self._existing_info()
                if winner is not None and winner.size == self.size and _object_sha256(winner) == sha256 \
                        and not winner.deleted:
                    self._purge_later()
                    return winner
                # Another upload of the name with other bytes (or since deleted): this one replaces it.
                existing = winner
                await js.publish(meta_subject, msgspec.json.encode(info.as_dict()),
                                 headers={js_api.Header.ROLLUP: "sub"})
        except BaseException as exc:
            self._stop(f"{type(exc).__name__}: {exc}")
            raise
        if isinstance(existing, js_api.ObjectInfo) and existing.nuid and not existing.deleted:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await js.purge_stream(f"OBJ_{self.bucket}", subject=f"$O.{self.bucket}.C.{existing.nuid}")
        return info


class Payloads:
    """The payload bucket: put, read, resolve and purge payloads, and the bucket's status."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.settings = connection.settings
        self._store: ObjectStore | None = None
        #: Chunk subjects of failed uploads, purged again after the next put that succeeds.
        self.unpurged_chunks: set[str] = set()

    def desired_config(self) -> js_api.ObjectStoreConfig:
        """The payload bucket: beside the stream, with its replicas and retention."""
        s = self.settings
        return js_api.ObjectStoreConfig(
            bucket=s.payload_bucket,
            description=f"room-ledger: payloads of {s.stream} events above the inline limit",
            ttl=s.max_age_s or None,
            storage=js_api.StorageType.FILE,
            replicas=s.replicas,
        )

    async def store(self, *, create: bool = True) -> ObjectStore:
        """The payload bucket (created on first use, brought to the stream's replicas and max age)."""
        if self._store is not None:
            return self._store
        config = self.desired_config()
        bucket = config.bucket or ""
        stream = f"OBJ_{bucket}"
        try:
            info = await self.connection.js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            if not create:
                raise
            try:
                store = await self.connection.js.create_object_store(bucket, config)
            except nats.js.errors.APIError as exc:
                raise StreamConfigError(
                    f"cannot create the payload bucket {bucket!r}: {exc.description} (err_code {exc.err_code})"
                ) from exc
        else:
            current = info.config
            wanted_age = float(config.ttl or 0)
            if (current.num_replicas or 1) != config.replicas or abs(float(current.max_age or 0) - wanted_age) > 0.001:
                current.num_replicas = config.replicas
                current.max_age = wanted_age
                await self.connection.js.update_stream(current)
            store = ObjectStore(name=bucket, stream=stream, js=self.connection.js)
        self._store = store
        return store

    async def info(self, ref: ev.PayloadRef) -> js_api.ObjectInfo | None:
        """The stored object of ``ref`` when it is there whole (same size and digest), else None."""
        store = await self.store()
        try:
            info = await store.get_info(ref.name)
        except nats.js.errors.ObjectNotFoundError:
            return None
        if info.size != ref.size or _object_sha256(info) != ref.sha256:
            return None
        return info

    async def put(self, ref: ev.PayloadRef, source: Path | bytes) -> None:
        """Store a payload under its reference's name, once: an object already there with the same
        digest (a retry, a second bridge) is kept. Chunks of a put that failed midway are purged
        by nats-py and, without their meta message, never visible as an object."""
        store = await self.store()
        try:
            existing: js_api.ObjectInfo | None = await store.get_info(ref.name)
        except nats.js.errors.ObjectNotFoundError:
            existing = None
        if existing is not None and existing.size == ref.size and _object_sha256(existing) == ref.sha256:
            return
        handle: IO[bytes] = io.BytesIO(source) if isinstance(source, bytes) else await asyncio.to_thread(
            Path(source).open, "rb")
        try:
            info = await self._put_object(ref.name, handle, existing, sha256=ref.sha256)
        finally:
            handle.close()
        await self._purge_unpurged()
        if info.size != ref.size or _object_sha256(info) != ref.sha256:
            raise AppendError(
                f"payload {ref.name} stored as {info.size} bytes with another digest than the event's "
                f"({ref.size} bytes, sha256 {ref.sha256[:12]}…): the source changed; retry"
            )

    async def _purge_unpurged(self) -> None:
        """Purge the chunks failed uploads left behind while NATS was away."""
        for subject in list(self.unpurged_chunks):
            try:
                await self.connection.js.purge_stream(f"OBJ_{self.settings.payload_bucket}", subject=subject)
            except (nats.errors.Error, nats.js.errors.Error):
                return
            self.unpurged_chunks.discard(subject)

    async def _put_object(self, name: str, source: IO[bytes], existing: js_api.ObjectInfo | None, *,
                          sha256: str | None = None) -> js_api.ObjectInfo:
        """Put a file's bytes under ``name`` (see :class:`ObjectUpload`)."""
        upload = ObjectUpload(self, name, existing=existing)
        digest = _NoHash(bytes.fromhex(sha256)) if sha256 else hashlib.sha256()
        try:
            while True:
                # Page-cache reads of a just-written spool file: cheaper than a thread hop each.
                data = source.read(_PUT_CHUNK)
                if not data:
                    break
                digest.update(data)
                await upload.write(data)
        except BaseException:
            upload.abort()
            raise
        return await upload.finish(digest.digest().hex(), check_existing=False)

    def upload(self, name: str) -> ObjectUpload:
        """Start putting a payload whose bytes are still arriving (``feed``, then ``finish``)."""
        return ObjectUpload(self, name)

    async def read(self, ref: ev.PayloadRef, into: IO[bytes] | None = None) -> bytes:
        """The payload's bytes (checked against the reference's digest), or written ``into`` a file."""
        store = await self.store(create=False)
        target = into if into is not None else io.BytesIO()
        try:
            await store.get(ref.name, writeinto=target)  # type: ignore[arg-type]
        except nats.js.errors.ObjectNotFoundError as exc:
            raise LedgerError(
                f"payload object {ref.name!r} is not in bucket {self.settings.payload_bucket!r}: "
                "purged, expired with LEDGER_MAX_AGE, or never stored"
            ) from exc
        if into is not None:
            return b""
        data = target.getvalue()  # type: ignore[attr-defined]
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise LedgerError(f"payload object {ref.name!r} does not match the event's sha256")
        return bytes(data)

    async def resolve(self, record: Record) -> Record:
        """The record with its body loaded from the Object Store when the event's payload lives
        there (an object that cannot be read gives an opaque event naming why)."""
        event = record.event
        if isinstance(event, ev.OpaqueEvent) or event.payload is None or not event.payload.form:
            return record
        try:
            data = await self.read(event.payload)
        except (LedgerError, nats.errors.Error, nats.js.errors.Error) as exc:
            resolved: ev.Event = ev.unresolved(event, f"payload not loaded: {exc}")
        else:
            resolved = ev.with_payload(event, data)
        return Record(seq=record.seq, subject=record.subject, time=record.time, event=resolved)

    async def purge_room(self, room: str) -> int:
        """Delete every payload object of a room; returns how many went."""
        prefix = ev.payload_object_name(room, "")
        try:
            store = await self.store(create=False)
        except nats.js.errors.NotFoundError:
            return 0
        try:
            infos = await store.list(ignore_deletes=True)
        except nats.js.errors.NotFoundError:
            return 0
        deleted = 0
        for info in infos:
            if info.name and info.name.startswith(prefix) and not info.deleted:
                with contextlib.suppress(nats.js.errors.ObjectNotFoundError):
                    await store.delete(info.name)
                    deleted += 1
        return deleted

    async def bucket_status(self) -> dict[str, Any] | None:
        """The bucket as ``ledger doctor`` shows it; None when none was created yet. Raises
        :class:`LogUnavailable` when JetStream does not answer."""
        try:
            info = await self.connection.js.stream_info(f"OBJ_{self.settings.payload_bucket}")
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise LogUnavailable(str(exc) or type(exc).__name__) from exc
        return {
            "bucket": self.settings.payload_bucket,
            "bytes": int(info.state.bytes or 0),
            "messages": int(info.state.messages or 0),
            "replicas": int(info.config.num_replicas or 1),
            "max_age_s": float(info.config.max_age or 0) or None,
        }
