"""Every use of nats-py beyond its public API, in one module (nats-py is pinned below 3).

The ledger leaves nats-py's public API in three places, each for speed, each measured:

- **raw frames** (:func:`send_raw`: ``Client._send_command`` + ``Client._flush_pending``): an
  append of many events is framed here as ``HPUB`` commands and written at once. nats-py's
  ``publish()`` spends ~30 µs a message on its header checks, half the time of a batch;
- **lazy headers** (:func:`lazy_headers`: ``Client._parse_header_lines`` replaced on one
  connection): nats-py parses and checks every header character of every message (46 a message
  here, half the cost of a read), though readers of the log need none of a data message's;
- **the feed's fast path** (:func:`fast_path`: ``Client._process_msg`` wrapped on one
  connection, subscriptions known by ``Subscription._id``): the projector's deliveries go
  straight from the protocol parser to the feed, skipping a ``Msg``, an ``asyncio.Queue`` and a
  task switch each (~40% of the projector's time).

One more, for tidiness rather than speed: :func:`consumer_name` reads the name of an ordered
consumer's current server-side consumer (``PushSubscription._consumer``; nats-py renames it each
time it recreates the consumer), so a finished read deletes it instead of leaving it to expire.
And for ``ledger doctor``: :func:`server_info`, the server's INFO (``Client._server_info``; the
public API has its version only). And one reading of the server's words: :func:`credentials_refused`
matches the NATS protocol's ``-ERR`` texts for refused credentials, which carry no code.

tests/test_wire.py checks each of these internals (its name, signature and effect), so a nats-py
upgrade that changes one fails there, and only there.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.subscription import Subscription

__all__ = ["FastHandler", "LazyHeaders", "consumer_name", "fast_path", "lazy_headers", "send_raw", "subscription_id"]


# --- raw frames -------------------------------------------------------------------------------


async def send_raw(nc: NatsClient, data: bytes) -> None:
    """Write already framed protocol commands (``HPUB …``) and flush them."""
    await nc._send_command(data)
    await nc._flush_pending()


# --- lazy headers -----------------------------------------------------------------------------


class LazyHeaders(dict[str, str]):
    """Message headers parsed on first use.

    nats-py parses every header of every message as it arrives (and checks each character);
    readers of the log need none of a data message's headers, while control messages and
    direct-get replies need theirs. Deferring the parse serves both at no cost to the first.
    """

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        # No dict.__init__: the dict is already empty, and the call is a measurable share of
        # reading the log.
        self._raw: bytes | None = raw

    def _parse(self) -> None:
        raw, self._raw = self._raw, None
        if raw is None:
            return
        for line in raw.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if sep:
                dict.__setitem__(
                    self, name.strip().decode("ascii", "replace"), value.strip().decode("utf-8", "replace")
                )

    def __getitem__(self, key: str) -> str:
        self._parse()
        return dict.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        self._parse()
        return dict.get(self, key, default)

    def __contains__(self, key: object) -> bool:
        self._parse()
        return dict.__contains__(self, key)

    def __iter__(self) -> Iterator[str]:
        self._parse()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self._parse()
        return dict.__len__(self)

    def __bool__(self) -> bool:
        # nats-py tests every message's headers for truth: answer without parsing them.
        if self._raw is not None:
            return b":" in self._raw
        return dict.__len__(self) > 0

    def keys(self) -> Any:
        self._parse()
        return dict.keys(self)

    def values(self) -> Any:
        self._parse()
        return dict.values(self)

    def items(self) -> Any:
        self._parse()
        return dict.items(self)

    def copy(self) -> dict[str, str]:
        self._parse()
        return dict(dict.items(self))

    def __eq__(self, other: object) -> bool:
        self._parse()
        return dict.__eq__(self, other)

    __hash__ = None

    def __repr__(self) -> str:
        self._parse()
        return dict.__repr__(self)


def _parse_header_lines(raw: bytes) -> dict[str, str]:
    return LazyHeaders(raw)


def lazy_headers(nc: NatsClient) -> None:
    """Parse this connection's message headers on first use (plainly: JetStream's and ours are
    well-formed ASCII)."""
    nc._parse_header_lines = _parse_header_lines  # type: ignore[method-assign]


# --- the feed's fast path -------------------------------------------------------------------

#: A delivery handed over as it comes off the wire: (subject, reply, payload).
FastHandler = Callable[[bytes, bytes, bytes], None]
_fast_paths: weakref.WeakKeyDictionary[NatsClient, dict[int, FastHandler]] = weakref.WeakKeyDictionary()


def fast_path(nc: NatsClient) -> dict[int, FastHandler]:
    """Subscription id -> handler of its JetStream deliveries, on this connection (installed on
    first use). Other messages of those subscriptions (status, heartbeats) go the normal way."""
    handlers = _fast_paths.get(nc)
    if handlers is None:
        handlers = _fast_paths[nc] = {}
        general: Callable[..., Awaitable[None]] = nc._process_msg

        async def process_msg(sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
            handler = handlers.get(sid)
            if handler is not None and reply[:8] == b"$JS.ACK.":
                handler(subject, reply, data)
                return
            await general(sid, subject, reply, data, headers)

        nc._process_msg = process_msg  # type: ignore[method-assign]
    return handlers


def subscription_id(sub: Subscription) -> int:
    """The id nats-py gives a subscription on the wire (what ``fast_path`` is keyed by)."""
    sid: int = sub._id
    return sid


def consumer_name(sub: Any) -> str | None:
    """The server-side name of a JetStream push subscription's consumer (None if not known yet)."""
    name = getattr(sub, "_consumer", None)
    return name if isinstance(name, str) and name else None


def server_info(nc: NatsClient) -> dict[str, Any]:
    """The INFO the connected server sent (version, server_name, cluster, jetstream, ...)."""
    info = getattr(nc, "_server_info", None)
    return dict(info) if isinstance(info, dict) else {}


#: The NATS protocol's -ERR texts for refused credentials. Core NATS errors carry no code, and at
#: connect nats-py raises the server's line as a plain ``nats.errors.Error``.
_CREDENTIALS_REFUSED: Final = ("authorization violation", "authentication timeout", "authentication expired",
                               "user authentication revoked")


def credentials_refused(exc: nats.errors.Error) -> bool:
    """Whether NATS refused the connection's credentials (a permanent error: retrying cannot help)."""
    if isinstance(exc, nats.errors.AuthorizationError | nats.errors.InvalidUserCredentialsError):
        return True
    text = str(exc).lower()
    return any(refusal in text for refusal in _CREDENTIALS_REFUSED)
