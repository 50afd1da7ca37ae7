"""Hydration: a room's state current to the log head, for agents that join late or take over.

::

    snapshot = await hydrate(ledger, "support-42")
    agent = MyAgent(chat_ctx=snapshot.chat_ctx())
    userdata = snapshot.session_as(MyUserData)
    async for record in ledger.follow("support-42", after=snapshot.seq):
        ...

How: one query reads the room's projection row (its folded state, at the room's sequence S)
with the conversation items it needs (from the latest summary on, or all); then the log after S
is read and folded in memory with the same reducers the projector uses
(:mod:`room_ledger.state`). So the snapshot is current to the log head even when the
projector lags or is stopped. With no PostgreSQL (unset and the embedded one not running,
unreachable, not migrated) or no row for the room, the whole room is folded from the log.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import operator
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec

from room_ledger import db
from room_ledger import state as rd
from room_ledger.chat import snapshot_chat_ctx
from room_ledger.errors import LedgerError
from room_ledger.settings import DIRECT_BATCH

if TYPE_CHECKING:
    import asyncpg
    from livekit.agents.llm import ChatContext

    from room_ledger.client import Ledger

log = logging.getLogger("ledger.hydrate")

T = TypeVar("T")

#: After PostgreSQL fails, hydrate folds from the log alone for this long before trying again.
DB_RETRY_AFTER_S: Final = 5.0
#: Connection timeout for hydration's database (kept short: the log is always a fallback).
DB_CONNECT_TIMEOUT_S: Final = 2.0

# One statement, so one snapshot (the row, its pages and items agree) in one round trip (a
# transaction around two statements took four). The conversation comes as pages (runs of 64
# items stored as one text each, see projections.tables) and the few items after the last page:
# aggregating thousands of item rows per call took PostgreSQL two thirds of a hydration. Pages
# start at the one holding the summary's bound (a long call's summary skips most of its pages);
# that page brings a few older items along, and hydrate drops them. The bounds are uncorrelated
# sub-selects of materialised rows (InitPlans, known when the scans start), so both scans are
# index range scans on (room, …); a bound correlated to the row made PostgreSQL scan every item
# of the room (33 ms at 85k items, found by the soak).
_SNAPSHOT_QUERY: Final = """
WITH r AS MATERIALIZED (SELECT seq, state, summary_covers_seq FROM room_state WHERE room = $1),
     b AS MATERIALIZED (
        SELECT coalesce((SELECT p.start_seq FROM conversation_pages p WHERE p.room = $1 AND p.start_seq <= after
                          ORDER BY p.start_seq DESC LIMIT 1), 0) AS first_page,
               greatest(after, coalesce((SELECT p.end_seq FROM conversation_pages p WHERE p.room = $1
                                          ORDER BY p.start_seq DESC LIMIT 1), 0)) AS tail_after
          FROM (SELECT CASE WHEN $2 THEN 0 ELSE coalesce((SELECT summary_covers_seq FROM r), 0) END AS after) AS bound)
SELECT r.seq, r.state::text AS state,
       ARRAY(SELECT p.body FROM conversation_pages p
              WHERE p.room = $1 AND p.start_seq >= (SELECT first_page FROM b) ORDER BY p.start_seq) AS pages,
       (SELECT string_agg(i.item_text, ',' ORDER BY i.seq) FROM conversation_items i
         WHERE i.room = $1 AND i.seq > (SELECT tail_after FROM b)) AS tail
  FROM r
"""
#: One plan per connection, made once (planning this statement took 0.5 ms of every call). No
#: bitmap or sequential scans: every read here is one room's rows, in order, from an index, but
#: the bounds are only known when the scans start, so the planner guesses a third of the room
#: and prefers a bitmap scan plus a sort (7.1 → 3.9 ms for 1,907 items) or, while the tables are
#: small, a sequential scan of every room's items (3 ms at 12k items, against 0.1 ms through
#: the index). With both off, the generic plan is index scans throughout.
_SERVER_SETTINGS: Final = {"plan_cache_mode": "force_generic_plan", "enable_bitmapscan": "off",
                           "enable_seqscan": "off"}

_state_decoder: Final = msgspec.json.Decoder(rd.RoomState)
_items_decoder: Final = msgspec.json.Decoder(list[rd.ConversationItem])
_item_seq: Final = operator.attrgetter("seq")


class HydrateTimeout(LedgerError, TimeoutError):
    """``min_seq`` was not covered within the timeout."""

    def __init__(self, room: str, min_seq: int, reached: int, timeout: float) -> None:
        super().__init__(
            f"room {room!r}: state did not reach sequence {min_seq} within {timeout:g}s (the log is at "
            f"{reached}); was the event appended to this stream? raise timeout= if the writer is slow"
        )
        self.room = room
        self.min_seq = min_seq
        self.reached = reached


@dataclass(slots=True)
class Snapshot:
    """A room's state as of log sequence :attr:`seq` (the room's last event folded in)."""

    room: str
    #: The sequence of the room's last event in this state (0: no events). Follow from here.
    seq: int
    state: rd.RoomState
    #: The part of the conversation this snapshot carries (from the summary on, unless full).
    conversation: list[rd.ConversationItem]
    full_conversation: bool = False
    #: The sequence the projection row was at (0: folded from the log alone).
    projection_seq: int = 0
    #: "projection+log" or "log".
    source: str = "log"
    #: How many log events were folded on top of the projection row.
    caught_up: int = 0
    elapsed_s: float = field(default=0.0)

    @property
    def floor(self) -> rd.Floor:
        return self.state.floor

    @property
    def participants(self) -> dict[str, rd.Participant]:
        return self.state.participants

    @property
    def agents(self) -> dict[str, rd.Participant]:
        return self.state.agents()

    @property
    def session(self) -> dict[str, Any]:
        return self.state.session

    @property
    def session_version(self) -> int:
        return self.state.session_version

    @property
    def summary(self) -> rd.Summary | None:
        return self.state.summary

    @property
    def index(self) -> rd.RoomIndex:
        return self.state.index

    def session_as(self, type_: type[T], *, strict: bool = False) -> T:
        """The session document as ``type_`` (a msgspec Struct, dataclass, TypedDict …)."""
        result: T = msgspec.convert(self.state.session, type_, strict=strict)
        return result

    def to_builtins(self) -> dict[str, Any]:
        data: dict[str, Any] = msgspec.to_builtins(self.state)
        data.pop("positions", None)
        data["conversation"] = msgspec.to_builtins(self.conversation)
        data["seq"] = self.seq
        return data

    def chat_ctx(self, *, close_open_calls: str | None = None) -> ChatContext:
        """The conversation as a LiveKit Agents ``llm.ChatContext``: see :func:`room_ledger.chat.snapshot_chat_ctx`.

        ``close_open_calls=room_ledger.chat.INTERRUPTED_OUTPUT`` (opt-in): a function call whose
        tool never returned gets a synthetic output saying its outcome is unknown.
        """
        return snapshot_chat_ctx(self, close_open_calls=close_open_calls)


# --- the database side ----------------------------------------------------------------------


class _Db:
    def __init__(self) -> None:
        self.pool: asyncpg.Pool[Any] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.failed_until = 0.0
        self.lock = asyncio.Lock()


_dbs: weakref.WeakKeyDictionary[Any, _Db] = weakref.WeakKeyDictionary()


async def _pool(ledger: Ledger) -> asyncpg.Pool[Any] | None:
    handle = _dbs.get(ledger)
    if handle is None:
        handle = _dbs[ledger] = _Db()
        ledger.on_close(lambda: close(ledger))
    loop = asyncio.get_running_loop()
    if handle.pool is not None and handle.loop is loop:
        return handle.pool
    if time.monotonic() < handle.failed_until:
        return None
    async with handle.lock:
        if handle.pool is not None and handle.loop is loop:
            return handle.pool
        url = db.running_url(ledger.settings)
        if url is None:
            handle.failed_until = time.monotonic() + DB_RETRY_AFTER_S
            return None
        try:
            # Hydration runs one SELECT per use and leaves no session state: no reset round
            # trip when a connection goes back to the pool.
            handle.pool = await db.create_pool(ledger.settings, url=url, min_size=1, max_size=8,
                                               connect_timeout=DB_CONNECT_TIMEOUT_S,
                                               server_settings=dict(_SERVER_SETTINGS), reset_sessions=False)
            handle.loop = loop
        except LedgerError as exc:
            log.warning("hydration reads the log alone: %s", exc)
            handle.failed_until = time.monotonic() + DB_RETRY_AFTER_S
            return None
    return handle.pool


async def _mark_failed(ledger: Ledger, exc: BaseException) -> None:
    handle = _dbs.get(ledger)
    if handle is None:
        return
    import asyncpg  # noqa: PLC0415 - asyncpg takes 50 ms to import: loaded with the first database read

    if isinstance(exc, (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError)):
        # Correct but slow until fixed: every hydration folds the whole room from the log.
        log.warning("hydration reads the log alone for %gs: the projection tables are missing or older than "
                    "this room-ledger (%s); run `ledger migrate` (`ledger project` also migrates on start)",
                    DB_RETRY_AFTER_S, exc)
    else:
        log.warning("hydration reads the log alone for %gs: PostgreSQL failed (%s)", DB_RETRY_AFTER_S,
                    type(exc).__name__)
    handle.failed_until = time.monotonic() + DB_RETRY_AFTER_S
    pool, handle.pool = handle.pool, None
    if pool is not None:
        with contextlib.suppress(Exception):
            pool.terminate()


async def close(ledger: Ledger) -> None:
    """Close hydration's database pool of ``ledger`` (call before closing the ledger)."""
    handle = _dbs.pop(ledger, None)
    if handle is not None and handle.pool is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(handle.pool.close(), 5.0)


async def _load_row(ledger: Ledger, room: str, full: bool) -> tuple[rd.RoomState, int] | None:
    pool = await _pool(ledger)
    if pool is None:
        return None
    import asyncpg  # noqa: PLC0415 - asyncpg takes 50 ms to import: loaded with the first database read

    try:
        key = db.pg_text(room)
        async with pool.acquire() as conn:
            row = await conn.fetchrow(_SNAPSHOT_QUERY, key, full)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        await _mark_failed(ledger, exc)
        return None
    if row is None:
        return None
    state = _state_decoder.decode(row["state"])
    parts: list[str] = row["pages"]
    if row["tail"] is not None:
        parts.append(row["tail"])
    state.conversation = _items_decoder.decode(f"[{','.join(parts)}]")
    return state, int(row["seq"])


# --- hydrate --------------------------------------------------------------------------------


async def hydrate(
    ledger: Ledger,
    room: str,
    *,
    min_seq: int | None = None,
    full_conversation: bool = False,
    timeout: float = 5.0,
) -> Snapshot:
    """The room's state current to the log head.

    ``min_seq``: wait (up to ``timeout`` seconds) until the state covers that stream sequence,
    e.g. the sequence of a handoff (read-your-writes); raises :class:`HydrateTimeout` otherwise.
    ``full_conversation``: the whole conversation rather than from the latest summary on.
    """
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    # The log's last sequence for the room and the projection row are independent: ask both at once.
    asking_log = asyncio.ensure_future(ledger.room_last_seq(room))
    try:
        loaded = await _load_row(ledger, room, full_conversation)
    except BaseException:
        asking_log.cancel()
        raise
    last_of_room: asyncio.Future[int] | None = asking_log
    if loaded is not None:
        state, projection_seq = loaded
        source = "projection+log"
    else:
        state, projection_seq, source = rd.RoomState(room=room), 0, "log"
    caught_up = 0
    delay = 0.005
    while True:
        covered_head = await ledger.head() if min_seq is not None and state.seq < min_seq else 0
        if last_of_room is not None:
            last, last_of_room = await last_of_room, None
        else:
            last = await ledger.room_last_seq(room)
        if last > state.seq:
            if last - state.seq <= DIRECT_BATCH:
                # A short tail (the usual case: the projector is seconds behind at most) is read
                # without creating a consumer.
                for record in await ledger.read_recent(room, after=state.seq):
                    rd.apply_safely(state, record)
                    caught_up += 1
            else:
                async for record in ledger.read(room, after=state.seq):
                    rd.apply_safely(state, record)
                    caught_up += 1
        if min_seq is None or state.seq >= min_seq or covered_head >= min_seq:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HydrateTimeout(room, min_seq, max(state.seq, covered_head), timeout)
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.1)
    conversation = state.conversation
    if not full_conversation and state.summary is not None:
        # Items are in sequence order (each keeps the place of its first appearance).
        covers = state.summary.covers_seq
        if conversation and conversation[0].seq <= covers:
            conversation = conversation[bisect.bisect_right(conversation, covers, key=_item_seq):]
    elapsed = time.perf_counter() - started
    # prometheus_client takes 30 ms to import: `import ledger` (the CLI's start) goes without it.
    from room_ledger import metrics  # noqa: PLC0415 - loaded with the first hydration

    metrics.hydrated(source, elapsed, caught_up)
    return Snapshot(
        room=room, seq=state.seq, state=state, conversation=conversation, full_conversation=full_conversation,
        projection_seq=projection_seq, source=source, caught_up=caught_up, elapsed_s=elapsed,
    )
