"""Runs examples/handoff's workers for tests: each an AgentServer in its own process, on the real server.

``ExampleWorkers`` starts ``examples/handoff/{triage,billing}.py`` as subprocesses registered under
this test's own agent names (the livekit-server is shared by the session: another test's worker
must never get our job), waits until the server's log shows each registered, and stops them
(SIGTERM, then SIGKILL) at the end. The workers run in child processes, so ``AgentServer.run``
writing ``LIVEKIT_*`` into ``os.environ`` never touches the test process.  ``Replies`` collects what
the agents say on ``lk.transcription``, as the caller receives it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from livekit import api, rtc

from room_ledger.settings import Settings
from tests import processes
from tests.livekit.server import http_url

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "handoff"


@dataclass
class Reply:
    identity: str
    agent: str
    text: str
    #: On the caller's clock: when the reply's stream opened, and when it had all of it.
    started: float = field(default=0.0, compare=False)
    ended: float = field(default=0.0, compare=False)


class Replies:
    """The agents' replies on ``lk.transcription`` as the caller receives them, in order."""

    def __init__(self, room: rtc.Room) -> None:
        self.room = room
        self.all: list[Reply] = []
        self._queue: asyncio.Queue[Reply] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        room.register_text_stream_handler("lk.transcription", self._on_stream)

    def _on_stream(self, reader: rtc.TextStreamReader, identity: str) -> None:
        task = asyncio.create_task(self._read(reader, identity, time.time()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self, reader: rtc.TextStreamReader, identity: str, started: float) -> None:
        text = await reader.read_all()
        ended = time.time()
        if text.strip():
            reply = Reply(identity, await self._agent_name(identity), text, started, ended)
            self.all.append(reply)
            self._queue.put_nowait(reply)

    async def _agent_name(self, identity: str, timeout: float = 10.0) -> str:
        """The ``lk.agent_name`` attribute LiveKit gives a dispatched agent (it can come a moment late)."""
        changed = asyncio.Event()

        def on_change(*_: Any) -> None:
            changed.set()

        # the server can announce the participant (and its attributes) after its first stream
        self.room.on("participant_attributes_changed", on_change)
        self.room.on("participant_connected", on_change)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    participant = self.room.remote_participants.get(identity)
                    name = participant.attributes.get("lk.agent_name", "") if participant else ""
                    if name:
                        return name
                    changed.clear()
                    await changed.wait()
        except TimeoutError:
            return ""
        finally:
            self.room.off("participant_attributes_changed", on_change)
            self.room.off("participant_connected", on_change)

    async def next(self, timeout: float = 30.0) -> Reply:
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            raise AssertionError(f"no reply within {timeout:g}s; so far {self.all}") from None


@dataclass
class ExampleWorkers:
    settings: Settings
    livekit: Any
    workdir: Path
    triage: str = field(default_factory=lambda: f"triage-{uuid.uuid4().hex[:8]}")
    billing: str = field(default_factory=lambda: f"billing-{uuid.uuid4().hex[:8]}")
    procs: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            **os.environ,
            "LIVEKIT_URL": self.livekit.url, "LIVEKIT_API_KEY": self.livekit.api_key,
            "LIVEKIT_API_SECRET": self.livekit.api_secret,
            "LEDGER_NATS_URL": ",".join(self.settings.nats_urls or ()), "LEDGER_HOME": str(self.settings.home),
            "LEDGER_STREAM": self.settings.stream,
            "HANDOFF_TRIAGE_AGENT": self.triage, "HANDOFF_BILLING_AGENT": self.billing,
            "HANDOFF_TRACE": str(self.workdir), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
            "HANDOFF_LEDGER_LOG_LEVEL": "DEBUG",
        }
        env.pop("LEDGER_DATABASE_URL", None)
        env.update(extra)
        return env

    async def start(self, which: str, *, key: str | None = None, **extra: str) -> None:
        """Start ``triage`` or ``billing`` and wait until the server has registered it.

        ``key``: its name in :attr:`procs` and of its log (default ``which``; another key starts
        a second worker under the same agent name)."""
        name = self.triage if which == "triage" else self.billing
        mark = self.livekit.log_mark()
        key = key or which
        with (self.workdir / f"{key}.log").open("ab") as log:
            self.procs[key] = await processes.start(
                sys.executable, str(EXAMPLE / f"{which}.py"), env=self.env(**extra), stdout=log,
                stderr=subprocess.STDOUT, cwd=REPO)
        which = key
        registered = asyncio.ensure_future(self.livekit.worker_registered(name, 60, after=mark))
        while not registered.done():
            await asyncio.wait({registered}, timeout=0.5)
            if self.procs[which].returncode is not None and not registered.done():
                registered.cancel()
                raise AssertionError(f"{which} exited with {self.procs[which].returncode} before registering:\n"
                                     f"{self.output(which)}")
        registered.result()

    def output(self, which: str) -> str:
        path = self.workdir / f"{which}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    async def dispatch(self, room: str, agent_name: str, metadata: str = "") -> str:
        async with api.LiveKitAPI(http_url(self.livekit.url), self.livekit.api_key, self.livekit.api_secret) as lk:
            dispatch = await lk.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(agent_name=agent_name, room=room, metadata=metadata))
        return str(dispatch.id)

    def trace(self, which: str) -> list[dict[str, Any]]:
        """Every request the worker's scripted LLM got, in order."""
        name = self.triage if which == "triage" else self.billing
        path = self.workdir / f"{name}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    async def stop(self) -> None:
        """Each worker and every process it started (a job process pool, with HANDOFF_EXECUTOR=process)."""
        await asyncio.gather(*(processes.stop(proc) for proc in self.procs.values()))


@pytest.fixture
async def workers(lk_settings: Settings, livekit_server: Any, tmp_path: Path) -> AsyncIterator[ExampleWorkers]:
    """The example's workers for one test (import it by name with ``lk_settings``), stopped after it."""
    w = ExampleWorkers(lk_settings, livekit_server, tmp_path)
    try:
        yield w
    finally:
        await w.stop()
