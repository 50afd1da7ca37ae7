"""Clients no one here wrote, recorded by the bridge and read back through ``ledger replay --json``.

* The LiveKit JavaScript SDK (``livekit-client`` from npm, pinned by tests/clients/js/package-lock.json,
  installed by ``tools/js-client``) in headless Chromium (Debian's ``chromium``): the page
  tests/clients/js/client.html joins, sets attributes, sends ``lk.chat`` with ``sendText``, a data
  packet with a topic (``publishData``) and a file (``sendFile``, a byte stream).
* LiveKit's Go SDK (``server-sdk-go``, pion WebRTC like the ``lk`` CLI) in tests/clients/go, built by
  ``tools/go-client``: it joins and sends reliable data packets with a topic.

Both need the real livekit-server (``livekit`` marker) and run inside the test network namespace
with the pytest process; see ``CHROMIUM_FLAGS`` and ``pion_address`` for what each needs there.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from room_ledger.settings import Settings
from tests.livekit import netns
from tests.test_bridge_livekit import running_bridge
from tests.test_cli_helpers import env_for

pytestmark = pytest.mark.livekit

REPO = Path(__file__).resolve().parents[1]
JS_PAGE = REPO / "tests" / "clients" / "js" / "client.html"

#: How Chromium runs here. Only ``--headless=new`` (and ``--no-sandbox`` as root, added by
#: :func:`browser`) are required: Chromium gathers its host candidate on the namespace's veth
#: (127.0.0.2; like libwebrtc elsewhere it skips only loopback *interfaces*), needs no default
#: route and no loopback flag. Without the last two flags it announces that candidate as an mDNS
#: name (``<uuid>.local``) that nothing here resolves, and the server only learns its address as
#: peer-reflexive from Chromium's connectivity checks; with them (media permission granted without
#: a prompt, the mDNS feature off) it announces 127.0.0.2 itself, and the server's log shows a
#: host-to-host pair. The rest keeps a throwaway profile quiet (no first-run, sync, downloads).
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--password-store=basic", "--use-mock-keychain",
    "--disable-gpu", "--disable-dev-shm-usage",
    "--use-fake-ui-for-media-stream", "--disable-features=WebRtcHideLocalIpsWithMdns",
]


# ---- installing the clients ------------------------------------------------------------------


def _tool(script: str, what: str, needs: str) -> str:
    """Run tools/SCRIPT (installs once, prints the path). Skips only when ``needs`` is not installed."""
    done = subprocess.run([str(REPO / "tools" / script)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        message = f"{what} could not be installed by tools/{script}: {done.stderr.strip()[-800:]}"
        if shutil.which(needs) is None:
            pytest.skip(message)
        pytest.fail(message)
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def js_sdk() -> Path:
    """livekit-client's browser bundle (installed once per machine, in a cache)."""
    bundle = Path(_tool("js-client", "livekit-client", "npm")) / "node_modules/livekit-client/dist/livekit-client.umd.js"
    assert bundle.is_file(), f"tools/js-client installed no browser bundle at {bundle}"
    return bundle


@pytest.fixture(scope="session")
def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.skip("headless Chromium is not installed: apt-get install -y chromium (.ci/run does)")


@pytest.fixture(scope="session")
def go_client() -> str:
    """The lk-data binary (tests/clients/go), built once per machine into the go-tools cache."""
    return _tool("go-client", "the Go client (lk-data)", "go")


# ---- the browser -----------------------------------------------------------------------------


class Page:
    """The local HTTP server the page is served from, and what the page reported."""

    def __init__(self, bundle: Path, plan: dict[str, Any], file_bytes: bytes) -> None:
        self.bundle, self.plan, self.file_bytes = bundle, plan, file_bytes
        self.reports: dict[str, dict[str, Any]] = {}
        #: The page waits at ``GET /gate/NAME`` until the test opens gate NAME.
        self.gates: dict[str, asyncio.Event] = {}
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._file(JS_PAGE))
        app.router.add_get("/livekit-client.umd.js", self._file(self.bundle))
        app.router.add_get("/plan.json", self._plan)
        app.router.add_get("/file.bin", self._bytes)
        app.router.add_post("/report", self._report)
        app.router.add_get("/gate/{name}", self._gate)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/"

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    async def close(self) -> None:
        for gate in self.gates.values():
            gate.set()
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    def _file(path: Path) -> Any:
        async def serve(request: web.Request) -> web.StreamResponse:
            return web.FileResponse(path)
        return serve

    async def _plan(self, request: web.Request) -> web.Response:
        return web.json_response(self.plan)

    async def _bytes(self, request: web.Request) -> web.Response:
        return web.Response(body=self.file_bytes, content_type="application/octet-stream")

    async def _report(self, request: web.Request) -> web.Response:
        body = await request.json()
        async with self._changed:
            self.reports[body["step"]] = body
            self._changed.notify_all()
        return web.Response(status=204)

    async def _gate(self, request: web.Request) -> web.Response:
        await self.gate(request.match_info["name"]).wait()
        return web.Response(status=204)

    async def step(self, name: str, timeout: float, browser_log: Path) -> dict[str, Any]:
        """Wait until the page reports ``name``; fail at once with its error if it reports one."""

        def done() -> bool:
            return name in self.reports or "error" in self.reports

        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(done)

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"the page never reported {name!r} within {timeout:.0f} s (it reported "
                                 f"{sorted(self.reports)}); Chromium's log:\n{_tail(browser_log)}") from None
        if "error" in self.reports:
            raise AssertionError(f"the page failed: {self.reports['error']['error']}\n"
                                 f"Chromium's log:\n{_tail(browser_log)}")
        return self.reports[name]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(none)"


@contextlib.asynccontextmanager
async def browser(chromium: str, url: str, workdir: Path) -> AsyncIterator[Path]:
    """Headless Chromium on ``url``; yields the path of its log. Killed (its whole group) at exit."""
    log_path = workdir / "chromium.log"
    argv = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={workdir / 'profile'}",
            "--enable-logging=stderr", "--v=0", url]
    if os.geteuid() == 0:
        argv.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield log_path
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its renderer, GPU and utility processes too
        await asyncio.wait_for(proc.wait(), 10)


# ---- the log, through the CLI ------------------------------------------------------------------


def replay_json(settings: Settings, room: str) -> list[dict[str, Any]]:
    """``ledger replay ROOM --json``, run as a user would (a subprocess), parsed."""
    done = subprocess.run([sys.executable, "-m", "room_ledger.cli.main", "replay", room, "--json"], cwd=REPO,
                          env={**os.environ, **env_for(settings)}, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, f"ledger replay failed ({done.returncode}): {done.stderr}"
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def payload_bytes(settings: Settings, room: str, seq: int) -> bytes:
    """``ledger payload ROOM SEQ``: the exact bytes of an event's payload."""
    done = subprocess.run([sys.executable, "-m", "room_ledger.cli.main", "payload", room, str(seq)], cwd=REPO,
                          env={**os.environ, **env_for(settings)}, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, f"ledger payload failed ({done.returncode}): {done.stderr.decode(errors='replace')}"
    return done.stdout


async def replay_until(settings: Settings, room: str, want: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Replay until ``want(events)`` holds: the bridge writes asynchronously, the CLI reads what is stored."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        events = await asyncio.to_thread(replay_json, settings, room)
        if want(events):
            return events
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"ledger replay never showed what was sent within {timeout:.0f} s; it has "
                                 f"{[_brief(e) for e in events]}")
        await asyncio.sleep(0.5)  # the next replay: a new process, not a busy loop


def transport(event: dict[str, Any]) -> str:
    """A ``data`` event's transport (the default, "packet", is left out of the JSON)."""
    return str(event["body"].get("transport", "packet"))


def _brief(event: dict[str, Any]) -> tuple[Any, ...]:
    body = event.get("body", {})
    detail = {k: body[k] for k in ("topic", "transport", "size", "reason") if body.get(k)}
    return event["type"], event.get("sender", {}).get("identity"), detail


def of(events: list[dict[str, Any]], type_: str, identity: str | None = None) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == type_
            and (identity is None or e.get("sender", {}).get("identity") == identity)]


@pytest.fixture
def lk_settings(settings: Settings, livekit_server: Any) -> Settings:
    return settings.replace(livekit_url=livekit_server.url, livekit_api_key=livekit_server.api_key,
                            livekit_api_secret=livekit_server.api_secret)


# ---- the tests -----------------------------------------------------------------------------------


async def test_livekit_js_sdk_in_chromium(lk_settings: Settings, room: str, livekit_server: Any,
                                          js_sdk: Path, chromium: str) -> None:
    identity = "browser-user"
    attributes = {"role": "caller", "lang": "fr"}
    chat = "bonjour from the browser ✓"
    packet = json.dumps({"kind": "cursor", "x": 12, "y": 34})
    # Binary, several 15 kB stream chunks, every byte value: bytes as they are, not text.
    file_bytes = bytes((i * 131 + 7) % 256 for i in range(70_000))
    plan = {
        "url": livekit_server.url,
        "token": livekit_server.token(identity, room),
        "attributes": attributes, "chat": chat, "packet": packet, "packet_topic": "browser-cursor",
        "file_name": "blob.bin", "file_topic": "browser-files",
    }
    page = Page(js_sdk, plan, file_bytes)
    await page.start()
    workdir = Path(tempfile.mkdtemp(prefix="chromium-"))
    try:
        async with running_bridge(lk_settings, room), browser(chromium, page.url, workdir) as log:
            joined = await page.step("joined", 60, log)
            # livekit-server announces a participant without tracks to the others in a batch, up to
            # 3 s after it is active (subscriberUpdateInterval), unless it changes first: attributes set
            # right after connect() would be in its first announcement, not a change. Change them once
            # the bridge has recorded the join, so the change is an event of its own.
            await replay_until(lk_settings, room, lambda es: bool(of(es, "participant.joined", identity)))
            page.gate("attributes").set()
            await page.step("file", 30, log)

            def arrived(events: list[dict[str, Any]]) -> bool:
                data = of(events, "data", identity)
                return (bool(of(events, "participant.attributes", identity)) and bool(of(events, "chat.message"))
                        and {transport(d) for d in data} >= {"packet", "byte_stream"})

            await replay_until(lk_settings, room, arrived)
            page.gate("leave").set()
            await page.step("left", 20, log)
            events = await replay_until(lk_settings, room, lambda es: bool(of(es, "participant.left", identity)))
    finally:
        await page.close()
        shutil.rmtree(workdir, ignore_errors=True)

    (join,) = of(events, "participant.joined", identity)
    assert join["body"]["sid"] == joined["sid"] and join["body"]["kind"] == "standard"
    assert join["sender"] == {"identity": identity, "kind": "standard"}
    attrs = of(events, "participant.attributes", identity)
    assert attrs[-1]["body"]["attributes"] == attributes
    assert {k: v for a in attrs for k, v in a["body"]["changed"].items()} == attributes

    (message,) = of(events, "chat.message")
    assert message["body"]["text"] == chat and message["body"]["identity"] == identity
    assert message["sender"]["identity"] == identity

    packets = [d for d in of(events, "data", identity) if transport(d) == "packet"]
    assert [(p["body"]["topic"], p["body"]["text"], p["body"]["json"]) for p in packets] == [
        ("browser-cursor", packet, json.loads(packet))]

    (stream,) = [d for d in of(events, "data", identity) if transport(d) == "byte_stream"]
    body = stream["body"]
    assert body["topic"] == "browser-files" and body["size"] == len(file_bytes)
    assert body["attributes"].get("name") == "blob.bin"
    if ref := stream.get("payload"):  # stored beside the log: its reference names size and digest
        assert (ref["size"], ref["sha256"]) == (len(file_bytes), hashlib.sha256(file_bytes).hexdigest())
    else:  # inline, as base64 (it is not UTF-8)
        assert base64.b64decode(body["payload_b64"]) == file_bytes
    assert payload_bytes(lk_settings, room, stream["seq"]) == file_bytes  # byte-exact, wherever it is kept
    assert of(events, "participant.left", identity)


@pytest.fixture
def pion_address(livekit_server: Any) -> Iterator[None]:
    """An address pion will gather on, inside the test namespace, while the Go client runs.

    pion (the Go WebRTC stack of the Go SDK and the ``lk`` CLI) skips every address in 127.0.0.0/8,
    whatever the interface, unless told to include loopback candidates, which the Go SDK does not
    let a caller do; libwebrtc skips only loopback *interfaces*, hence the namespace's veth with
    127.0.0.2. So the veth gets a link-local 169.254.0.0/16 address for the test's length: pion
    gathers a host candidate on it and reaches the server's 127.0.0.2 candidate, both local to
    the namespace, nothing leaves it. Removed afterwards, so no other test sees it.
    """
    if not getattr(livekit_server, "local", False):
        yield  # a real server elsewhere: pion has the machine's own addresses
        return
    assert netns.inside(), "the livekit tests run inside the test network namespace"
    ip = shutil.which("ip", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])) or "ip"
    address = ipaddress.ip_interface("169.254.77.2/32")
    done = subprocess.run([ip, "addr", "add", str(address), "dev", "lk0"], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, f"could not add {address} to the namespace's veth lk0: {done.stderr.strip()}"
    try:
        yield
    finally:
        subprocess.run([ip, "addr", "del", str(address), "dev", "lk0"], check=False, capture_output=True)


async def _step(proc: asyncio.subprocess.Process, name: str, timeout: float = 60.0) -> dict[str, Any]:
    """The Go client's next JSON line on stdout, which must be step ``name``."""
    assert proc.stdout is not None and proc.stderr is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not line:
        err = await proc.stderr.read()
        raise AssertionError(f"lk-data exited with {await proc.wait()} before {name!r}: "
                             f"{err.decode(errors='replace')[-2000:]}")
    step: dict[str, Any] = json.loads(line)
    assert name in step, f"lk-data said {step}, expected {name!r}"
    return step


@pytest.mark.timeout(600)  # on a fresh machine without `make tools`, go_client first builds lk-data (minutes)
async def test_livekit_go_sdk(lk_settings: Settings, room: str, livekit_server: Any, go_client: str,
                              pion_address: None) -> None:
    identity = "go-sender"
    topic = "go-telemetry"
    env = {**os.environ, "LIVEKIT_URL": livekit_server.url, "LIVEKIT_TOKEN": livekit_server.token(identity, room)}
    async with running_bridge(lk_settings, room):
        proc = await asyncio.create_subprocess_exec(
            go_client, "-topic", topic, "-payload", "reading 1", "-count", "3", env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdout is not None and proc.stdin is not None
        try:
            joined = await _step(proc, "joined")
            # A participant without tracks is announced to the others up to 3 s after it is active (see
            # above), but its data is forwarded at once; the Rust core of the Python SDK drops the sender
            # of a packet from a participant it does not know yet, so the bridge would record these
            # packets without a sender (seen every time when sent at once). Send once the join is recorded.
            await replay_until(lk_settings, room, lambda es: bool(of(es, "participant.joined", identity)))
            proc.stdin.write(b"send\n")
            await _step(proc, "sent")
            await replay_until(lk_settings, room, lambda es: len(of(es, "data", identity)) >= 3)
            proc.stdin.close()
            assert await asyncio.wait_for(proc.wait(), 20) == 0
            events = await replay_until(lk_settings, room, lambda es: bool(of(es, "participant.left", identity)))
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    (join,) = of(events, "participant.joined", identity)
    assert join["body"]["sid"] == joined["sid"] and join["sender"] == {"identity": identity, "kind": "standard"}
    packets = of(events, "data", identity)
    assert [(p["body"]["topic"], transport(p), p["body"]["text"]) for p in packets] == [
        (topic, "packet", "reading 1"), (topic, "packet", "reading 1 #1"), (topic, "packet", "reading 1 #2")]
    assert all(p["sender"] == {"identity": identity, "kind": "standard"} for p in packets)
