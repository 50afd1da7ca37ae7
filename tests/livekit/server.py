"""The real livekit-server for tests: started once per session inside the test network namespace.

``LocalLiveKit`` runs the binary that ``tools/go-tool livekit-server`` builds (the version is
pinned in ``tools/go-tools.txt``) with a configuration made for tests: fixed keys, rooms
auto-created, no Redis, no TURN, no STUN, short empty/departure timeouts, ``rtc.node_ip`` on the
namespace's veth address (libwebrtc gathers no candidate on loopback interfaces).  Clients reach its
HTTP/WebSocket port through :class:`SignalProxy`, a TCP relay that knows which participant each
signal connection belongs to, so a test can cut one participant's signal connection as a network
failure would (``drop_signal``); media and data go straight to the server over WebRTC.

``RemoteLiveKit`` is a server named by ``LIVEKIT_URL`` (LiveKit Cloud, or one you run): the same
tokens and server API; what needs the local process (its log, SIGKILL, the proxy) skips the test.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from livekit import api
from livekit.protocol import models

REPO = Path(__file__).resolve().parents[2]
GO_TOOL = REPO / "tools" / "go-tool"
#: Where libwebrtc and the server gather their ICE candidates (see ``netns.VETH_ADDRESS``).
NODE_IP = "127.0.0.2"
API_KEY = "devkey"
API_SECRET = "room-ledger-test-secret-0123456789abcdef"


def mint_token(
    api_key: str,
    api_secret: str,
    identity: str,
    room: str,
    *,
    hidden: bool = False,
    can_publish: bool = True,
    can_publish_data: bool = True,
    can_subscribe: bool = True,
    attributes: dict[str, str] | None = None,
    name: str | None = None,
    metadata: str | None = None,
    kind: str = "standard",
) -> str:
    """A join token with the given permissions."""
    token = (
        api.AccessToken(api_key, api_secret)
        .with_identity(identity)
        .with_kind(kind)  # type: ignore[arg-type]
        .with_grants(api.VideoGrants(
            room_join=True, room=room, hidden=hidden, can_publish=can_publish,
            can_publish_data=can_publish_data, can_subscribe=can_subscribe,
            can_update_own_metadata=True, agent=kind == "agent"))
    )
    if name:
        token = token.with_name(name)
    if metadata:
        token = token.with_metadata(metadata)
    if attributes:
        token = token.with_attributes(attributes)
    return token.to_jwt()


def server_binary() -> Path:
    """The pinned livekit-server, built once per machine (``LIVEKIT_SERVER_BIN`` overrides)."""
    if path := os.environ.get("LIVEKIT_SERVER_BIN"):
        return Path(path)
    done = subprocess.run([str(GO_TOOL), "livekit-server"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"could not build livekit-server with tools/go-tool: {done.stderr.strip()}")
    return Path(done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_url(url: str) -> str:
    return url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)


class _ServerApi:
    """What both a local and a remote server answer through LiveKit's server API."""

    url: str
    api_key: str
    api_secret: str

    def token(self, identity: str, room: str, **grants: Any) -> str:
        return mint_token(self.api_key, self.api_secret, identity, room, **grants)

    def api(self) -> api.LiveKitAPI:
        return api.LiveKitAPI(http_url(self.url), self.api_key, self.api_secret)

    async def list_participants(self, room: str) -> list[models.ParticipantInfo]:
        async with self.api() as lk:
            try:
                res = await lk.room.list_participants(api.ListParticipantsRequest(room=room))
            except api.TwirpError as exc:
                if exc.code == api.TwirpErrorCode.NOT_FOUND:
                    return []
                raise
            return list(res.participants)

    async def kick(self, room: str, identity: str) -> None:
        async with self.api() as lk:
            await lk.room.remove_participant(api.RoomParticipantIdentity(room=room, identity=identity))

    async def set_room_metadata(self, room: str, metadata: str) -> None:
        async with self.api() as lk:
            await lk.room.update_room_metadata(api.UpdateRoomMetadataRequest(room=room, metadata=metadata))


class RemoteLiveKit(_ServerApi):
    """A server from ``LIVEKIT_URL``; faults that need the local process skip the test."""

    local = False

    def __init__(self, url: str, api_key: str, api_secret: str) -> None:
        self.url, self.api_key, self.api_secret = url, api_key, api_secret

    async def drop_signal(self, room: str, identity: str) -> None:
        pytest.skip("drop_signal needs the local livekit-server (LIVEKIT_URL is set)")

    async def worker_registered(self, agent_name: str, timeout: float = 30.0, *, after: int = 0) -> None:
        pytest.skip("waiting for a worker's registration reads the local livekit-server's log"
                    " (LIVEKIT_URL is set)")

    def log_mark(self) -> int:
        return 0

    def kill(self) -> None:
        pytest.skip("killing the server needs the local livekit-server (LIVEKIT_URL is set)")

    def start(self) -> RemoteLiveKit:
        return self


class LocalLiveKit(_ServerApi):
    """livekit-server as a child process, its signal port behind a :class:`SignalProxy`."""

    local = True

    def __init__(self, workdir: Path, *, binary: Path | None = None, node_ip: str = NODE_IP,
                 webhook_urls: list[str] | None = None, extra_config: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        #: livekit-server POSTs its webhooks (signed with this server's key) to these URLs.
        self.webhook_urls = list(webhook_urls or [])
        #: Merged over the configuration (top-level keys replace, nested dicts merge).
        self.extra_config = dict(extra_config or {})
        self.binary = binary or server_binary()
        self.node_ip = node_ip
        self.api_key, self.api_secret = API_KEY, API_SECRET
        self.port, self.tcp_port, self.udp_port = free_port(), free_port(), free_port()
        self.proxy = SignalProxy(("127.0.0.1", self.port))
        self.url = ""  # set by start(): the proxy's address
        self.direct_url = f"ws://127.0.0.1:{self.port}"
        self.log_path = workdir / "livekit-server.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._lines: list[dict[str, Any]] = []
        self._changed = threading.Condition()

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "port": self.port,
            "bind_addresses": ["127.0.0.1"],
            "keys": {self.api_key: self.api_secret},
            "log_level": "debug",
            "logging": {"json": True},
            "rtc": {
                "tcp_port": self.tcp_port,
                "udp_port": self.udp_port,
                "node_ip": self.node_ip,
                "use_external_ip": False,
                "enable_loopback_candidate": True,
                "ips": {"includes": [f"{self.node_ip}/32"]},
                "stun_servers": [],
            },
            "room": {"auto_create": True, "empty_timeout": 20, "departure_timeout": 5},
            "turn": {"enabled": False},
        }
        if self.webhook_urls:
            config["webhook"] = {"api_key": self.api_key, "urls": self.webhook_urls}
        return _merged(config, self.extra_config)

    def start(self) -> LocalLiveKit:
        """Start the server (again, after :meth:`kill`, on the same ports) and wait until it answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "livekit.yaml"
        config.write_text(json.dumps(self.config(), indent=2))  # JSON is YAML
        self._proc = subprocess.Popen(
            [str(self.binary), "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        threading.Thread(target=self._read_log, args=(self._proc,), daemon=True,
                         name="livekit-server-log").start()
        if not self.url:
            self.url = f"ws://127.0.0.1:{self.proxy.start()}"
        self._wait_healthy(60.0)
        return self

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"livekit-server exited with {self._proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=2) as res:
                    if res.status == 200:
                        return
            except (OSError, urllib.error.URLError) as exc:
                last = str(exc)
            with self._changed:  # the server logs as it starts: wake on its next line
                self._changed.wait(0.1)
        raise RuntimeError(f"livekit-server did not answer GET / within {timeout:.0f} s ({last}); "
                           f"see {self.log_path}")

    def _read_log(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with self.log_path.open("ab") as out:
            for raw in proc.stdout:
                out.write(raw)
                out.flush()
                try:
                    line = json.loads(raw)
                except ValueError:
                    line = {"msg": raw.decode(errors="replace").strip()}
                with self._changed:
                    self._lines.append(line)
                    self._changed.notify_all()

    def kill(self) -> None:
        """SIGKILL the server (the proxy stays: clients see their connections fail)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        self.proxy.drop(lambda conn: True)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self.proxy.stop()

    # ---- the server's log ----------------------------------------------------------------

    def log_mark(self) -> int:
        """A position in the log: :meth:`wait_log` ``after=`` it sees only later lines."""
        with self._changed:
            return len(self._lines)

    def _wait_log_sync(self, predicate: Callable[[dict[str, Any]], bool], timeout: float,
                       after: int) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = after
        with self._changed:
            while True:
                for line in self._lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self._lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no such line in the livekit-server log within {timeout} s")
                self._changed.wait(left)

    async def wait_log(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0, *,
                       after: int = 0) -> dict[str, Any]:
        return await asyncio.to_thread(self._wait_log_sync, predicate, timeout, after)

    async def worker_registered(self, agent_name: str, timeout: float = 30.0, *, after: int = 0) -> None:
        """Wait until the server has registered an agent worker under ``agent_name``.

        LiveKit offers a job only to workers registered when the dispatch arrives: dispatch after this.
        """
        await self.wait_log(lambda line: line.get("msg") == "worker registered"
                            and line.get("agentName") == agent_name, timeout, after=after)

    # ---- faults --------------------------------------------------------------------------

    async def drop_signal(self, room: str, identity: str) -> None:
        """Cut ``identity``'s signal connection(s) to ``room`` as a network failure would."""
        dropped = self.proxy.drop(lambda conn: conn.identity == identity and conn.room == room)
        if not dropped:
            raise AssertionError(f"no signal connection of {identity!r} in {room!r} to drop")


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


class _Relay:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.identity = ""
        self.room = ""
        self.upstream: asyncio.StreamWriter | None = None

    def close(self) -> None:
        for w in (self.writer, self.upstream):
            if w is not None:
                with contextlib.suppress(Exception):
                    # an abort, not a close: the peer sees the connection die, as on a network failure
                    w.transport.abort()


_TOKEN = re.compile(rb"(?:access_token=|authorization: bearer )([A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+)",
                    re.IGNORECASE)


def _claims(head: bytes) -> tuple[str, str]:
    """(identity, room) of the JWT in an HTTP request head, unverified (the server verifies it)."""
    match = _TOKEN.search(head)
    if not match:
        return "", ""
    payload = match.group(1).split(b".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    except ValueError:
        return "", ""
    return str(claims.get("sub", "")), str((claims.get("video") or {}).get("room", ""))


class SignalProxy:
    """A TCP relay in front of the server's HTTP port, in a thread with its own event loop."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._loop = asyncio.new_event_loop()
        self._conns: set[_Relay] = set()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="signal-proxy")

    def start(self) -> int:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop).result(10)
        return int(self._server.sockets[0].getsockname()[1])

    def drop(self, which: Callable[[_Relay], bool]) -> int:
        async def drop() -> int:
            hits = [c for c in list(self._conns) if which(c)]
            for conn in hits:
                conn.close()
            return len(hits)
        if not self._thread.is_alive():
            return 0
        return asyncio.run_coroutine_threadsafe(drop(), self._loop).result(10)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self.drop(lambda conn: True)
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Relay(reader, writer)
        self._conns.add(conn)
        try:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            conn.identity, conn.room = _claims(head)
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                return  # the server is down: the client sees its connection refused-and-closed
            conn.upstream = up_writer
            up_writer.write(head)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._conns.discard(conn)
            conn.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()


def have_binary() -> str:
    """Why the local server cannot run here, or ``""``."""
    if os.environ.get("LIVEKIT_SERVER_BIN"):
        return ""
    if shutil.which("go") is None and not list(
            Path(os.environ.get("ROOM_LEDGER_TOOLS", Path.home() / ".cache/room-ledger/go-tools"))
            .glob("livekit-server-*/server")):
        return "livekit-server is not built and Go is not installed (needs Go: see tests/README.md)"
    return ""
