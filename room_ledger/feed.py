"""A fast, bounded, in-order feed of the whole stream: what the projector reads the log with.

Why not nats-py's ordered consumer: it is correct, but every delivery goes through nats-py's
general message path (headers parsed, a ``Msg`` built, the JetStream metadata tokenised, an
``asyncio.Queue`` put and get, a task switch), which was ~40% of the projector's time and kept it
under its 25k events/s target on the 2-core reference machine. A whole-stream reader needs three
things of a delivery: its stream sequence and time (both in the reply subject), its subject and
its payload.

What this does instead: an ephemeral pull consumer without acks, driven by hand. Pull requests
(``$JS.API.CONSUMER.MSG.NEXT``) ask for chunks of messages to a plain subscription, and the feed
keeps at most ``window`` messages requested or buffered, so memory is bounded and the server
never waits on the client for anything but the next request. Deliveries to that subscription
are taken straight from nats-py's protocol parser (``Client._process_msg``, wrapped on this one
connection by :func:`room_ledger._wire.fast_path`; nats-py is pinned below 3 for it) into a :class:`Delivery`; status messages
(heartbeats, expired requests) still go the normal way. What the ordered consumer did for
correctness is done here too:

- every delivery carries its consumer sequence; a jump means a delivery was lost, and the feed
  starts a new consumer after the last message it holds;
- a message at or below the last stream sequence held is dropped;
- a waiting request gets idle heartbeats; no message and no heartbeat for three intervals (a
  restarted server forgot the in-memory consumer), or an error status (consumer deleted,
  leader changed), also starts a new consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from datetime import datetime
from typing import TYPE_CHECKING, Final

from nats.js import api as js_api

from room_ledger import _wire
from room_ledger.records import stored_time

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

    from room_ledger.client import Ledger

log = logging.getLogger("ledger.feed")

#: Messages requested or buffered, at most, per feed.
DEFAULT_WINDOW: Final = 20_000
HEARTBEAT_S: Final = 2.0
#: A waiting pull request ends after this long (status 408) and the feed sends another.
REQUEST_EXPIRES_S: Final = 30.0


class Delivery:
    """One stored message: stream sequence, storage time (ns), subject and payload."""

    __slots__ = ("data", "seq", "subject", "time_ns")

    def __init__(self, seq: int, time_ns: int, subject: str, data: bytes) -> None:
        self.seq = seq
        self.time_ns = time_ns
        self.subject = subject
        self.data = data

    @property
    def time(self) -> datetime:
        """Storage time, to the microsecond (as every other read path gives it)."""
        return stored_time(self.time_ns)


class StreamFeed:
    """Messages of ``subject_filter`` with stream sequence above ``after``, in order, each once.

    ``await feed.take(max_msgs, wait)`` returns up to ``max_msgs`` deliveries (waiting up to
    ``wait`` seconds for the first), and an empty list when none arrived in time.
    """

    def __init__(self, ledger: Ledger, subject_filter: str, *, after: int = 0,
                 window: int = DEFAULT_WINDOW, heartbeat: float = HEARTBEAT_S) -> None:
        self._ledger = ledger
        self._connection = ledger.connection
        self._filter = subject_filter
        self._window = window
        self._chunk = max(1, window // 4)
        self._heartbeat = heartbeat
        #: Stream sequence of the newest message held (handed out or buffered).
        self.last_seq = after
        self._buffer: deque[Delivery] = deque()
        self._arrived = asyncio.Event()
        self._sub: Subscription | None = None
        self._inbox = ""
        self._consumer: str | None = None
        self._next_subject = ""
        self._request = b""
        #: Messages asked for and neither delivered nor given up by an expired request.
        self._requested = 0
        self._next_delivery = 1
        self._heard_at = time.monotonic()
        self._broken: str | None = None
        self.restarts = 0

    async def __aenter__(self) -> StreamFeed:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        nc, js = self._connection.nc, self._connection.js
        stream = self._ledger.settings.stream
        self._next_delivery = 1
        self._requested = 0
        self._broken = None
        config = js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.last_seq + 1,
            filter_subject=self._filter,
            ack_policy=js_api.AckPolicy.NONE,
            inactive_threshold=max(30.0, self._heartbeat * 10),
            mem_storage=True,
        )
        info = await js.add_consumer(stream, config)
        self._consumer = info.name
        self._inbox = nc.new_inbox()
        generation = self.restarts

        async def on_status(msg: Msg) -> None:
            if generation == self.restarts:
                await self._on_status(msg)

        def on_delivery(subject: bytes, reply: bytes, data: bytes) -> None:
            if generation == self.restarts:
                self._on_delivery(subject, reply, data)

        self._sub = await nc.subscribe(self._inbox, cb=on_status)
        _wire.fast_path(nc)[_wire.subscription_id(self._sub)] = on_delivery
        # The ledger's JetStream context uses the default API prefix.
        self._next_subject = f"{js_api.DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{info.name}"
        self._request = b'{"batch":%d,"expires":%d,"idle_heartbeat":%d}' % (
            self._chunk, int(REQUEST_EXPIRES_S * 1e9), int(self._heartbeat * 1e9)
        )
        self._heard_at = time.monotonic()
        await self._top_up()

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        sub, self._sub = self._sub, None
        if sub is not None:
            _wire.fast_path(self._connection.nc).pop(_wire.subscription_id(sub), None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sub.unsubscribe(), 2.0)
        if consumer is not None:
            # It would go by itself after its inactive threshold; deleting it now ends its
            # waiting requests and saves the server the wait.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._connection.js.delete_consumer(self._ledger.settings.stream, consumer), 2.0)

    async def _restart(self) -> None:
        self.restarts += 1
        log.info("feed of %s restarts after sequence %d: %s", self._filter, self.last_seq, self._broken)
        await self.close()
        await self.start()

    async def _top_up(self) -> None:
        """Ask for more while the messages requested and buffered leave room in the window."""
        if self._sub is None or self._broken is not None:
            return
        while self._requested + len(self._buffer) + self._chunk <= self._window:
            self._requested += self._chunk
            # Silence is measured from the last request: a full window asks for nothing.
            self._heard_at = time.monotonic()
            await self._connection.nc.publish(self._next_subject, self._request, reply=self._inbox)

    def _on_delivery(self, subject: bytes, reply: bytes, data: bytes) -> None:
        self._heard_at = time.monotonic()
        self._requested -= 1
        if self._broken is not None:
            return
        tokens = reply.split(b".")
        # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ns>.<pending>, or with domain
        # and account hash before the stream (12 tokens).
        at = 5 if len(tokens) == 9 else 7
        dseq = int(tokens[at + 1])
        if dseq != self._next_delivery:
            self._broken = f"delivery {self._next_delivery} of the consumer never arrived (got {dseq})"
            self._arrived.set()
            return
        self._next_delivery = dseq + 1
        seq = int(tokens[at])
        if seq > self.last_seq:
            self.last_seq = seq
            self._buffer.append(Delivery(seq, int(tokens[at + 2]), subject.decode(), data))
            self._arrived.set()

    async def _on_status(self, msg: Msg) -> None:
        if msg.reply and msg.reply.startswith("$JS.ACK."):
            # A delivery that came the general way (a nats-py whose parser no longer calls
            # _process_msg): slower, still correct.
            self._on_delivery(msg.subject.encode(), msg.reply.encode(), msg.data)
            return
        self._heard_at = time.monotonic()
        headers = msg.headers or {}
        status = headers.get("Status")
        if status == "100" or self._broken is not None:
            return  # an idle heartbeat of a waiting request: the consumer is alive
        if status == "408":
            # A request expired; what it did not deliver is no longer coming.
            undelivered = headers.get("Nats-Pending-Messages")
            self._requested = max(self._requested - (int(undelivered) if undelivered else self._chunk), 0)
            await self._top_up()
            return
        self._broken = f"status {status} {headers.get('Description', '')}".strip()
        self._arrived.set()

    async def take(self, max_msgs: int, wait: float) -> list[Delivery]:
        """Up to ``max_msgs`` deliveries in stream order; waits up to ``wait`` s for the first."""
        if self._sub is None:
            await self.start()
        deadline = time.monotonic() + wait
        while not self._buffer:
            if self._broken is None and time.monotonic() - self._heard_at > 3 * self._heartbeat:
                self._broken = f"no delivery or heartbeat for {3 * self._heartbeat:.0f}s"
            if self._broken is not None:
                await self._restart()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(remaining, self._heartbeat))
        buffer = self._buffer
        chunk = [buffer.popleft() for _ in range(min(max_msgs, len(buffer)))]
        if self._broken is not None and not buffer:
            await self._restart()
        else:
            await self._top_up()
        return chunk
