"""One NATS connection shared by the ledger's pieces (the log, stream admin, payloads, rooms).

It connects (failing fast and clearly the first time, reconnecting forever after), and holds the
one reply inbox every append and payload chunk is acknowledged on: replies are parsed with
msgspec and matched to their futures by token, so thousands of appends can be in flight at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.nuid import NUID

from room_ledger import _wire, embedded
from room_ledger.errors import AppendError, ConnectError, LedgerError, LogUnavailable
from room_ledger.settings import Settings

log = logging.getLogger("ledger.client")

#: How long an append waits for its acknowledgement before giving up.
ACK_TIMEOUT_S: Final = 10.0
#: JetStream's "wrong last sequence" error code, and the header that asks for a last sequence.
ERR_WRONG_LAST_SEQUENCE: Final = 10071
EXPECTED_LAST_SUBJECT_SEQ: Final = "Nats-Expected-Last-Subject-Sequence"
class ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    batch: str | None = None
    count: int = 0
    error: ApiError | None = None


_ack_decoder: Final = msgspec.json.Decoder(PubAck)


class Connection:
    """The NATS connection, its JetStream context and the shared reply inbox."""

    def __init__(self, settings: Settings, *, name: str = "room-ledger") -> None:
        self.settings = settings
        self._name = name
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._inbox_prefix = ""
        self._inbox_sub: Subscription | None = None
        self._pending: dict[str, asyncio.Future[PubAck]] = {}
        self._closing = False
        #: Every server URL of the connection, comma-separated ("" before connecting).
        self.url = ""
        #: Unique names for payload chunks (nats-py's public NUID; one per connection, so made after any fork).
        self.nuid = NUID()
        #: Awaited by close(), before the connection goes (e.g. hydration's database pool).
        self._close_hooks: list[Callable[[], Awaitable[None]]] = []
        #: Fire-and-forget clean-ups kept referenced until they finish.
        self._background: set[asyncio.Task[None]] = set()

    @property
    def ack_timeout_s(self) -> float:
        # Read from the module on each use, so a test can shorten it for a whole run.
        return ACK_TIMEOUT_S

    async def connect(self) -> None:
        urls = await self._resolve_urls()
        self.url = ",".join(urls)
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
            if _wire.credentials_refused(exc):
                raise ConnectError(
                    f"NATS at {where} refused the credentials ({exc}): check LEDGER_NATS_USER and "
                    "LEDGER_NATS_PASSWORD, LEDGER_NATS_CREDS or LEDGER_NATS_NKEY_SEED"
                ) from exc
            raise
        nc.options["allow_reconnect"] = True
        return nc

    def _unreachable_message(self, exc: BaseException) -> str:
        where = self.url or "(no URL)"
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
        """Await ``hook()`` when this connection closes (errors ignored): for resources kept per ledger."""
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
    def is_open(self) -> bool:
        return self._nc is not None and not self._nc.is_closed

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a best-effort clean-up without waiting for it (kept referenced until it ends)."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _on_error(self, exc: Exception) -> None:
        if self._closing:
            return
        log.warning("NATS error: %s", exc)

    async def _on_disconnected(self) -> None:
        if self._closing:
            return
        log.warning("disconnected from NATS at %s; reconnecting", self.url)

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS")

    # --- the shared reply inbox --------------------------------------------------------------

    def expect_reply(self) -> tuple[str, asyncio.Future[PubAck]]:
        """A reply subject on the shared inbox and the future its acknowledgement resolves."""
        token = uuid.uuid4().hex
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
        return f"{self._inbox_prefix}.{token}", future

    def forget_reply(self, reply: str) -> None:
        """Unregister a reply whose message will not be sent."""
        self._pending.pop(reply.rsplit(".", 1)[-1], None)

    async def await_ack(self, future: asyncio.Future[PubAck], what: str) -> PubAck:
        try:
            return await asyncio.wait_for(future, self.ack_timeout_s)
        except TimeoutError as exc:
            raise AppendError(
                f"no acknowledgement for {what} within {self.ack_timeout_s:.0f}s from NATS at {self.url}: "
                "is JetStream enabled and the stream reachable? The append is safe to retry (same event id)"
            ) from exc

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
                PubAck(
                    error=ApiError(
                        code=int(status) if status.isdigit() else 0, description=f"{status} {reason}".strip()
                    )
                )
            )
            return
        if not msg.data:
            # An empty reply without a status acknowledges the start of an atomic batch.
            future.set_result(PubAck())
            return
        try:
            future.set_result(_ack_decoder.decode(msg.data))
        except msgspec.DecodeError as exc:
            future.set_exception(AppendError(f"unreadable acknowledgement from the server: {exc}"))
