"""The Postgres projector against real NATS and PostgreSQL: equality with the in-memory fold,
SIGKILL mid-batch, errors table, partitions, rebuild."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from room_ledger import db
from room_ledger import events as ev
from room_ledger import state as rd
from room_ledger.client import Ledger
from room_ledger.hydrate import close, hydrate
from room_ledger.projections import rows as pg_rows
from room_ledger.projections.admin import status
from room_ledger.projections.migrate import current_revision, head_revision, upgrade
from room_ledger.projections.projector import Projector, partition_of
from room_ledger.projections.rebuild import rebuild
from room_ledger.projections.sample import interleaved
from room_ledger.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def conn(pg_settings: Settings) -> AsyncIterator[asyncpg.Connection[Any]]:
    await upgrade(pg_settings)
    c = await db.connect(pg_settings)
    yield c
    await c.close()


async def fold_room(ledger: Ledger, room: str) -> rd.RoomState:
    return rd.fold([r async for r in ledger.read(room)])


async def projected(conn: asyncpg.Connection[Any], room: str, table: str = "room_state",
                    items: str = "conversation_items", pages: str = "conversation_pages") -> rd.RoomState | None:
    row = await conn.fetchrow(f"SELECT seq, state::text AS state FROM {table} WHERE room = $1", room)
    if row is None:
        return None
    state = pg_rows.decode_state(row["state"])
    assert state.seq == row["seq"]
    rows = await conn.fetch(f"SELECT seq, item::text AS item, item_text FROM {items} WHERE room = $1 ORDER BY seq", room)
    state.conversation = [pg_rows.decode_item(r["item"]) for r in rows]
    await assert_pages_follow_items(conn, room, rows, pages)
    return state


async def assert_pages_follow_items(conn: asyncpg.Connection[Any], room: str, items: list[Any], table: str) -> None:
    """The room's pages are its items in equal runs from the first, and fewer than a run follow."""
    pages = await conn.fetch(f"SELECT start_seq, end_seq, items, body FROM {table} WHERE room = $1 ORDER BY start_seq",
                             room)
    size = pages[0]["items"] if pages else None
    position = 0
    for page in pages:
        run = items[position:position + page["items"]]
        assert page["items"] == size and len(run) == size, f"{room}: pages of unequal size"
        assert (page["start_seq"], page["end_seq"]) == (run[0]["seq"], run[-1]["seq"]), f"{room}: page bounds"
        assert msgspec.json.decode(f"[{page['body']}]") == [msgspec.json.decode(r["item_text"]) for r in run], (
            f"{room}: page at {page['start_seq']} differs from its items")
        position += size
    if size is not None:
        assert len(items) - position < size, f"{room}: {len(items) - position} items after the last page"


def comparable(state: rd.RoomState) -> tuple[Any, Any]:
    """The state as plain data, as PostgreSQL can hold it (JSONB does not keep key order, dict
    equality ignores it; NUL characters become U+FFFD on the way in)."""
    return (
        msgspec.json.decode(pg_rows.encode_state(state)),
        [msgspec.json.decode(pg_rows.encode_item(item)) for item in state.conversation],
    )


async def assert_projection_equals_fold(ledger: Ledger, conn: asyncpg.Connection[Any], rooms: list[str]) -> None:
    for room in rooms:
        expected = await fold_room(ledger, room)
        actual = await projected(conn, room)
        assert actual is not None, room
        assert comparable(actual) == comparable(expected), room


# --- migrations -----------------------------------------------------------------------------


async def test_migrate_is_idempotent(pg_settings: Settings) -> None:
    await upgrade(pg_settings)
    await upgrade(pg_settings)
    assert await current_revision(pg_settings) == head_revision()


def _downgrade_sync(connection: Any, revision: str) -> None:
    from alembic import command

    from room_ledger.projections.migrate import alembic_config

    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    command.downgrade(cfg, revision)


async def test_migration_0004_pages_rooms_projected_before_it(pg_settings: Settings, conn: Any,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    from room_ledger.projections.migrate import _with_connection

    room = unique("pre-pages")
    sender = ev.Sender(identity="agent-a", kind="agent")
    async with Ledger(pg_settings) as ledger:
        await ledger.append_many(
            ev.make_event(room, ev.ConversationItem(item_id=f"item_{n}", role="user", text=f"t{n}"), sender=sender)
            for n in range(150))
        async with Projector(pg_settings, projection=unique("t")) as projector:
            await projector.catch_up()
        query = "SELECT start_seq, end_seq, items, body FROM conversation_pages WHERE room = $1 ORDER BY start_seq"
        written = [tuple(r) for r in await conn.fetch(query, room)]
        assert [r[2] for r in written] == [64, 64]
        # Back to 0003 (no pages) and up again: the migration pages what is already projected,
        # exactly as the projector does.
        try:
            await _with_connection(pg_settings, _downgrade_sync, "0003")
            assert await conn.fetchval("SELECT to_regclass('conversation_pages')") is None
            # Hydration against tables older than the code: the whole room from the log, and
            # the warning says what to run.
            with caplog.at_level(logging.WARNING, logger="ledger.hydrate"):
                snapshot = await hydrate(ledger, room)
            assert snapshot.source == "log" and len(snapshot.conversation) == 150
            assert "run `ledger migrate`" in caplog.text
            await close(ledger)
        finally:
            await upgrade(pg_settings)
        assert [tuple(r) for r in await conn.fetch(query, room)] == written
        await assert_projection_equals_fold(ledger, conn, [room])


# --- equality with the fold, for random logs ------------------------------------------------

AGENT_IDS = ["a", "b", "c"]
agent = st.sampled_from(AGENT_IDS)
# Older than any grant (a stream sequence) or newer than all: the fence rejects some writes.
epoch = st.none() | st.sampled_from([1, 10**12])
bodies = st.one_of(
    st.builds(ev.FloorRequest, agent_id=agent, task=st.none() | st.sampled_from(["t1", "t2"]), epoch=epoch),
    st.builds(ev.FloorRelease, agent_id=agent, epoch=epoch),
    st.builds(ev.AgentStatus, agent_id=agent, status=st.sampled_from(["processing", "idle", "resolved"]),
              action_lock=st.booleans(), epoch=epoch),
    st.builds(ev.Handoff, from_agent=agent, to_agent=agent),
    st.builds(ev.ParticipantJoined, identity=agent, kind=st.just("agent")),
    st.builds(ev.ParticipantLeft, identity=agent),
    st.builds(ev.AgentState, identity=agent, state=st.sampled_from(["idle", "speaking"])),
    st.builds(ev.SessionPatch, patch=st.dictionaries(st.sampled_from(["x", "y", "z"]),
                                                     st.none() | st.integers(0, 3) | st.just({"k": [1]})),
              agent_id=st.none() | agent, epoch=epoch),
    st.builds(ev.ConversationItem, item_id=st.sampled_from(["i1", "i2", "i3", "i4", "i5"]),
              role=st.sampled_from(["user", "assistant"]), text=st.text(max_size=8)),
    st.builds(ev.Transcript, speaker=st.sampled_from(["user", "a"]), text=st.text(max_size=5),
              segment_id=st.sampled_from(["s1", "s2", "s3"]), track_id=st.sampled_from(["TU", "TA"])),
    st.builds(ev.ChatMessage, message_id=st.sampled_from(["m1", "m2"]), text=st.text(max_size=5)),
    st.builds(ev.ContextSummary, text=st.just("sum"), covers_seq=st.integers(0, 10)),
    # a tool call from its start, then the feed's call (its own key, or an id of its own) and output
    st.builds(ev.ToolExecution, stage=st.sampled_from(["started", "ended"]), call_id=st.sampled_from(["c1", "c2"]),
              name=st.just("lookup"), arguments=st.sampled_from(["{}", '{"x": 1}'])),
    st.builds(ev.ConversationItem, item_id=st.sampled_from(["call:c1", "call:c2", "item_c1"]),
              item_type=st.sampled_from(["function_call", "function_call_output"]),
              call_id=st.sampled_from(["c1", "c2"]), name=st.just("lookup"), output=st.just("ok")),
)
room_logs = st.lists(st.tuples(bodies, agent), min_size=1, max_size=30)


def generate_logs(count: int) -> list[list[tuple[ev.Body, str]]]:
    found: list[list[tuple[ev.Body, str]]] = []

    @settings(max_examples=count, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(room_logs)
    def collect(log: list[tuple[ev.Body, str]]) -> None:
        found.append(log)

    collect()
    return found


async def test_projection_equals_fold_for_random_logs(pg_settings: Settings, conn: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Pages of three items: the short random rooms get pages, and items updated inside them.
    monkeypatch.setattr("room_ledger.projections.projector.PAGE_ITEMS", 3)
    logs = generate_logs(60)
    rooms = [unique("prop") for _ in logs]
    events: list[ev.KnownEvent] = []
    # Interleave the rooms' events so batches mix rooms, as in a real log.
    longest = max(len(log) for log in logs)
    for i in range(longest):
        for room, log in zip(rooms, logs, strict=True):
            if i < len(log):
                body, sender = log[i]
                events.append(ev.make_event(room, body, sender=ev.Sender(identity=sender, kind="agent")))
    async with Ledger(pg_settings) as ledger:
        await ledger.append_many(events)
        # Small batches: many transactions, items updated across batches.
        async with Projector(pg_settings, projection=unique("t"), batch_size=37) as projector:
            await projector.catch_up()
        await assert_projection_equals_fold(ledger, conn, rooms)
        # Projecting the same events again (another checkpoint from 0) changes nothing.
        before = [comparable(s) for s in [await projected(conn, r) for r in rooms] if s is not None]
        async with Projector(pg_settings, projection=unique("t"), batch_size=500) as projector:
            await projector.catch_up()
        after = [comparable(s) for s in [await projected(conn, r) for r in rooms] if s is not None]
        assert before == after


async def test_conversation_pages_follow_items_however_batched(pg_settings: Settings, conn: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("room_ledger.projections.projector.PAGE_ITEMS", 4)
    room = unique("pages")
    sender = ev.Sender(identity="agent-a", kind="agent")

    def item(n: int, text: str) -> ev.KnownEvent:
        return ev.make_event(room, ev.ConversationItem(item_id=f"item_{n}", role="user", text=text), sender=sender)

    async with Ledger(pg_settings) as ledger:
        await ledger.append_many(item(n, f"first {n}") for n in range(10))
        async with Projector(pg_settings, projection=unique("t"), batch_size=3) as projector:
            await projector.catch_up()
        pages = await conn.fetch("SELECT items, body FROM conversation_pages WHERE room = $1 ORDER BY start_seq", room)
        assert [p["items"] for p in pages] == [4, 4]  # items 0-7; 8 and 9 wait for a full page
        # An item of a written page changes (its place stays), and new items complete a page.
        await ledger.append_many([item(1, "changed 1"), *(item(n, f"first {n}") for n in range(10, 13))])
        async with Projector(pg_settings, projection=unique("t"), batch_size=1000) as projector:
            await projector.catch_up()
        pages = await conn.fetch("SELECT items, body FROM conversation_pages WHERE room = $1 ORDER BY start_seq", room)
        assert [p["items"] for p in pages] == [4, 4, 4]
        assert '"changed 1"' in pages[0]["body"] and '"first 1"' not in pages[0]["body"]
        await assert_projection_equals_fold(ledger, conn, [room])
        # Hydration reads the pages and the item after them.
        snapshot = await hydrate(ledger, room)
        assert snapshot.source == "projection+log" and snapshot.caught_up == 0
        assert [i.text for i in snapshot.conversation] == (
            ["first 0", "changed 1"] + [f"first {n}" for n in range(2, 13)])


# --- errors ---------------------------------------------------------------------------------


async def test_bad_events_are_recorded_and_skipped(pg_settings: Settings, conn: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    room = unique("err")
    async with Ledger(pg_settings) as ledger:
        await ledger.append(ev.make_event(room, ev.FloorRequest(agent_id="a")))
        # A known type with a body of the wrong shape, published around the client's checks.
        bad = msgspec.json.encode({"type": "floor.request", "id": uuid.uuid4().hex, "room": room,
                                   "body": {"agent_id": 42}})
        ack = await ledger.connection.js.publish(ledger.subjects.event(room, "floor.request"), bad,
                                      stream=pg_settings.stream)
        # An event that makes a reducer raise.
        boom = await ledger.append(ev.make_event(room, ev.RoomMetadata(metadata="boom")))

        def explode(state: rd.RoomState, event: Any, seq: int, time: Any) -> None:
            raise RuntimeError("reducer bug")

        monkeypatch.setitem(rd._HANDLERS, ev.RoomMetadataEvent, explode)
        last = await ledger.append(ev.make_event(room, ev.FloorRelease(agent_id="a")))
        projection = unique("t")
        async with Projector(pg_settings, projection=projection) as projector:
            await projector.catch_up()
        state = await projected(conn, room)
        assert state is not None and state.seq == last.seq
        assert state.floor.holder is None and [t.end_reason for t in state.floor.history] == ["release"]
        # the new projection folds the whole shared stream: other tests' rooms may have errors too
        rows = await conn.fetch("SELECT seq, room, event_type, error FROM projection_errors "
                                "WHERE projection = $1 AND room = $2 ORDER BY seq", projection, room)
        assert [(r["seq"], r["room"], r["event_type"]) for r in rows] == [
            (ack.seq, room, "floor"), (boom.seq, room, "room.metadata")]
        assert "agent_id" in rows[0]["error"] and "reducer bug" in rows[1]["error"]
        report = await status(pg_settings, head=await ledger.head())
        assert report.errors_total >= 2
        mine = [c for c in report.checkpoints if c.projection == projection]
        assert mine and mine[0].lag is not None and mine[0].seq >= last.seq


# --- partitions -----------------------------------------------------------------------------


async def test_partitions_split_rooms_and_agree_with_fold(pg_settings: Settings, conn: Any) -> None:
    rooms = [unique("part") for _ in range(8)]
    async with Ledger(pg_settings) as ledger:
        await ledger.append_many(interleaved(rooms, 60))
        projection = unique("t")
        workers = [Projector(pg_settings, projection=projection, partition=i, partitions=3, batch_size=100)
                   for i in range(3)]
        for w in workers:
            await w.start()
        try:
            await asyncio.gather(*(w.catch_up() for w in workers))
        finally:
            for w in workers:
                await w.close()
        await assert_projection_equals_fold(ledger, conn, rooms)
        owners = {partition_of(ledger.subjects.room(r).split(".")[1], 3) for r in rooms}
        assert len(owners) > 1
        rows = await conn.fetch("SELECT partition FROM projection_checkpoints WHERE projection = $1", projection)
        assert sorted(r["partition"] for r in rows) == [0, 1, 2]


# --- SIGKILL mid-batch ----------------------------------------------------------------------


async def _checkpoint(conn: Any, projection: str) -> int:
    value = await conn.fetchval(
        "SELECT seq FROM projection_checkpoints WHERE projection = $1 AND partition = 0", projection)
    return int(value or 0)


async def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():  # noqa: ASYNC110 - a database condition, bounded by the timeout
            await asyncio.sleep(0.01)


@pytest.mark.fault
async def test_sigkill_mid_batch_loses_and_duplicates_nothing(pg_settings: Settings, conn: Any) -> None:
    rooms = [unique("kill") for _ in range(6)]
    projection = unique("t")
    env = dict(os.environ, LEDGER_NATS_URL=",".join(pg_settings.nats_urls or ()),
               LEDGER_DATABASE_URL=pg_settings.database_url or "", LEDGER_HOME=str(pg_settings.home),
               PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "room_ledger.projections.projector", "--projection", projection, "--batch-size", "40"]
    async with Ledger(pg_settings) as ledger:
        positions = await ledger.append_many(interleaved(rooms, 400))
        last = positions[-1].seq
        kills = 0
        for _ in range(6):
            before = await _checkpoint(conn, projection)
            if before >= last:
                break
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                async def moved(before: int = before, proc: Any = proc) -> bool:
                    return await _checkpoint(conn, projection) > before or proc.returncode is not None

                await _wait_for(moved, 60, "checkpoint to move")
                os.kill(proc.pid, signal.SIGKILL)  # mid-run: a batch is in flight or being written
                kills += 1
            finally:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                await asyncio.wait_for(proc.wait(), 10)
        assert kills >= 2
        # Finish with a clean run.
        async with Projector(pg_settings, projection=projection) as projector:
            await projector.catch_up(until=last)
        await assert_projection_equals_fold(ledger, conn, rooms)
        expected_items = 0
        for r in rooms:
            expected_items += len((await fold_room(ledger, r)).conversation)
        count = await conn.fetchval("SELECT count(*) FROM conversation_items WHERE room = ANY($1::text[])", rooms)
        assert count == expected_items


# --- rebuild --------------------------------------------------------------------------------


async def test_rebuild_equals_live_and_hydration_keeps_working(pg_settings: Settings, conn: Any) -> None:
    rooms = [unique("rb") for _ in range(4)]
    async with Ledger(pg_settings) as ledger:
        await ledger.append_many(interleaved(rooms, 150))
        async with Projector(pg_settings) as projector:
            await projector.catch_up()
        live = {r: comparable(s) for r in rooms if (s := await projected(conn, r)) is not None}
        assert len(live) == len(rooms)

        done = asyncio.Event()
        hydrations = 0

        async def hydrate_meanwhile() -> None:
            nonlocal hydrations
            while not done.is_set():
                snapshot = await hydrate(ledger, rooms[0], full_conversation=True)
                assert snapshot.seq == live_seq
                hydrations += 1

        live_seq = (await fold_room(ledger, rooms[0])).seq
        progress: list[tuple[int, int]] = []
        task = asyncio.create_task(hydrate_meanwhile())
        try:
            seq = await rebuild(pg_settings, progress=lambda d, t: progress.append((d, t)))
        finally:
            done.set()
            await task
        assert hydrations > 0 and progress and progress[-1][0] == progress[-1][1]
        assert seq >= max(s[0] for s in progress)
        rebuilt = {r: comparable(s) for r in rooms if (s := await projected(conn, r)) is not None}
        assert rebuilt == live
        await assert_projection_equals_fold(ledger, conn, rooms)
        # The twins are empty again and the live projector carries on after the swap.
        assert await conn.fetchval("SELECT count(*) FROM room_state_next") == 0
        more = await ledger.append(ev.make_event(rooms[1], ev.FloorRequest(agent_id="late")))
        async with Projector(pg_settings) as projector:
            await projector.catch_up()
        state = await projected(conn, rooms[1])
        assert state is not None and state.seq == more.seq
        from room_ledger.hydrate import close

        await close(ledger)


async def test_nul_characters_do_not_stop_the_projector(pg_settings: Settings) -> None:
    """PostgreSQL cannot store NUL; the log keeps it, the projection carries U+FFFD, and goes on."""
    room = f"nul-{uuid.uuid4().hex[:8]}\x00room"
    events = [
        ev.make_event(room, ev.ParticipantJoined(identity="caller\x00x", kind="standard")),
        ev.make_event(room, ev.Data(topic="t\x00", text="payload \x00 with nul")),
        ev.make_event(
            room, ev.ConversationItem(item_id="item\x001", role="user", text="hi\x00there", speaker="caller\x00x")
        ),
        ev.make_event(room, ev.FloorRequest(agent_id="agent\x00a")),
    ]
    async with Ledger(pg_settings) as client:
        positions = await client.append_many(events)
        async with Projector(pg_settings, projection=f"nul{uuid.uuid4().hex[:6]}") as projector:
            await projector.catch_up(until=positions[-1].seq)
            assert projector.checkpoint >= positions[-1].seq
        snapshot = await hydrate(client, room)
        stored = [r.event async for r in client.read(room)]
    assert stored == events  # the log keeps every byte
    assert snapshot.floor.holder == "agent\ufffda"
    assert [item.text for item in snapshot.conversation] == ["hi\ufffdthere"]


async def test_the_gc_threshold_is_raised_only_by_a_projector_that_asks(pg_settings: Settings, room: str) -> None:
    # The threshold is process-wide: a projector inside another program leaves it alone; `ledger
    # project` (tune_gc=True) raises it while folding and puts it back after.
    async with Ledger(pg_settings) as ledger:
        await ledger.append(ev.make_event(room, ev.AgentStatus(agent_id="a", status="idle"),
                                          sender=ev.Sender("a", "agent")))
    before = gc.get_threshold()
    seen: dict[bool, list[tuple[int, int, int]]] = {False: [], True: []}
    for tune_gc in (False, True):
        async with Projector(pg_settings, projection=unique("gc"), tune_gc=tune_gc) as projector:
            # python/mypy#15459: a lambda with a default argument ("t=") is not inferred
            await projector.catch_up(progress=lambda done, total, t=tune_gc:  # type: ignore[misc]
                                     seen[t].append(gc.get_threshold()))
        assert gc.get_threshold() == before
    assert seen[False] and all(t == before for t in seen[False]), seen[False][:3]
    assert any(t[0] > before[0] for t in seen[True]), seen[True][:3]
