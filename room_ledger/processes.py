"""Processes of the embedded servers, as the operating system sees them: alive or not, their
command lines, ports, detached starts and stops, the file lock of a home, and the servers of
every home running on this machine. Used by :mod:`room_ledger.embedded`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from room_ledger.errors import EmbeddedError

_HOST = "127.0.0.1"
_LOCK_TIMEOUT = 120.0




def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a running process (a zombie counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else (postgres runs as another user when we are root)
    # /proc where there is one: psutil costs 15 ms to import, on every command's start.
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        # "pid (comm) S ...": the state follows the last ")" (comm may hold spaces and parentheses).
        return stat[stat.rindex(b")") + 2:].split()[0] != b"Z"
    try:
        import psutil  # noqa: PLC0415 - optional (not a dependency): without it a zombie counts as alive

        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except ImportError:
        return True
    except Exception as exc:
        # AccessDenied: we cannot look, but kill(0) said it exists. NoSuchProcess: it just exited.
        return type(exc).__name__ != "NoSuchProcess"


def cmdline(pid: int) -> list[str]:
    """The command line of ``pid``, or [] if it cannot be read (then identity checks fail closed)."""
    proc = Path(f"/proc/{pid}/cmdline")
    with contextlib.suppress(OSError):
        if proc.exists():
            return [part for part in proc.read_bytes().decode(errors="replace").split("\0") if part]
    try:
        import psutil  # noqa: PLC0415 - optional (not a dependency), only where /proc is missing

        return [str(part) for part in psutil.Process(pid).cmdline()]
    except Exception:
        return []


def port_answers(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Without SO_REUSEADDR a port in TIME_WAIT after a server kill would look taken, although the
        # server (which sets SO_REUSEADDR itself) could bind it; that would defeat keeping the old port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
    return port


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
        # Back off gently: most waits end within a few polls, slow ones need not spin.
        interval = min(interval * 1.5, 0.25)


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    body = "\n".join(text.splitlines()[-lines:])
    return f"last lines of {path}:\n{body}" if body else f"({path} is empty)"


@contextlib.contextmanager
def locked(home: Path, name: str, timeout: float = _LOCK_TIMEOUT) -> Iterator[None]:
    """Hold an exclusive fcntl lock on ``home/.<name>.lock``; the kernel frees it if we die."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / f".{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise EmbeddedError(
                        f"timed out after {timeout:.0f}s waiting for {path}: another process is starting or "
                        f"stopping the embedded {name} server; if none is, delete {path}"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def terminate(pid: int, sig: signal.Signals, timeout: float) -> None:
    """Send ``sig``, wait up to ``timeout`` for the exit, then SIGKILL and wait for that."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    if wait_for(lambda: not pid_alive(pid), timeout):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not wait_for(lambda: not pid_alive(pid), 10.0):
        raise EmbeddedError(f"process {pid} survived SIGKILL for 10s; check it with `ps -p {pid}`")


def spawn_detached(argv: list[str], log: Path, cwd: Path) -> int:
    """Start ``argv`` in its own session, re-parented away from us, output appended to ``log``.

    A shell in a new session backgrounds the server and exits at once, so the server is nobody's child
    here: it outlives this process, receives no terminal signals, and never lingers as our zombie.
    """
    script = 'log="$1"; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'
    out = subprocess.run(
        ["/bin/sh", "-c", script, "sh", str(log), *argv],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        start_new_session=True,
        check=True,
        text=True,
        timeout=30,
    )
    return int(out.stdout.strip())



@dataclass(frozen=True)
class RunningServer:
    """An embedded server running on this machine, whichever home it belongs to."""

    kind: str  # "nats" or "postgres"
    pid: int
    home: Path


def running_anywhere() -> list[RunningServer]:
    """Every embedded server of any home running on this machine (by their command lines under
    ``/proc``; empty where there is none): the servers outlive the commands that started them,
    and a home removed or forgotten still has its servers running."""
    found: list[RunningServer] = []
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            home = _home_of(argv)
            if home is not None:
                found.append(RunningServer(kind=home[0], pid=int(entry.name), home=home[1]))
    return sorted(found, key=lambda server: (str(server.home), server.kind))


def _home_of(argv: list[str]) -> tuple[str, Path] | None:
    """("nats" | "postgres", home) when ``argv`` is one of our servers' (see ``_nats_paths``,
    ``_pg_paths``): nats-server runs ``-c HOME/nats/nats-server.conf``, the postmaster ``-D HOME/pg``
    (its worker processes rename themselves, and are not listed)."""
    if not argv or len(argv) < 3:
        return None
    program = Path(argv[0]).name
    for flag, value in itertools.pairwise(argv):
        path = Path(value)
        if program == "nats-server" and flag == "-c" and path.name == "nats-server.conf" and path.parent.name == "nats":
            return "nats", path.parent.parent
        if program == "postgres" and flag == "-D" and path.name == "pg":
            return "postgres", path.parent
    return None


