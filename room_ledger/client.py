"""The ``Ledger`` client: append, read and follow a room's events on JetStream.

Every other part of room-ledger (bridge, projector, CLI, agents) goes through this class::

    async with Ledger(Settings.from_env()) as ledger:
        position = await ledger.append(make_event("support-42", FloorRequest(agent_id="triage")))
        async for record in ledger.read("support-42"):
            ...

Appends go out pipelined on the core NATS connection with one shared reply inbox (parsing
acknowledgements with msgspec), and ``append_many`` groups events into JetStream atomic
batches so the server fsyncs once per batch rather than once per event.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import difflib
import fnmatch
import hashlib
import io
import logging
import re
import ssl
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.object_store import ObjectStore
from nats.nuid import NUID

from room_ledger import _wire, embedded
from room_ledger import events as ev
from room_ledger.errors import (
    AppendError,
    ConflictError,
    ConnectError,
    EventError,
    EventTooLarge,
    LedgerError,
    LogUnavailable,
    StreamConfigError,
    UnknownRoom,
)
from room_ledger.hydrate import hydrate
from room_ledger.settings import DIRECT_BATCH, Settings
from room_ledger.subjects import Subjects, category_of, room_from_token, room_token
from room_ledger.watch import RoomWatch

if TYPE_CHECKING:
    from room_ledger.hydrate import Snapshot

log = logging.getLogger("ledger.client")

MSG_ID: Final = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQ: Final = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: Final = "Nats-Expected-Last-Subject-Sequence-Subject"
BATCH_ID: Final = "Nats-Batch-Id"
BATCH_SEQUENCE: Final = "Nats-Batch-Sequence"
BATCH_COMMIT: Final = "Nats-Batch-Commit"

#: JetStream's "wrong last sequence" error code.
ERR_WRONG_LAST_SEQUENCE: Final = 10071
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
#: The NATS protocol's -ERR texts for refused credentials. Core NATS errors carry no code, and at
#: connect nats-py raises the server's line as a plain ``nats.errors.Error``.
_CREDENTIALS_REFUSED: Final = ("authorization violation", "authentication timeout", "authentication expired",
                               "user authentication revoked")
#: Object Store chunk size (nats-py's default) and chunks a payload put keeps in flight.
_PUT_CHUNK: Final = 128 * 1024
_PUT_WINDOW: Final = 8
#: Per-event overhead on the wire besides the payload: subject, headers, reply.
_HEADER_ALLOWANCE: Final = 512
_EVENT_ID_RE: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: Messages a reader buffers before it holds the server back.
_READ_BUFFER: Final = 10_000
#: How long a read keeps asking a recovering cluster for its consumer.
READER_CREATE_TIMEOUT_S: Final = 30.0
#: How long an append waits for its acknowledgement before giving up.
ACK_TIMEOUT_S: Final = 10.0
#: How long a finished read waits for its consumer to be deleted (the server expires it anyway).
READER_DELETE_TIMEOUT_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class Position:
    """Where an appended event sits in the stream."""

    seq: int
    #: True when the server already had an event with this id (stored once, not an error).
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Record:
    """An event as read from the log: the event with its stream sequence, subject and time."""

    seq: int
    subject: str
    time: datetime
    event: ev.Event

    @property
    def room(self) -> str:
        return self.event.room

    @property
    def type(self) -> str:
        return ev.event_type(self.event)


@dataclass(frozen=True, slots=True)
class RoomSummary:
    room: str
    events: int


@dataclass(slots=True)
class _FramedBatch:
    batch_id: str
    frames: list[bytes]
    first_reply: str
    first_future: asyncio.Future[_PubAck]
    commit_reply: str
    commit_future: asyncio.Future[_PubAck]

    def forget(self, pending: dict[str, asyncio.Future[_PubAck]]) -> None:
        """Unregister the replies of a batch that will not be sent."""
        for reply in (self.first_reply, self.commit_reply):
            pending.pop(reply.rsplit(".", 1)[-1], None)


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    batch: str | None = None
    count: int = 0
    error: _ApiError | None = None


_ack_decoder: Final = msgspec.json.Decoder(_PubAck)


def ack_position(reply: str) -> tuple[int, datetime]:
    """Stream sequence and storage time from a JetStream delivery's reply subject.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>`` (or the form with
    domain and account hash before the stream): nats-py's ``msg.metadata`` parses all of it,
    each time it is read; a reader of the log needs two fields.
    """
    tokens = reply.split(".")
    if len(tokens) == 9:
        seq, nanos = tokens[5], tokens[7]
    else:
        seq, nanos = tokens[7], tokens[9]
    return int(seq), stored_time(int(nanos))


def stored_time(nanos: int) -> datetime:
    """JetStream's storage time (ns since the epoch) as a UTC datetime, cut to microseconds.

    Epoch plus a timedelta: a third of the cost of fromtimestamp(…, UTC), which a whole-stream
    reader pays once per event.
    """
    return _EPOCH + timedelta(microseconds=nanos // 1000)


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _rfc3339(stamp: str) -> datetime:
    """JetStream's ``Nats-Time-Stamp`` (nanoseconds, ``Z``) as a datetime, cut to microseconds
    like :func:`ack_position`, so both read paths give the same time."""
    head, _, fraction = stamp.rstrip("Z").partition(".")
    micros = int((fraction + "000000")[:6]) if fraction else 0
    return datetime.fromisoformat(head).replace(tzinfo=UTC, microsecond=micros)


def _record(msg: Msg) -> Record:
    seq, stored_at = ack_position(msg.reply)
    return Record(seq=seq, subject=msg.subject, time=stored_at, event=ev.decode_lenient(msg.data))


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


def needs_payload(event: ev.Event) -> bool:
    """An event whose body lives in the Object Store (readers load it before handing it out)."""
    return not isinstance(event, ev.OpaqueEvent) and event.payload is not None and bool(event.payload.form)


def _type_matcher(types: Sequence[str] | None) -> Any:
    if not types:
        return None
    patterns = list(types)
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


class ObjectUpload:
    """One payload put into the payload bucket while its bytes arrive.

    nats-py's ``ObjectStore.put`` protocol (chunks on ``$O.<bucket>.C.<nuid>``, then the meta
    message on ``$O.<bucket>.M.<name>`` with a rollup), so any client reads the object; but the
    chunks go out as they fill, up to ``_PUT_WINDOW`` in flight, while the stream is still being
    read: a large stream is stored about when it ends. Until ``finish`` publishes the meta message
    the chunks are no object; a failed upload purges them (best effort) and leaves the caller to
    put the spooled file again.
    """

    def __init__(self, ledger: Ledger, name: str, *, existing: js_api.ObjectInfo | bool | None = False,
                 max_buffered: int = 8 * 1024 * 1024) -> None:
        self.ledger = ledger
        self.name = name
        self.bucket = ledger.settings.payload_bucket
        self.size = 0
        self.chunks = 0
        #: Why the upload stopped early ("" while it goes well).
        self.failed = ""
        self._nuid = ledger._nuid.next().decode()
        self._subject = f"$O.{self.bucket}.C.{self._nuid}"
        self._buffer = bytearray()
        self._max_buffered = max_buffered
        self._in_flight: deque[asyncio.Future[_PubAck]] = deque()
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
        store = await self.ledger.payload_store()
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
        ledger = self.ledger
        while True:
            await self._kick.wait()
            self._kick.clear()
            while len(self._buffer) >= _PUT_CHUNK or (self._closing and self._buffer):
                n = min(_PUT_CHUNK, len(self._buffer))
                data = bytes(self._buffer[:n])
                del self._buffer[:n]  # bytearray drops its front without moving the rest
                reply, future = ledger._expect_reply()
                await ledger.nc.publish(self._subject, data, reply=reply)
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

    async def _settle(self, future: asyncio.Future[_PubAck]) -> None:
        ack = await self.ledger._await_ack(future, f"a chunk of payload {self.name}")
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
        self.ledger._unpurged_chunks.add(self._subject)

        async def purge() -> None:
            for future in self._in_flight:
                future.cancel()
            with contextlib.suppress(Exception):
                await self.ledger.js.purge_stream(f"OBJ_{self.bucket}", subject=self._subject)

        task = asyncio.get_running_loop().create_task(purge())
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)

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
        ledger = self.ledger
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
                await ledger.js.publish(meta_subject, msgspec.json.encode(info.as_dict()), headers=headers)
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
                await ledger.js.publish(meta_subject, msgspec.json.encode(info.as_dict()),
                                        headers={js_api.Header.ROLLUP: "sub"})
        except BaseException as exc:
            self._stop(f"{type(exc).__name__}: {exc}")
            raise
        if isinstance(existing, js_api.ObjectInfo) and existing.nuid and not existing.deleted:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await ledger.js.purge_stream(f"OBJ_{self.bucket}", subject=f"$O.{self.bucket}.C.{existing.nuid}")
        return info


#: Fire-and-forget clean-ups kept referenced until they finish.
_BACKGROUND: set[asyncio.Task[None]] = set()


def credentials_refused(exc: nats.errors.Error) -> bool:
    """Whether NATS refused the connection's credentials (a permanent error: retrying cannot help)."""
    if isinstance(exc, nats.errors.AuthorizationError | nats.errors.InvalidUserCredentialsError):
        return True
    text = str(exc).lower()
    return any(refusal in text for refusal in _CREDENTIALS_REFUSED)


class Ledger:
    """An async context manager around one NATS connection and the ledger's stream."""

    def __init__(self, settings: Settings | None = None, *, name: str = "room-ledger") -> None:
        self.settings = settings or Settings.from_env()
        self.subjects = Subjects(self.settings.subject_prefix)
        self._name = name
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._inbox_prefix = ""
        self._inbox_sub: Subscription | None = None
        self._pending: dict[str, asyncio.Future[_PubAck]] = {}
        self._atomic = False
        self._atomic_max = ATOMIC_BATCH_SIZE
        self._stream_max_msg_size = self.settings.max_msg_size
        self.nats_url = ""
        # One batch at a time, so events keep their order across concurrent append_many calls.
        self._append_lock = asyncio.Lock()
        self._closing = False
        self._payload_store: ObjectStore | None = None
        #: Chunk subjects of failed uploads, purged again after the next put that succeeds.
        self._unpurged_chunks: set[str] = set()
        #: Unique names for payload chunks (nats-py's public NUID; one per ledger, so made after any fork).
        self._nuid = NUID()
        #: Awaited by close(), before the connection goes (e.g. hydration's database pool).
        self._close_hooks: list[Callable[[], Awaitable[None]]] = []

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Ledger:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self, *, ensure_stream: bool = True) -> None:
        urls = await self._resolve_urls()
        self.nats_url = ",".join(urls)
        options: dict[str, Any] = {
            "servers": list(urls),
            "name": self._name,
            "allow_reconnect": True,
            # Keep reconnecting for as long as the process lives: an outage must not end a bridge.
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "connect_timeout": 3,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "pending_size": 8 * 1024 * 1024,
        }
        s = self.settings
        if s.nats_creds:
            options["user_credentials"] = str(s.nats_creds)
        if s.nats_nkey_seed:
            options["nkeys_seed"] = str(s.nats_nkey_seed)
        if s.nats_user:
            options["user"] = s.nats_user
            options["password"] = s.nats_password or ""
        if s.nats_tls_ca or s.nats_tls_cert:
            context = ssl.create_default_context(cafile=str(s.nats_tls_ca) if s.nats_tls_ca else None)
            if s.nats_tls_cert:
                context.load_cert_chain(str(s.nats_tls_cert), str(s.nats_tls_key) if s.nats_tls_key else None)
            options["tls"] = context
        try:
            # The first connection must fail fast and clearly; only later drops reconnect forever.
            self._nc = await asyncio.wait_for(self._first_connect(options), timeout=10)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            raise LogUnavailable(self._unreachable_message(exc)) from exc
        # nats-py checks every header character one by one (46 a message here, half the cost of
        # a read); JetStream's own and our headers are well-formed ASCII, so parse them plainly.
        _wire.lazy_headers(self._nc)
        self._js = self._nc.jetstream(timeout=ACK_TIMEOUT_S)
        self._inbox_prefix = self._nc.new_inbox()
        self._inbox_sub = await self._nc.subscribe(f"{self._inbox_prefix}.*", cb=self._on_ack)
        if ensure_stream:
            await self.ensure_stream()

    async def _first_connect(self, options: dict[str, Any]) -> NatsClient:
        # nats-py retries an unreachable server forever (and prints each failure), so find out
        # first, with a plain TCP connect, whether any server answers at all.
        reachable: list[str] = []
        for url in options["servers"]:
            parsed = urlsplit(url if "://" in url else f"nats://{url}")
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(parsed.hostname or "127.0.0.1", parsed.port or 4222), timeout=3
                )
            except (OSError, TimeoutError) as exc:
                last_error: BaseException = exc
                continue
            writer.close()
            reachable.append(url)
        if not reachable:
            raise LogUnavailable(self._unreachable_message(last_error))
        nc = NatsClient()
        # The first connection does not retry: a refused login or a failed TLS handshake is an
        # answer, not an outage. Once connected, drops reconnect forever.
        where = ",".join(reachable)
        try:
            await nc.connect(**{**options, "servers": reachable, "allow_reconnect": False})
        except ssl.SSLError as exc:
            raise ConnectError(
                f"TLS with NATS at {where} failed ({exc}): check LEDGER_NATS_TLS_CA, LEDGER_NATS_TLS_CERT "
                "and LEDGER_NATS_TLS_KEY"
            ) from exc
        except nats.errors.Error as exc:
            if credentials_refused(exc):
                raise ConnectError(
                    f"NATS at {where} refused the credentials ({exc}): check LEDGER_NATS_USER and "
                    "LEDGER_NATS_PASSWORD, LEDGER_NATS_CREDS or LEDGER_NATS_NKEY_SEED"
                ) from exc
            raise
        nc.options["allow_reconnect"] = True
        return nc

    def _unreachable_message(self, exc: BaseException) -> str:
        where = self.nats_url or "(no URL)"
        detail = str(exc) or type(exc).__name__
        if self.settings.embedded_nats:
            return (
                f"cannot reach the embedded NATS at {where} ({detail}): remove the stale state under "
                f"{self.settings.home} or run `ledger up`"
            )
        return (
            f"cannot reach NATS at {where} ({detail}): start it, check LEDGER_NATS_URL, "
            "or unset LEDGER_NATS_URL to use the embedded server"
        )

    async def _resolve_urls(self) -> tuple[str, ...]:
        if self.settings.nats_urls:
            return self.settings.nats_urls

        info = await asyncio.to_thread(
            embedded.ensure_nats, self.settings.home, sync_always=self.settings.nats_sync_always
        )
        return (info.url,)

    async def close(self) -> None:
        self._closing = True
        hooks, self._close_hooks = self._close_hooks, []
        for hook in hooks:
            with contextlib.suppress(Exception):
                await hook()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectError("ledger closed before the append was acknowledged"))
        self._pending.clear()
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.drain()
            with contextlib.suppress(Exception):
                await self._nc.close()
        self._nc = None
        self._js = None

    def on_close(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Await ``hook()`` when this ledger closes (errors ignored): for resources kept per ledger."""
        self._close_hooks.append(hook)

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise LedgerError("the ledger is not connected: use `async with Ledger(...)` or await connect()")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise LedgerError("the ledger is not connected: use `async with Ledger(...)` or await connect()")
        return self._js

    @property
    def atomic_batch_size(self) -> int:
        """Events per atomic batch now: ATOMIC_BATCH_SIZE, or less after the server refused it."""
        return self._atomic_max

    async def _on_error(self, exc: Exception) -> None:
        if self._closing:
            return
        log.warning("NATS error: %s", exc)

    async def _on_disconnected(self) -> None:
        if self._closing:
            return
        log.warning("disconnected from NATS at %s; reconnecting", self.nats_url)

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS")

    # --- the stream --------------------------------------------------------------------------

    def desired_stream_config(self) -> js_api.StreamConfig:
        s = self.settings
        return js_api.StreamConfig(
            name=s.stream,
            description="room-ledger: every event of every LiveKit room",
            subjects=self.subjects.stream_subjects(),
            retention=js_api.RetentionPolicy.LIMITS,
            storage=js_api.StorageType.FILE,
            num_replicas=s.replicas,
            max_age=s.max_age_s or 0,
            max_msg_size=s.max_msg_size,
            duplicate_window=s.duplicate_window_s,
            discard=js_api.DiscardPolicy.OLD,
            allow_direct=True,
            allow_atomic=True,
            deny_delete=False,
            deny_purge=False,
        )

    async def ensure_stream(self) -> js_api.StreamInfo:
        """Create the stream, or bring an existing one to the configured settings."""
        desired = self.desired_stream_config()
        jsm = self.js
        try:
            info = await jsm.stream_info(desired.name or "")
        except nats.js.errors.NotFoundError:
            info = None
        try:
            if info is None:
                info = await jsm.add_stream(desired)
            else:
                current = info.config
                changes = self.stream_differences(current)
                if "subjects" in changes:
                    # Re-pointing an existing stream at other subjects would cut off every writer
                    # still using the old ones: a different prefix is a mistake, not an update.
                    now, wanted = changes["subjects"]
                    raise StreamConfigError(
                        f"stream {desired.name!r} holds subjects {now}, but the configured prefix gives {wanted}: "
                        f"set LEDGER_SUBJECT_PREFIX to match the stream, or LEDGER_STREAM to a stream of its own"
                    )
                if changes:
                    if "num_replicas" in changes and (current.num_replicas or 1) != desired.num_replicas:
                        log.info(
                            "changing stream replicas from %s to %s",
                            current.num_replicas,
                            desired.num_replicas,
                        )
                    info = await jsm.update_stream(desired)
        except nats.js.errors.APIError as exc:
            raise StreamConfigError(
                f"cannot create or update stream {desired.name!r} with subjects {desired.subjects}: "
                f"{exc.description} (err_code {exc.err_code}); if another stream already holds these "
                "subjects, set LEDGER_STREAM / LEDGER_SUBJECT_PREFIX to ones of your own"
            ) from exc
        self._atomic = bool(info.config.allow_atomic)
        self._stream_max_msg_size = int(info.config.max_msg_size or self.settings.max_msg_size)
        if self._stream_max_msg_size <= 0:
            self._stream_max_msg_size = self.settings.max_msg_size
        return info

    def stream_differences(self, current: js_api.StreamConfig) -> dict[str, tuple[Any, Any]]:
        """Settings of an existing stream that differ from the configured ones: name -> (now, wanted)."""
        desired = self.desired_stream_config()
        differences: dict[str, tuple[Any, Any]] = {}
        for field in (
            "subjects",
            "num_replicas",
            "max_age",
            "max_msg_size",
            "duplicate_window",
            "allow_direct",
            "allow_atomic",
        ):
            now = getattr(current, field)
            wanted = getattr(desired, field)
            if field == "max_age":
                now, wanted = now or 0, wanted or 0
            if field in ("max_age", "duplicate_window"):
                if abs(float(now or 0) - float(wanted or 0)) > 0.001:
                    differences[field] = (now, wanted)
            elif field == "num_replicas":
                if (now or 1) != (wanted or 1):
                    differences[field] = (now, wanted)
            elif bool(now) != bool(wanted) if isinstance(wanted, bool) else now != wanted:
                differences[field] = (now, wanted)
        return differences

    async def stream_info(self) -> js_api.StreamInfo:
        return await self.js.stream_info(self.settings.stream)

    async def head(self) -> int:
        """The sequence of the last event stored in the log (0 when there is none).

        Not the stream's ``last_seq``: after ``ledger purge`` of the newest room that number
        names a message that no longer exists, and a reader waiting for it would wait forever.
        """
        return await self._last_seq(self.subjects.all_rooms())

    # --- append ------------------------------------------------------------------------------

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
        if len(data) + subject_len + _HEADER_ALLOWANCE > self._stream_max_msg_size:
            raise EventTooLarge(
                event.id, len(data) + subject_len + _HEADER_ALLOWANCE, self._stream_max_msg_size
            )
        return data

    async def _on_ack(self, msg: Msg) -> None:
        token = msg.subject[len(self._inbox_prefix) + 1 :]
        future = self._pending.pop(token, None)
        if future is None or future.done():
            return
        status = msg.headers.get("Status") if msg.headers else None
        if status:
            # "503" means no stream answered (no JetStream, or a cluster between leaders): the
            # append did not happen and must be retried, never counted as stored.
            description = msg.headers.get("Description", "") if msg.headers else ""
            reason = "no responders: the stream is unavailable" if status == "503" else description
            future.set_result(
                _PubAck(
                    error=_ApiError(
                        code=int(status) if status.isdigit() else 0, description=f"{status} {reason}".strip()
                    )
                )
            )
            return
        if not msg.data:
            # An empty reply without a status acknowledges the start of an atomic batch.
            future.set_result(_PubAck())
            return
        try:
            future.set_result(_ack_decoder.decode(msg.data))
        except msgspec.DecodeError as exc:
            future.set_exception(AppendError(f"unreadable acknowledgement from the server: {exc}"))

    def _expect_reply(self) -> tuple[str, asyncio.Future[_PubAck]]:
        token = uuid.uuid4().hex
        future: asyncio.Future[_PubAck] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
        return f"{self._inbox_prefix}.{token}", future

    async def _await_ack(self, future: asyncio.Future[_PubAck], what: str) -> _PubAck:
        try:
            return await asyncio.wait_for(future, ACK_TIMEOUT_S)
        except TimeoutError as exc:
            raise AppendError(
                f"no acknowledgement for {what} within {ACK_TIMEOUT_S:.0f}s from NATS at {self.nats_url}: "
                "is JetStream enabled and the stream reachable? The append is safe to retry (same event id)"
            ) from exc

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
        reply, future = self._expect_reply()
        await self.nc.publish(self.subjects.event(event.room, event.type), data, reply=reply, headers=headers)
        ack = await self._await_ack(future, f"event {event.id}")
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
        use_atomic = self._atomic if atomic is None else (atomic and self._atomic)
        size = self._atomic_max
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
                        unsent.forget(self._pending)
        return positions

    def _frame_atomic(self, chunk: list[ev.KnownEvent], payloads: list[bytes]) -> _FramedBatch:
        """One atomic batch framed as HPUB commands (nats-py's publish() spends ~30 µs a
        message on headers, half the time of a batch), with its two acknowledgements awaited."""
        batch_id = uuid.uuid4().hex.encode()
        last = len(chunk) - 1
        first_reply, first_future = self._expect_reply()
        # A batch of one (the tail of 1,001 or 2,001 … events) is its own first and commit message:
        # one reply comes, so both waits are on it (waiting for a second stalled the writer).
        commit_reply, commit_future = self._expect_reply() if last > 0 else (first_reply, first_future)
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
        first = await self._await_ack(batch.first_future, f"atomic batch {batch.batch_id}")
        commit = await self._await_ack(batch.commit_future, f"atomic batch {batch.batch_id}")
        error = first.error or commit.error
        if error is not None:
            if error.err_code == ERR_BATCH_DUPLICATE:
                return None
            if error.err_code in (ERR_BATCH_TOO_LARGE, ERR_BATCH_INCOMPLETE) and size > 1:
                # Nothing of the batch was stored: send it again event by event, and smaller
                # batches from now on.
                self._atomic_max = max(1, min(self._atomic_max, size) // 2)
                log.info("the server refused an atomic batch of %d (%s); batches of %d from now on",
                         size, error.description, self._atomic_max)
                return None
            if error.err_code == ERR_ATOMIC_DISABLED:
                self._atomic = False
                return None
            raise AppendError(
                f"stream refused a batch of {size} events: {error.description} (err_code {error.err_code})",
                err_code=error.err_code,
            )
        first_seq = commit.seq - size + 1
        return [Position(first_seq + i) for i in range(size)]

    async def _send_frames(self, frames: list[bytes]) -> None:
        nc = self.nc
        if nc.is_closed:
            raise ConnectError(f"the connection to NATS at {self.nats_url} is closed")
        await _wire.send_raw(nc, b"".join(frames))

    async def _append_pipelined(self, chunk: list[ev.KnownEvent], payloads: list[bytes]) -> list[Position]:
        futures: list[asyncio.Future[_PubAck]] = []
        frames: list[bytes] = []
        for event, payload in zip(chunk, payloads, strict=True):
            reply, future = self._expect_reply()
            futures.append(future)
            header = b"NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n" % event.id.encode()
            subject = self.subjects.event(event.room, event.type).encode()
            frames.append(
                b"HPUB %s %s %d %d\r\n%s%s\r\n"
                % (subject, reply.encode(), len(header), len(header) + len(payload), header, payload)
            )
        await self._send_frames(frames)
        _, pending = await asyncio.wait(futures, timeout=ACK_TIMEOUT_S)
        if pending:
            for future in pending:
                future.cancel()
            raise AppendError(
                f"{len(pending)} of {len(chunk)} appends not acknowledged within {ACK_TIMEOUT_S:.0f}s by NATS at "
                f"{self.nats_url}; they are safe to retry (same event ids)"
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
            msg = await self.js.get_last_msg(self.settings.stream, subject_filter, direct=True)
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
        if name is None or self._nc is None or self._nc.is_closed:
            return
        with contextlib.suppress(Exception):  # best effort: the server expires it anyway
            await asyncio.wait_for(self.js.delete_consumer(self.settings.stream, name), READER_DELETE_TIMEOUT_S)

    async def _subscribe_with_retries(
        self, subject: str, config: js_api.ConsumerConfig, on_message: Callable[[Msg], Awaitable[None]]
    ) -> Subscription:
        # Creating a consumer goes through the cluster's meta leader; just after a node fails
        # that can take a few seconds to answer, which is an outage to wait out, not an error.
        deadline = time.monotonic() + READER_CREATE_TIMEOUT_S
        delay = 0.2
        while True:
            try:
                return await self.js.subscribe(
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
                        f"JetStream at {self.nats_url} did not create a reader for {subject} "
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
        event that does not decode comes back as an :class:`~ledger.events.OpaqueEvent` with
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
                        yield await self.resolve(record) if needs_payload(record.event) else record
                    if stop and record.seq >= stop:
                        return

    async def _nothing_since(self, subject: str, since_time: datetime) -> bool:
        """True when no message on ``subject`` was stored at or after ``since_time``."""
        request = msgspec.json.encode({"start_time": since_time, "next_by_subj": subject})
        try:
            reply = await self.nc.request(
                f"$JS.API.DIRECT.GET.{self.settings.stream}", request, timeout=ACK_TIMEOUT_S
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
            inbox = self.nc.new_inbox()
            sub = await self.nc.subscribe(inbox)
            try:
                request = msgspec.json.encode({"seq": next_seq, "next_by_subj": subject, "batch": batch})
                await self.nc.publish(f"$JS.API.DIRECT.GET.{self.settings.stream}", request, reply=inbox)
                pending = 0
                while True:
                    try:
                        msg = await sub.next_msg(timeout=ACK_TIMEOUT_S)
                    except nats.errors.TimeoutError as exc:
                        raise LogUnavailable(
                            f"no answer from JetStream at {self.nats_url} reading room {room!r}: "
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
                            time=_rfc3339(headers["Nats-Time-Stamp"]),
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
                return [await self.resolve(r) if needs_payload(r.event) else r for r in records]

    async def follow(
        self, room: str, *, after: int = 0, types: Sequence[str] | None = None
    ) -> AsyncGenerator[Record, None]:
        """History after ``after``, then live events: no gap, no duplicate, across reconnects."""
        async with contextlib.aclosing(self.read(room, after=after, types=types, follow=True)) as records:
            async for record in records:
                yield record

    def watch(self, room: str, *, after: int = 0) -> RoomWatch:
        """Follow the room in the background and wait on conditions over its log: see :mod:`ledger.watch`.

        ``async with ledger.watch(room) as log: await log.until(lambda rs: ..., what="the join")``
        """
        return RoomWatch(self, room, after=after)

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
                    yield await self.resolve(record) if needs_payload(record.event) else record
                    if last and record.seq >= last:
                        return

    # --- payloads in the Object Store ----------------------------------------------------------

    def desired_payload_config(self) -> js_api.ObjectStoreConfig:
        """The payload bucket: beside the stream, with its replicas and retention."""
        s = self.settings
        return js_api.ObjectStoreConfig(
            bucket=s.payload_bucket,
            description=f"room-ledger: payloads of {s.stream} events above the inline limit",
            ttl=s.max_age_s or None,
            storage=js_api.StorageType.FILE,
            replicas=s.replicas,
        )

    async def payload_store(self, *, create: bool = True) -> ObjectStore:
        """The payload bucket (created on first use, brought to the stream's replicas and max age)."""
        if self._payload_store is not None:
            return self._payload_store
        config = self.desired_payload_config()
        bucket = config.bucket or ""
        stream = f"OBJ_{bucket}"
        try:
            info = await self.js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            if not create:
                raise
            try:
                store = await self.js.create_object_store(bucket, config)
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
                await self.js.update_stream(current)
            store = ObjectStore(name=bucket, stream=stream, js=self.js)
        self._payload_store = store
        return store

    async def payload_info(self, ref: ev.PayloadRef) -> js_api.ObjectInfo | None:
        """The stored object of ``ref`` when it is there whole (same size and digest), else None."""
        store = await self.payload_store()
        try:
            info = await store.get_info(ref.name)
        except nats.js.errors.ObjectNotFoundError:
            return None
        if info.size != ref.size or _object_sha256(info) != ref.sha256:
            return None
        return info

    async def put_payload(self, ref: ev.PayloadRef, source: Path | bytes) -> None:
        """Store a payload under its reference's name, once: an object already there with the same
        digest (a retry, a second bridge) is kept. Chunks of a put that failed midway are purged
        by nats-py and, without their meta message, never visible as an object."""
        store = await self.payload_store()
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
        for subject in list(self._unpurged_chunks):
            try:
                await self.js.purge_stream(f"OBJ_{self.settings.payload_bucket}", subject=subject)
            except (nats.errors.Error, nats.js.errors.Error):
                return
            self._unpurged_chunks.discard(subject)

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

    async def read_payload(self, ref: ev.PayloadRef, into: IO[bytes] | None = None) -> bytes:
        """The payload's bytes (checked against the reference's digest), or written ``into`` a file."""
        store = await self.payload_store(create=False)
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
            data = await self.read_payload(event.payload)
        except (LedgerError, nats.errors.Error, nats.js.errors.Error) as exc:
            resolved: ev.Event = ev.unresolved(event, f"payload not loaded: {exc}")
        else:
            resolved = ev.with_payload(event, data)
        return Record(seq=record.seq, subject=record.subject, time=record.time, event=resolved)

    async def purge_room_payloads(self, room: str) -> int:
        """Delete every payload object of a room; returns how many went."""
        prefix = ev.payload_object_name(room, "")
        try:
            store = await self.payload_store(create=False)
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

    async def payload_bucket_status(self) -> dict[str, Any] | None:
        """The bucket as ``ledger doctor`` shows it; None when none was created yet."""
        try:
            info = await self.js.stream_info(f"OBJ_{self.settings.payload_bucket}")
        except nats.js.errors.NotFoundError:
            return None
        return {
            "bucket": self.settings.payload_bucket,
            "bytes": int(info.state.bytes or 0),
            "messages": int(info.state.messages or 0),
            "replicas": int(info.config.num_replicas or 1),
            "max_age_s": float(info.config.max_age or 0) or None,
        }

    # --- hydration (room_ledger/hydrate.py) ------------------------------------------------------

    async def hydrate(
        self, room: str, *, min_seq: int | None = None, full_conversation: bool = False, timeout: float = 5.0
    ) -> Snapshot:
        """The room's state current to the log head: see :func:`ledger.hydrate.hydrate`."""
        # Hydration brings the fold and prometheus_client along: loaded on first use, so that
        # `import room_ledger.client` stays light for the CLI's first line.

        return await hydrate(
            self, room, min_seq=min_seq, full_conversation=full_conversation, timeout=timeout
        )

    # --- rooms -------------------------------------------------------------------------------

    async def room_summaries(self) -> list[RoomSummary]:
        """Every room in the log with its event count."""

        info = await self.js.stream_info(self.settings.stream, subjects_filter=self.subjects.all_rooms())
        counts: dict[str, int] = {}
        prefix_len = len(self.settings.subject_prefix) + 1
        for subject, count in (info.state.subjects or {}).items():
            token = subject[prefix_len:].split(".", 1)[0]
            room = room_from_token(token)
            counts[room] = counts.get(room, 0) + int(count)
        return [RoomSummary(room, n) for room, n in sorted(counts.items())]

    async def rooms(self) -> list[str]:
        return [summary.room for summary in await self.room_summaries()]

    async def require_room(self, room: str) -> None:
        """Raise :class:`UnknownRoom` (with close names) when the room has no events."""
        if await self.room_last_seq(room):
            return
        names = await self.rooms()
        raise UnknownRoom(room, difflib.get_close_matches(room, names, n=3, cutoff=0.5))

    async def purge_room(self, room: str) -> int:
        """Remove every message of a room from the stream; returns how many went."""
        token = room_token(room)
        del token  # validated: purge only ever targets an encoded room subject
        request = msgspec.json.encode({"filter": self.subjects.room(room)})
        msg = await self.nc.request(
            f"$JS.API.STREAM.PURGE.{self.settings.stream}", request, timeout=ACK_TIMEOUT_S
        )
        reply = msgspec.json.decode(msg.data)
        if "error" in reply:
            raise AppendError(f"purge of room {room!r} failed: {reply['error'].get('description')}")
        return int(reply.get("purged", 0))
