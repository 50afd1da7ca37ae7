"""``ledger state / rooms / purge / doctor / migrate / project / rebuild / bridge / dispatch`` against real servers."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from room_ledger import embedded
from room_ledger.projections.admin import room_rows
from room_ledger.settings import Settings
from tests.conftest import fresh_home
from tests.test_cli_helpers import invoke, json_of, ok, seed


@pytest.fixture(autouse=True)
def stored_tail(settings: Settings) -> Iterator[None]:
    """Leave a stored message at the stream's end: purging the newest room would otherwise leave the
    stream's last sequence past every stored message, which a projector catching up to the head
    (projections.rebuild, other test modules) waits on forever."""
    yield
    from room_ledger import events as ev

    seed(settings, "test-tail", [ev.make_event("test-tail", ev.RoomMetadata(metadata="tail"))])


def test_state_now_json_and_table(pg_settings: Settings, room: str) -> None:
    seqs = seed(pg_settings, room)
    state = json_of(ok(pg_settings, ["state", room, "--json"]))
    assert state["seq"] == seqs[-1]
    assert state["floor"]["holder"] is None
    assert [t["holder"] for t in state["floor"]["history"]] == ["triage", "billing"]
    assert state["session"] == {"caller_name": "Ann", "account": {"id": 3}}
    assert {p["identity"] for p in state["participants"].values() if p["present"]} == {"user-1", "triage", "billing"}
    assert [i["text"] for i in state["conversation"]][-1] == "Billing here, I see the double charge."
    out = ok(pg_settings, ["state", room]).stdout
    assert "floor: free" in out and "caller_name" in out and "user-1" in out and "1 bridge gap" in out


def test_state_without_postgres_folds_the_log(settings: Settings, room: str) -> None:
    seed(settings, room)
    state = json_of(ok(settings, ["state", room, "--json"], LEDGER_DATABASE_URL="postgresql://x@127.0.0.1:1/none"))
    assert state["session"]["caller_name"] == "Ann"


def test_state_of_unknown_room(settings: Settings, room: str) -> None:
    result = invoke(settings, ["state", room])
    assert result.exit_code == 1 and "no events for room" in result.stderr


def test_rooms(settings: Settings, room: str) -> None:
    seqs = seed(settings, room)
    other = room + "-b"
    seed(settings, other, None)
    rows = {r["room"]: r for r in json_of(ok(settings, ["rooms", "--json"]))}
    row = rows[room]
    assert row["events"] == len(seqs)
    assert (row["first_seq"], row["last_seq"]) == (seqs[0], seqs[-1])
    assert row["participants"] == ["billing", "triage", "user-1"]
    assert row["gaps"] == 1
    assert row["first_activity"] <= row["last_activity"]
    assert other in rows
    out = ok(settings, ["rooms"]).stdout
    assert room in out and "billing, triage, user-1" in out


def test_rooms_creates_no_consumers(settings: Settings, room: str) -> None:
    """A listing of thousands of rooms must not create a reader per room and category: ephemeral
    consumers outlive their reader by seconds and count against the server's limit."""
    seed(settings, room)

    async def consumers() -> int:
        nc = await nats.connect(list(settings.nats_urls or ()))
        try:
            return (await nc.jetstream().stream_info(settings.stream)).state.consumer_count
        finally:
            await nc.close()

    before = asyncio.run(consumers())
    assert room in {r["room"] for r in json_of(ok(settings, ["rooms", "--json"]))}
    # Earlier tests' readers may expire meanwhile (fewer), never more: this listing made none.
    assert asyncio.run(consumers()) <= before


def test_purge_asks_then_removes(settings: Settings, room: str) -> None:
    seqs = seed(settings, room)
    declined = invoke(settings, ["purge", room], input="n\n")
    assert declined.exit_code == 1 and f"Remove {len(seqs)} events of room {room!r}" in declined.output
    assert "nothing removed" in declined.stderr
    assert len(ok(settings, ["replay", room, "--json"]).stdout.splitlines()) == len(seqs)
    accepted = invoke(settings, ["purge", room], input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert f"removed {len(seqs)} events" in accepted.stdout
    gone = invoke(settings, ["replay", room])
    assert gone.exit_code == 1 and "no events for room" in gone.stderr


def test_purge_yes_json_and_unknown(settings: Settings, room: str) -> None:
    seqs = seed(settings, room)
    keep = room + "-keep"
    seed(settings, keep)
    result = json_of(ok(settings, ["purge", room, "--yes", "--json"]))
    assert result["room"] == room and result["events_removed"] == len(seqs)
    assert len(ok(settings, ["replay", keep, "--json"]).stdout.splitlines()) == len(seqs)
    again = invoke(settings, ["purge", room, "--yes"])
    assert again.exit_code == 1 and "no events for room" in again.stderr


def test_purge_removes_projection_rows(pg_settings: Settings, room: str) -> None:
    seed(pg_settings, room)
    ok(pg_settings, ["project", "--once", "--json"])
    asked = invoke(pg_settings, ["purge", room], input="n\n")
    assert "1 room_state" in asked.output and "projection rows" in asked.output
    result = json_of(ok(pg_settings, ["purge", room, "--yes", "--json"]))
    assert result["projection_rows_removed"]["room_state"] == 1
    assert asyncio.run(room_rows(pg_settings, room)) == dict.fromkeys(result["projection_rows_removed"], 0)


# --- doctor ---------------------------------------------------------------------------------------


def test_doctor_json(pg_settings: Settings, room: str) -> None:
    seed(pg_settings, room)
    ok(pg_settings, ["migrate"])
    report = json_of(ok(pg_settings, ["doctor", "--json"]))
    assert report["ok"] is True
    assert report["nats"]["reachable"] is True and report["nats"]["server_version"]
    assert report["stream"]["exists"] is True and report["stream"]["differences"] == {}
    assert report["stream"]["subjects"] == ["ledger.>"] and report["stream"]["replicas"] == 1
    assert report["postgres"]["reachable"] is True and report["postgres"]["server_version"]
    assert report["settings"]["stream"] == "ROOMS"
    assert "lag" in report["projector"]
    out = ok(pg_settings, ["doctor"]).stdout
    assert "stream ROOMS" in out and "PostgreSQL" in out


def test_doctor_on_a_database_never_migrated_says_migrate(pg_settings: Settings) -> None:
    """A PostgreSQL without the projection tables: one warning, to run `ledger migrate`, and not a
    second one about the projector's status (PostgreSQL's "undefined table", SQLSTATE 42P01, is
    recognised through SQLAlchemy's and asyncpg's wrappings, not by its text)."""
    import uuid

    import asyncpg

    assert pg_settings.database_url is not None
    base = pg_settings.database_url.replace("postgresql+asyncpg://", "postgresql://")
    name = f"fresh_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        connection = await asyncpg.connect(base)
        try:
            await connection.execute(f"CREATE DATABASE {name}")
        finally:
            await connection.close()

    asyncio.run(create())
    fresh = pg_settings.replace(database_url=base.rsplit("/", 1)[0] + f"/{name}")
    report = json_of(invoke(fresh, ["doctor", "--json"]))
    messages = [p["message"] for p in report["problems"]]
    assert any("not migrated" in m and "ledger migrate" in m for m in messages), messages
    assert not any("projector's status" in m for m in messages), messages


def test_doctor_reports_stream_differences(settings: Settings) -> None:
    name = "DOCTOR_" + str(int(time.time() * 1000))
    prefix = name.lower()

    async def make() -> None:
        nc = await nats.connect(settings.nats_urls[0] if settings.nats_urls else "")
        await nc.jetstream().add_stream(StreamConfig(name=name, subjects=[f"{prefix}.>"], max_msg_size=1000,
                                                     duplicate_window=120))
        await nc.close()

    async def drop() -> None:
        nc = await nats.connect(settings.nats_urls[0] if settings.nats_urls else "")
        await nc.jetstream().delete_stream(name)
        await nc.close()

    asyncio.run(make())
    try:
        result = invoke(settings, ["doctor", "--json"], LEDGER_STREAM=name, LEDGER_SUBJECT_PREFIX=prefix)
        report = json_of(result)
        assert result.exit_code == 0
        assert report["stream"]["differences"]["max_msg_size"] == {"now": 1000, "configured": 1024 * 1024}
        assert any("max_msg_size" in p["message"] for p in report["problems"] if p["level"] == "warning")
    finally:
        asyncio.run(drop())


def test_doctor_unreachable_nats(settings: Settings) -> None:
    result = invoke(settings, ["doctor", "--json"], LEDGER_NATS_URL="nats://127.0.0.1:1")
    assert result.exit_code == 1
    report = json_of(result)
    assert report["ok"] is False and report["nats"]["reachable"] is False
    assert any(p["level"] == "error" and "nats://127.0.0.1:1" in p["message"] for p in report["problems"])
    plain = invoke(settings, ["doctor"], LEDGER_NATS_URL="nats://127.0.0.1:1")
    assert plain.exit_code == 1 and "error:" in plain.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def nats_without_fsync(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A user-provided nats-server with JetStream at the default sync interval and monitoring on."""
    port, http = _free_port(), _free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f'listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http}\njetstream {{ store_dir: "{tmp_path}/js" }}\n')
    proc = subprocess.Popen([str(embedded.nats_binary()), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not embedded._nats_js_ready(port, timeout=1.0):
            assert proc.poll() is None and time.monotonic() < deadline, "nats-server did not start"
        yield f"nats://127.0.0.1:{port}", f"http://127.0.0.1:{http}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_doctor_warns_about_a_server_without_fsync(settings: Settings, nats_without_fsync: tuple[str, str]) -> None:
    url, monitor = nats_without_fsync
    report = json_of(ok(settings, ["doctor", "--json", "--monitor-url", monitor], LEDGER_NATS_URL=url))
    assert report["nats"]["embedded"] is False and report["nats"]["sync_always"] is False
    assert any("does not fsync every write" in p["message"] for p in report["problems"])
    unknown = json_of(ok(settings, ["doctor", "--json", "--monitor-url", "http://127.0.0.1:1"], LEDGER_NATS_URL=url))
    assert unknown["nats"]["sync_always"] is None
    assert any("cannot tell whether NATS fsyncs" in p["message"] for p in unknown["problems"])


def test_doctor_starts_nothing(settings: Settings) -> None:
    home = fresh_home("doctor")
    try:
        result = invoke(settings, ["doctor", "--json"], LEDGER_NATS_URL="", LEDGER_DATABASE_URL="",
                        LEDGER_HOME=str(home))
        report = json_of(result)
        assert report["nats"] == {"embedded": True, "home": str(home.resolve()), "running": False}
        assert report["postgres"]["running"] is False
        assert embedded.status(home) == {"nats": None, "postgres": None}
    finally:
        shutil.rmtree(home, ignore_errors=True)


# --- migrate, project, rebuild, bridge, dispatch -------------------------------------------------


def test_migrate_project_rebuild(pg_settings: Settings, room: str) -> None:
    seqs = seed(pg_settings, room)
    first = json_of(ok(pg_settings, ["migrate", "--json"]))
    assert first["to"] is not None
    assert json_of(ok(pg_settings, ["migrate", "--json"]))["changed"] is False
    projected = json_of(ok(pg_settings, ["project", "--once", "--json"]))
    assert projected["checkpoint"] >= seqs[-1]
    rebuilt = json_of(ok(pg_settings, ["rebuild", "--yes", "--json"]))
    assert rebuilt["seq"] >= seqs[-1]
    declined = invoke(pg_settings, ["rebuild"], input="n\n")
    assert declined.exit_code == 1 and "nothing rebuilt" in declined.stderr
    shown = ok(pg_settings, ["rebuild", "--yes"])
    assert "events/s" in shown.stderr and "ETA" in shown.stderr, shown.stderr
    assert "rebuilt projection 'rooms'" in shown.stdout
    unknown = invoke(pg_settings, ["rebuild", "--yes", "--projection", "nope"])
    assert unknown.exit_code == 1 and "no projection 'nope'" in unknown.stderr


def test_bridge_and_dispatch_need_livekit_settings(settings: Settings, room: str) -> None:
    for args in (["bridge", "--room", room], ["dispatch", room]):
        result = invoke(settings, args, LIVEKIT_URL="", LIVEKIT_API_KEY="", LIVEKIT_API_SECRET="")
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert "LIVEKIT_URL" in lines[-1] and "Traceback" not in result.output


def test_doctor_shows_the_projector_errors_table(pg_settings: Settings) -> None:
    import asyncpg

    ok(pg_settings, ["migrate"])
    projection = f"doctor-test-{time.time_ns()}"

    async def sql(query: str, *args: object) -> None:
        conn = await asyncpg.connect(pg_settings.database_url)
        try:
            await conn.execute(query, *args)
        finally:
            await conn.close()

    asyncio.run(sql("INSERT INTO projection_errors (projection, seq, room, event_type, error) "
                    "VALUES ($1, 1, 'r-doctor', 'floor.request', 'reducer exploded')", projection))
    try:
        report = json_of(ok(pg_settings, ["doctor", "--json"]))
        assert report["projector"]["errors_total"] >= 1
        assert any(e["error"] == "reducer exploded" for e in report["projector"]["errors"])
        assert any("error(s)" in p["message"] for p in report["problems"])
        out = ok(pg_settings, ["doctor"]).stdout
        assert "projector errors" in out and "reducer exploded" in out
    finally:
        asyncio.run(sql("DELETE FROM projection_errors WHERE projection = $1", projection))


def test_project_once_after_purging_the_newest_room(pg_settings: Settings, room: str) -> None:
    """A purge of the newest room leaves the stream's last sequence past every stored message."""
    import threading

    seed(pg_settings, room)
    newest = room + "-newest"
    seed(pg_settings, newest)
    ok(pg_settings, ["purge", newest, "--yes"])
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(invoke(pg_settings, ["project", "--once", "--json"])))
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "ledger project --once did not finish"
    result = results[0]
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]


def test_project_partitions_split_the_work(pg_settings: Settings, room: str) -> None:
    seed(pg_settings, room)
    results = [
        json_of(ok(pg_settings, ["project", "--once", "--json", "--partition", str(i), "--partitions", "2"]))
        for i in range(2)
    ]
    assert results[0]["checkpoint"] == results[1]["checkpoint"] > 0
    assert json_of(ok(pg_settings, ["state", room, "--json"]))["seq"] > 0


def test_project_refuses_a_partition_out_of_range(pg_settings: Settings) -> None:
    result = invoke(pg_settings, ["project", "--once", "--partition", "2", "--partitions", "2"])
    assert result.exit_code == 1
    assert "--partition 2 is not below --partitions 2" in result.output
