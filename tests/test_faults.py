"""The fault suite: real processes killed for real; afterwards, nothing lost and nothing duplicated.

Each test checks against what was sent: the projection of every room equals the pure fold of its
log (so no event is missing or folded twice), conversation rows are exactly the fold's items, and
the errors table is empty.

- The projector SIGKILLed ten times while the log grows (live projection).
- A rebuild SIGKILLed ten times; the live tables and hydration are untouched meanwhile, and the
  next rebuild completes and equals the live projection.
- PostgreSQL stopped and restarted under a running projector while events keep coming.

Covered elsewhere, not repeated here: NATS stopped and restarted during bridge ingest
(``test_bridge_writer.py::test_nats_stopped_for_10s_mid_room_loses_nothing``), a NATS restart under
``follow`` (``test_client.py``), a NATS cluster node SIGKILLed during ingest (``test_cluster.py``),
two bridges in one room (``test_bridge_writer.py``, ``test_bridge_livekit.py``).

Each test has its own stream and subject prefix on the session's NATS and its own database on the
session's PostgreSQL (or its own PostgreSQL where it stops it), so checkpoints, rebuild swaps and
outages touch nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec
import pytest

from room_ledger import db, embedded
from room_ledger import state as rd
from room_ledger.client import Ledger
from room_ledger.hydrate import hydrate
from room_ledger.projections import rows as pg_rows
from room_ledger.projections.migrate import upgrade
from room_ledger.projections.projector import Projector
from room_ledger.projections.rebuild import rebuild
from room_ledger.projections.sample import interleaved
from room_ledger.projections.tables import ROOMS, ROOMS_REBUILD
from room_ledger.settings import Settings
from tests.test_projector import assert_pages_follow_items

pytestmark = pytest.mark.fault

REPO = Path(__file__).resolve().parents[1]
KILLS = 10


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# --- isolation: own stream, own database ---------------------------------------------------------


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture
async def own(pg_settings: Settings) -> AsyncIterator[Settings]:
    """Settings with a stream, subject prefix and database of this test's own."""
    tag = uuid.uuid4().hex[:10]
    name = f"faults_{tag}"
    admin = await asyncpg.connect(db.asyncpg_dsn(pg_settings.database_url or ""))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    settings = pg_settings.replace(
        database_url=_with_database(pg_settings.database_url or "", name),
        stream=f"FAULTS_{tag}",
        subject_prefix=f"faults{tag}",
    )
    await upgrade(settings)
    try:
        yield settings
    finally:
        admin = await asyncpg.connect(db.asyncpg_dsn(pg_settings.database_url or ""))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
        async with Ledger(settings) as ledger:
            with contextlib.suppress(Exception):
                await ledger.stream.delete()


def _env(settings: Settings) -> dict[str, str]:
    return dict(
        os.environ,
        LEDGER_NATS_URL=",".join(settings.nats_urls or ()),
        LEDGER_DATABASE_URL=settings.database_url or "",
        LEDGER_HOME=str(settings.home),
        LEDGER_STREAM=settings.stream,
        LEDGER_SUBJECT_PREFIX=settings.subject_prefix,
        PYTHONPATH=str(REPO),
    )


async def _wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.01)


async def _checkpoint(conn: Any, projection: str) -> int:
    value = await conn.fetchval(
        "SELECT max(seq) FROM projection_checkpoints WHERE projection = $1", projection)
    return int(value or 0)


# --- what must hold afterwards ------------------------------------------------------------------


def _comparable(state: rd.RoomState) -> Any:
    return msgspec.json.decode(pg_rows.encode_state(state)), msgspec.to_builtins(state.conversation)


async def _projected(conn: Any, room: str) -> rd.RoomState | None:
    row = await conn.fetchrow("SELECT seq, state::text AS state FROM room_state WHERE room = $1", room)
    if row is None:
        return None
    state = pg_rows.decode_state(row["state"])
    rows = await conn.fetch("SELECT seq, item::text AS item, item_text FROM conversation_items WHERE room = $1 "
                            "ORDER BY seq", room)
    state.conversation = [pg_rows.decode_item(r["item"]) for r in rows]
    await assert_pages_follow_items(conn, room, rows, "conversation_pages")
    return state


async def _assert_nothing_lost_or_doubled(ledger: Ledger, conn: Any, rooms: list[str], sent: dict[str, int]) -> None:
    for room in rooms:
        records = [r async for r in ledger.read(room)]
        ids = [r.event.id for r in records]
        assert len(ids) == sent[room] == len(set(ids)), f"{room}: log has {len(ids)} events, sent {sent[room]}"
        expected = rd.fold(records)
        actual = await _projected(conn, room)
        assert actual is not None, f"{room}: no projection row"
        assert actual.seq == records[-1].seq, f"{room}: projected to {actual.seq}, log ends at {records[-1].seq}"
        assert _comparable(actual) == _comparable(expected), f"{room}: projection differs from the fold"
        count = await conn.fetchval("SELECT count(*) FROM conversation_items WHERE room = $1", room)
        assert count == len(expected.conversation), f"{room}: {count} conversation rows, fold has {len(expected.conversation)}"
    errors = await conn.fetch("SELECT seq, room, error FROM projection_errors")
    assert not errors, f"the projector recorded errors: {[dict(e) for e in errors[:3]]}"


class Producer:
    """Appends the rooms' sample events in small batches, at a live room's pace, until stopped."""

    def __init__(self, ledger: Ledger, rooms: list[str], batch: int = 20) -> None:
        self.events = interleaved(rooms, 100_000)
        self.ledger = ledger
        self.batch = batch
        self.sent: dict[str, int] = dict.fromkeys(rooms, 0)
        self.appended = 0
        self._stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            chunk = [event for _, event in zip(range(self.batch), self.events, strict=False)]
            if not chunk:
                return
            await self.ledger.append_many(chunk)
            for event in chunk:
                self.sent[event.room] += 1
            self.appended += len(chunk)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.02)

    def start(self) -> Producer:
        self.task = asyncio.create_task(self._run())
        return self

    async def finish(self) -> None:
        assert self.task is not None
        self._stop.set()
        await asyncio.wait_for(self.task, 60)


async def _kill_when_moved(argv: list[str], env: dict[str, str], moved: Callable[[], Awaitable[bool]],
                           what: str) -> bool:
    """Start a process, SIGKILL it as soon as ``moved()``; False when it finished on its own first."""
    proc = await asyncio.create_subprocess_exec(*argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE)
    try:
        async def moved_or_exited() -> bool:
            return proc.returncode is not None or await moved()

        await _wait_for(moved_or_exited, 60, what)
        if proc.returncode is not None:
            err = (await proc.stderr.read()).decode(errors="replace") if proc.stderr else ""
            assert proc.returncode == 0, f"{argv[1:4]} exited {proc.returncode}:\n{err[-2000:]}"
            return False
        os.kill(proc.pid, signal.SIGKILL)
        return True
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await asyncio.wait_for(proc.wait(), 10)


# --- the projector, killed ten times during live projection -----------------------------------


async def test_projector_sigkilled_ten_times_during_live_projection(own: Settings) -> None:
    rooms = [unique("live") for _ in range(5)]
    argv = [sys.executable, "-m", "room_ledger.projections.projector", "--batch-size", "25"]
    conn = await db.connect(own)
    try:
        async with Ledger(own) as ledger:
            producer = Producer(ledger, rooms).start()
            kills = 0
            while kills < KILLS:
                before = await _checkpoint(conn, ROOMS)

                async def moved(before: int = before) -> bool:
                    return await _checkpoint(conn, ROOMS) > before

                if await _kill_when_moved(argv, _env(own), moved, "the projector's checkpoint to move"):
                    kills += 1
            await producer.finish()
            # A clean projector finishes the job from wherever the last kill left the checkpoint.
            async with Projector(own) as projector:
                await projector.catch_up()
            await _assert_nothing_lost_or_doubled(ledger, conn, rooms, producer.sent)
    finally:
        await conn.close()


# --- a rebuild, killed ten times -----------------------------------------------------------------


REBUILD = (
    "import asyncio\n"
    "from room_ledger.settings import Settings\n"
    "from room_ledger.projections.rebuild import rebuild\n"
    "asyncio.run(rebuild(Settings.from_env(), batch_size=25))\n"
)


async def test_rebuild_sigkilled_ten_times_leaves_live_state_intact(own: Settings) -> None:
    rooms = [unique("rb") for _ in range(4)]
    conn = await db.connect(own)
    try:
        async with Ledger(own) as ledger:
            positions = await ledger.append_many(interleaved(rooms, 400))
            sent = {room: 400 for room in rooms}
            async with Projector(own) as projector:
                await projector.catch_up()
            live = {room: _comparable(s) for room in rooms if (s := await _projected(conn, room)) is not None}
            assert len(live) == len(rooms)
            hydrated = (await hydrate(ledger, rooms[0], full_conversation=True)).to_builtins()

            kills = 0
            while kills < KILLS:
                # A fresh rebuild starts over: wait for *this* run to write its checkpoint.
                await conn.execute("DELETE FROM projection_checkpoints WHERE projection = $1", ROOMS_REBUILD)

                async def rebuilding() -> bool:
                    return await _checkpoint(conn, ROOMS_REBUILD) > 0

                killed = await _kill_when_moved([sys.executable, "-c", REBUILD], _env(own), rebuilding,
                                                "the rebuild's checkpoint to move")
                assert killed, "the rebuild finished before it could be killed: make the log longer"
                kills += 1
                # Killed mid-rebuild: the live tables are as they were, hydration unaffected.
                assert await _checkpoint(conn, ROOMS) == positions[-1].seq
                now = (await hydrate(ledger, rooms[0], full_conversation=True)).to_builtins()
                assert now == hydrated
            for room in rooms:
                state = await _projected(conn, room)
                assert state is not None and _comparable(state) == live[room], f"{room}: live row changed"

            # The next rebuild runs to the end and swaps in the same state.
            seq = await rebuild(own)
            assert seq == positions[-1].seq
            await _assert_nothing_lost_or_doubled(ledger, conn, rooms, sent)
            rebuilt = {room: _comparable(s) for room in rooms if (s := await _projected(conn, room)) is not None}
            assert rebuilt == live
            assert await conn.fetchval("SELECT count(*) FROM room_state_next") == 0
            from room_ledger.hydrate import close

            await close(ledger)
    finally:
        await conn.close()


# --- PostgreSQL stopped and restarted under a running projector -------------------------------


async def test_postgres_stopped_and_restarted_during_projection(settings: Settings, tmp_path: Path) -> None:
    home = tmp_path / "pg"
    info = await asyncio.to_thread(embedded.ensure_postgres, home)
    tag = uuid.uuid4().hex[:10]
    own = settings.replace(database_url=info.url, stream=f"FAULTSPG_{tag}", subject_prefix=f"faultspg{tag}",
                           home=home)
    rooms = [unique("pg") for _ in range(4)]
    try:
        await upgrade(own)
        async with Ledger(own) as ledger:
            producer = Producer(ledger, rooms).start()
            stop = asyncio.Event()
            projector = Projector(own, batch_size=25)
            running = asyncio.create_task(projector.run(stop))
            conn = await db.connect(own)
            try:
                await _wait_for(lambda: _moved_past(conn, 0), 60, "the projector to commit a batch")
            finally:
                await conn.close()
            # Stop PostgreSQL for real while events keep coming.
            await asyncio.to_thread(embedded.stop_postgres, home)
            during = producer.appended

            async def grew() -> bool:
                return producer.appended >= during + 300

            await _wait_for(grew, 60, "the log to grow while PostgreSQL is down")
            assert not running.done(), "the projector gave up during the outage"
            restarted = await asyncio.to_thread(embedded.ensure_postgres, home, port=info.port)
            assert restarted.port == info.port
            await producer.finish()
            head = await ledger.head()
            conn = await db.connect(own)
            try:
                await _wait_for(lambda: _moved_past(conn, head - 1), 90, "the projector to catch up after the outage")
                stop.set()
                await asyncio.wait_for(running, 30)
                await projector.close()
                await _assert_nothing_lost_or_doubled(ledger, conn, rooms, producer.sent)
            finally:
                await conn.close()
            await ledger.stream.delete()
    finally:
        await asyncio.to_thread(embedded.stop_postgres, home)


async def _moved_past(conn: Any, seq: int) -> bool:
    return await _checkpoint(conn, ROOMS) > seq
