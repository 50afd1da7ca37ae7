"""pytest plugin: the ``livekit`` marker, the ``livekit_server`` fixture, and the namespace re-exec.

Load it with ``pytest_plugins = ["tests.livekit.plugin"]`` in the top conftest.

How a session with LiveKit tests runs (see tests/README.md):

1. Tests that use ``livekit_server`` get the ``livekit`` marker automatically (before ``-m``
   filtering), so ``pytest -m livekit`` runs exactly the LiveKit tests.
2. After collection, if LiveKit tests are selected, ``LIVEKIT_URL`` is unset and this process is
   not yet inside the test network namespace, the whole pytest command is re-run inside one
   (:mod:`tests.livekit.netns`): every server of the session, NATS and Postgres included, then
   lives in that namespace.  The outer process only waits and exits with the inner exit status.
3. The inner process records its exit status before interpreter shutdown.  If it then dies of a
   signal (the livekit FFI has been seen to abort at exit, once in ~30 runs, after every room
   disconnected) the outer process reports the recorded status, with a warning, instead of a
   random red build.
4. Where no namespace can be created, the LiveKit tests are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import pytest_asyncio
from livekit import api, rtc
from livekit.protocol import models

from . import netns
from .server import LocalLiveKit, RemoteLiveKit, have_binary

MARKER = "livekit"
FIXTURE = "livekit_server"
STATUS_ENV = "LIVEKIT_TESTS_STATUS_FILE"
_REEXEC = pytest.StashKey[list[str]]()
_SKIP_REASON = pytest.StashKey[str]()
_STATUS_FILE = pytest.StashKey[str]()


class LiveKitServer(Protocol):
    """What ``livekit_server`` yields: the local livekit-server, or a real one from ``LIVEKIT_URL``."""

    url: str
    api_key: str
    api_secret: str
    local: bool

    def token(self, identity: str, room: str, **grants: Any) -> str: ...
    def api(self) -> api.LiveKitAPI: ...
    async def list_participants(self, room: str) -> list[models.ParticipantInfo]: ...
    async def kick(self, room: str, identity: str) -> None: ...
    async def set_room_metadata(self, room: str, metadata: str) -> None: ...
    # the local server only (a LIVEKIT_URL server skips the test):
    async def drop_signal(self, room: str, identity: str) -> None: ...
    async def worker_registered(self, agent_name: str, timeout: float = 30.0, *, after: int = 0) -> None: ...
    def log_mark(self) -> int: ...


# ---- hooks ---------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: uses livekit-server (real livekit SDK over WebRTC)")
    if path := os.environ.pop(STATUS_ENV, None):  # popped: a nested pytest must not write it
        config.stash[_STATUS_FILE] = path


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the fixture, before ``-m`` selects."""
    for item in items:
        if FIXTURE in getattr(item, "fixturenames", ()) and not item.get_closest_marker(MARKER):
            item.add_marker(MARKER)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Decide, on the final selection, whether to re-run inside a namespace or to skip."""
    selected = [item for item in session.items if item.get_closest_marker(MARKER)]
    if not selected or os.environ.get("LIVEKIT_URL") or netns.inside():
        return
    prefix, reason = netns.probe()
    if prefix is None:
        session.config.stash[_SKIP_REASON] = reason
        for item in selected:
            item.add_marker(pytest.mark.skip(reason=f"LiveKit tests: {reason}"))
    else:
        session.config.stash[_REEXEC] = prefix


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    config = session.config
    if _REEXEC not in config.stash or config.option.collectonly:
        return
    if session.testsfailed and not config.option.continue_on_collection_errors:
        return  # collection errors: let pytest report them here
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is not None:  # give the terminal (and stdin, for --pdb) to the inner run
        capman.suspend_global_capture(in_=True)
    print("\n[livekit] re-running this session inside a private network namespace", flush=True)
    status = _run_inside(config)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # the inner run already wrote junit xml, cache, ...: add nothing


def _run_inside(config: pytest.Config) -> int:
    params = config.invocation_params
    with tempfile.TemporaryDirectory(prefix="livekit-tests-") as tmp:
        status_file = Path(tmp) / "status"
        env = {**os.environ, netns.INSIDE_ENV: "1", STATUS_ENV: str(status_file)}
        argv = netns.command([sys.executable, "-m", "pytest", *params.args])
        proc = subprocess.Popen(argv, cwd=params.dir, env=env)
        try:
            code = proc.wait()
        except KeyboardInterrupt:  # the inner run got the same SIGINT: let it report
            code = proc.wait()
        recorded = status_file.read_text().strip() if status_file.exists() else ""
    if (code < 0 or code >= 128) and recorded.isdigit():
        print(
            f"[livekit] the inner pytest died of signal {abs(code) % 128} after the session had"
            f" finished (livekit FFI teardown); its result was exit status {recorded}",
            file=sys.stderr,
            flush=True,
        )
        return int(recorded)
    return code if code >= 0 else 128 - code


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if path := session.config.stash.get(_STATUS_FILE, None):
        Path(path).write_text(str(int(session.exitstatus)))


# ---- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def livekit_server(request: pytest.FixtureRequest) -> Iterator[LiveKitServer]:
    """livekit-server, started once per session in the namespace (or the server of ``LIVEKIT_URL``)."""
    if url := os.environ.get("LIVEKIT_URL"):
        key, secret = os.environ.get("LIVEKIT_API_KEY"), os.environ.get("LIVEKIT_API_SECRET")
        if not key or not secret:
            pytest.fail("LIVEKIT_URL is set but LIVEKIT_API_KEY / LIVEKIT_API_SECRET are not")
        yield RemoteLiveKit(url, key, secret)
        return
    if not netns.inside():
        reason = request.config.stash.get(_SKIP_REASON, "") or netns.probe()[1] or "not re-executed"
        pytest.skip(f"LiveKit tests run inside a private network namespace only: {reason}")
    if reason := have_binary():
        pytest.skip(reason)
    workdir = Path(tempfile.mkdtemp(prefix="livekit-server-"))
    server = LocalLiveKit(workdir).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


Connect = Callable[..., Awaitable[rtc.Room]]


@pytest_asyncio.fixture
async def livekit_connect(livekit_server: LiveKitServer) -> AsyncIterator[Connect]:
    """``await livekit_connect(identity, room, **token_grants)``: a connected ``rtc.Room``.

    Every room it connected is disconnected at teardown.
    """
    rooms: list[rtc.Room] = []

    async def connect(
        identity: str, room: str, *, options: rtc.RoomOptions | None = None, **grants: Any
    ) -> rtc.Room:
        lk_room = rtc.Room()
        rooms.append(lk_room)
        await lk_room.connect(livekit_server.url, livekit_server.token(identity, room, **grants),
                              options or rtc.RoomOptions())
        return lk_room

    yield connect
    await asyncio.gather(*(r.disconnect() for r in rooms if r.isconnected()), return_exceptions=True)
