"""Security (issue 7, section 4): a bridge's logs carry no transcript or chat text and no identity.

Participants publish final and interim ``lk.transcription`` segments (one-shot and incremental
streams), ``lk.chat`` messages, a seed status packet, a malformed chat stream and invalid JSON on
the ``ledger`` topic (those take the bridge's warning paths), and change their attributes, all
with distinctive words and identities. The log (``Ledger.read``) must hold the transcripts and
chat; the bridge's logging output must hold none of the words nor the identities.

Two ways of catching "all log output":

* ``ledger bridge --room`` as a real process, with every logger at DEBUG (root logging
  configured before the CLI runs, ``--debug``, ``RUST_LOG=debug``), then ``SIGINT``: its whole
  stderr and stdout are checked (for the words, and for their hex bytes as in libwebrtc's packet
  dumps), and the stats files it leaves under ``LEDGER_HOME``. Once more with
  ``LIVEKIT_RTC_DEBUG=1`` (the livekit core's own debug logs forwarded too): libwebrtc's
  ``text_pcap_packet_observer`` then dumps every SCTP packet, payloads included, and the bridge
  must filter those records out.
* ``run_bridge`` in this process under ``caplog`` at DEBUG: every record of the product's
  loggers (``bridge``, ``ledger``, ``projections``, ``cli``). The livekit SDK's own records are
  not checked here, because the test's participants share this process and log their own
  identities; the subprocess case covers the SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from room_ledger.bridge.worker import run_bridge
from room_ledger.client import Ledger, Record
from room_ledger.settings import Settings
from room_ledger.watch import RoomWatch as Log

pytestmark = pytest.mark.livekit

REPO = Path(__file__).resolve().parents[1]
PRODUCT_LOGGERS = ("bridge", "ledger", "projections", "cli")

#: Runs the real CLI with the root logger at DEBUG on stderr (what an operator who turns logging
#: all the way up would see).
VERBOSE_CLI = (
    "import logging, sys\n"
    "logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,\n"
    "                    format='%(levelname)s %(name)s: %(message)s')\n"
    "from room_ledger.cli.main import app\n"
    "sys.argv[0] = 'ledger'\n"
    "app()\n"
)




class Secrets:
    """Distinctive words and identities of one test, and the check that none leaked."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.caller = f"caller-{tag}-Ulrike"
        self.agent = f"agent-{tag}-Tobermory"
        self.final_user = f"my account number is 4417 marmalade {tag} quokka"
        self.interim_user = f"my account number is 4417 {tag} platypus"
        self.final_agent = ["certainly, ", f"your balance is {tag} narwhal euros."]
        self.chat = f"please call me back at {tag} axolotl avenue"
        self.bad_chat_word = f"{tag}wombat"
        self.bad_ledger_word = f"{tag}pangolin"
        self.attribute_value = f"{tag}-capybara"
        self.task = f"refund for {tag} okapi"

    def words(self) -> list[str]:
        """Every piece that must never reach a log line (identities included)."""
        return [self.caller, self.agent, self.final_user, self.interim_user, "".join(self.final_agent),
                self.final_agent[1], self.chat, self.bad_chat_word, self.bad_ledger_word,
                self.attribute_value, self.task,
                # the most distinctive single words too, in case a log line cut or re-joined them
                "marmalade", "platypus", "narwhal", "axolotl", "quokka", "wombat", "pangolin", "capybara",
                "okapi", "Ulrike", "Tobermory"]

    def assert_absent(self, text: str, where: str) -> None:
        lowered = text.lower()
        # plain, and as the space-separated hex bytes of libwebrtc's packet dumps
        leaked = [w for w in self.words() if w in text or _hex(w) in lowered]
        if leaked:
            lines = [line for line in text.splitlines() if any(w in line for w in leaked)]
            raise AssertionError(f"{where} leaks {leaked}:\n" + "\n".join(lines[:20]))


def _hex(word: str) -> str:
    return " ".join(f"{b:02x}" for b in word.encode("utf-8"))


async def speak(secrets: Secrets, caller: Any, agent: Any) -> None:
    """Everything private the room says, through the real SDK."""
    lp = agent.local_participant
    # the user's speech, transcribed by the agent: an interim segment, then the final one
    await lp.send_text(secrets.interim_user, topic="lk.transcription",
                       attributes={"lk.segment_id": "SG_u1", "lk.transcription_final": "false"})
    await lp.send_text(secrets.final_user, topic="lk.transcription",
                       attributes={"lk.segment_id": "SG_u1", "lk.transcription_final": "true"})
    # the agent's own speech: incremental, final flag in the trailer
    writer = await lp.stream_text(topic="lk.transcription", attributes={"lk.segment_id": "SG_a1"})
    for piece in secrets.final_agent:
        await writer.write(piece)
    await writer.aclose(attributes={"lk.transcription_final": "true"})
    await caller.local_participant.send_text(secrets.chat, topic="lk.chat")
    # warning paths of the bridge: chat that is not UTF-8, a ledger-topic packet that is not JSON
    await caller.local_participant.send_bytes(b"\xff\xfe " + secrets.bad_chat_word.encode(), name="x",
                                              topic="lk.chat")
    await lp.publish_data(b"{not json " + secrets.bad_ledger_word.encode(), reliable=True, topic="ledger")
    await lp.publish_data(
        f'{{"agent_id": "{secrets.agent}", "status": "processing", "action_lock": true, '
        f'"task": "{secrets.task}"}}'.encode(), reliable=True, topic="agent-state")
    await caller.local_participant.set_attributes({"note": secrets.attribute_value})


async def assert_log_holds_it(ledger: Ledger, room: str, secrets: Secrets) -> None:
    records = [r async for r in ledger.read(room)]
    transcripts = [(r.event.body.speaker, r.event.body.text) for r in records  # type: ignore[union-attr]
                   if r.type == "transcript"]
    assert transcripts == [(secrets.agent, secrets.final_user), (secrets.agent, "".join(secrets.final_agent))]
    chats = [(r.event.sender.identity, r.event.body.text) for r in records  # type: ignore[union-attr]
             if r.type == "chat.message"]
    assert chats == [(secrets.caller, secrets.chat)]
    statuses = [r.event.body.task for r in records if r.type == "agent.status"]  # type: ignore[union-attr]
    assert statuses == [secrets.task]


def _done(secrets: Secrets) -> Callable[[list[Record]], bool]:
    def done(records: list[Record]) -> bool:
        types = [r.type for r in records]
        return (types.count("transcript") >= 2 and "chat.message" in types and "agent.status" in types
                and types.count("data") >= 2 and "participant.attributes" in types)

    return done


@pytest.fixture
def bridge_home() -> Any:
    path = Path(tempfile.mkdtemp(prefix="ledger-privacy-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("rtc_debug", [
    pytest.param(False, id="debug"),
    # With LIVEKIT_RTC_DEBUG=1 libwebrtc dumps every SCTP packet in hex through the 'livekit'
    # logger; the bridge filters those records out (room_ledger/bridge/worker.py).
    pytest.param(True, id="debug+LIVEKIT_RTC_DEBUG"),
])
async def test_bridge_process_logs_at_debug_hold_no_transcript_chat_or_identity(
        settings: Settings, ledger: Ledger, room: str, livekit_server: Any, livekit_connect: Any,
        bridge_home: Path, rtc_debug: bool) -> None:
    secrets = Secrets()
    log = Log(ledger, room)
    env = {
        **os.environ,
        "LIVEKIT_URL": livekit_server.url, "LIVEKIT_API_KEY": livekit_server.api_key,
        "LIVEKIT_API_SECRET": livekit_server.api_secret,
        "LEDGER_NATS_URL": ",".join(settings.nats_urls or ()), "LEDGER_HOME": str(bridge_home),
        "LEDGER_STREAM": settings.stream, "LEDGER_SUBJECT_PREFIX": settings.subject_prefix,
        "LEDGER_DEBUG": "1", "LIVEKIT_RTC_DEBUG": "1" if rtc_debug else "", "RUST_LOG": "debug",
        "PYTHONPATH": str(REPO),
    }
    # Files, not pipes: a bridge logging at debug writes more than a pipe holds before anyone reads
    # it, and a process blocked on a full pipe records nothing more (the test timed out so).
    out_path, err_path = bridge_home / "bridge.out", bridge_home / "bridge.err"
    with out_path.open("wb") as out_file, err_path.open("wb") as err_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", VERBOSE_CLI, "--debug", "bridge", "--room", room, env=env, cwd=REPO,
            stdout=out_file, stderr=err_file,
            # Ctrl-C as a terminal sends it (a suite run in a script's background ignores SIGINT)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # A bridge logging every SCTP packet is slow on a loaded machine: deadlines are generous.
    try:
        await log.until(lambda rs: any(r.type == "bridge.joined" for r in rs), 60)
        caller = await livekit_connect(secrets.caller, room, name=secrets.caller)
        agent = await livekit_connect(secrets.agent, room, kind="agent", name=secrets.agent)
        await log.until(lambda rs: len([r for r in rs if r.type == "participant.joined"]) >= 2, 60)
        await speak(secrets, caller, agent)
        await log.until(_done(secrets), 60)
        await caller.disconnect()
        await log.until(lambda rs: any(r.type == "participant.left" for r in rs), 60)
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 60)
        out, err = out_path.read_bytes(), err_path.read_bytes()
        assert proc.returncode == 0, err.decode(errors="replace")[-4000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await log.close()
    stderr = err.decode("utf-8", errors="replace")
    # the capture is real: the CLI's, the bridge's and the SDK's own debug lines are in it
    assert "bridge stopped:" in stderr and "bridge.worker: bridge: in room" in stderr, stderr[-2000:]
    assert "DEBUG" in stderr
    secrets.assert_absent(stderr, "the bridge's stderr")
    secrets.assert_absent(out.decode("utf-8", errors="replace"), "the bridge's stdout")
    for path, text in await asyncio.to_thread(_files, bridge_home):
        secrets.assert_absent(text, path)
    await assert_log_holds_it(ledger, room, secrets)


def _files(home: Path) -> list[tuple[str, str]]:
    """What the bridge left under its LEDGER_HOME (stats files), as text."""
    return [(str(p.relative_to(home)), p.read_text(errors="replace")) for p in home.rglob("*") if p.is_file()]


@contextlib.asynccontextmanager
async def in_process_bridge(settings: Settings, room: str, log: Log) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_bridge(settings, room=room, stop=stop, flush_deadline=5.0))
    try:
        await log.until(lambda rs: any(r.type == "bridge.joined" for r in rs), 30)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_in_process_bridge_debug_records_hold_no_transcript_chat_or_identity(
        settings: Settings, ledger: Ledger, room: str, livekit_server: Any, livekit_connect: Any,
        bridge_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    secrets = Secrets()
    lk_settings = settings.replace(livekit_url=livekit_server.url, livekit_api_key=livekit_server.api_key,
                                   livekit_api_secret=livekit_server.api_secret, home=bridge_home)
    log = Log(ledger, room)
    caplog.set_level(logging.DEBUG)
    try:
        async with in_process_bridge(lk_settings, room, log):
            caller = await livekit_connect(secrets.caller, room, name=secrets.caller)
            agent = await livekit_connect(secrets.agent, room, kind="agent", name=secrets.agent)
            await log.until(lambda rs: len([r for r in rs if r.type == "participant.joined"]) >= 2)
            await speak(secrets, caller, agent)
            await log.until(_done(secrets))
            await agent.disconnect()
            await log.until(lambda rs: any(r.type == "participant.left" for r in rs))
    finally:
        await log.close()
    ours = [r for r in caplog.records if r.name.split(".")[0] in PRODUCT_LOGGERS]
    assert any(r.name == "bridge.worker" for r in ours), "the bridge's own records were not captured"
    text = "\n".join(f"{r.levelname} {r.name}: {r.getMessage()} {r.exc_text or ''}" for r in ours)
    secrets.assert_absent(text, "the product's log records")
    await assert_log_holds_it(ledger, room, secrets)
