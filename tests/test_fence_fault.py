"""The fence on the real livekit-server (issue 23): an owner paused with SIGSTOP while its call is
handed on, then resumed with SIGCONT, writes a session patch, a floor claim and a status. None of
them changes the state any reader folds, each is recorded as rejected (``ledger replay`` shows it),
and once its followed log catches up its helpers raise ``Superseded``.

The owner is ``tests/fence_owner.py``, a process holding a ``LedgerAgent`` on its own room
connection; the handoff is made by another process of the same agent id (as a recovery would),
and the successor is a ``LedgerAgent`` resuming from the handoff as ``LedgerLink.resume`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from room_ledger import events as ev
from room_ledger.agents import LedgerAgent
from room_ledger.cli.replay import replay_ndjson
from room_ledger.client import Ledger, Record
from room_ledger.hydrate import hydrate
from room_ledger.settings import Settings
from room_ledger.state import RoomState, fold
from room_ledger.watch import RoomWatch as Log
from room_ledger.window import Window
from tests import processes
from tests.fence_owner import AGENT_ID, STALL_S
from tests.test_bridge_livekit import lk_settings, running_bridge  # noqa: F401

pytestmark = [pytest.mark.livekit, pytest.mark.fault]

REPO = Path(__file__).resolve().parent.parent
#: How long the owner stays stopped: past its stall detector, like a long GC pause or a frozen container.
PAUSE_S = STALL_S + 1.5
FENCED = {"session.patch", "floor.request", "agent.status"}


def tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


async def report(proc: asyncio.subprocess.Process, key: str, timeout: float, output: Path) -> Any:
    """The owner's next report line with ``key`` (its stderr is in ``output`` if it ends first)."""
    assert proc.stdout is not None
    async with asyncio.timeout(timeout):
        while True:
            line = await proc.stdout.readline()
            if not line:
                raise AssertionError(f"the owner exited ({await proc.wait()}) before reporting {key!r}:\n"
                                     f"{tail(output)}")
            data = json.loads(line)
            if key in data:
                return data


def without_rejections(state: RoomState) -> dict[str, Any]:
    """The state as every reader uses it: all but the index and the record of rejections."""
    data: dict[str, Any] = msgspec.to_builtins(state)
    data.pop("index")
    data["ownership"].pop("rejected", None)
    return data


async def test_a_paused_owner_resumed_after_a_handoff_changes_nothing_and_is_told_superseded(
        lk_settings: Settings, ledger: Ledger, room: str, livekit_server: Any, livekit_connect: Any,
        tmp_path: Path) -> None:
    log = Log(ledger, room)
    output = tmp_path / "owner.log"
    env = {**os.environ, "LIVEKIT_URL": livekit_server.url,
           "FENCE_OWNER_TOKEN": livekit_server.token("triage-1", room, kind="agent"),
           "LEDGER_NATS_URL": ",".join(lk_settings.nats_urls or ()), "LEDGER_HOME": str(lk_settings.home),
           "LEDGER_STREAM": lk_settings.stream, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("LEDGER_DATABASE_URL", None)
    # a caller keeps the room open (a room of agents only is closed after its empty_timeout)
    await livekit_connect("caller", room)
    async with running_bridge(lk_settings, room), Ledger(lk_settings) as own:
        with output.open("ab") as stderr:
            owner = await processes.start(sys.executable, "-m", "tests.fence_owner", room, env=env,
                                          stdout=subprocess.PIPE, stderr=stderr, cwd=REPO)
        try:
            ready = (await report(owner, "ready", 90, output))["ready"]
            epoch = ready["epoch"]
            recovery = LedgerAgent(await livekit_connect("triage-2", room, kind="agent"), own, agent_id=AGENT_ID)
            successor = LedgerAgent(await livekit_connect("billing-1", room, kind="agent"), own, agent_id="billing")
            await recovery.start()
            await successor.start()
            assert successor.state.floor.holder == AGENT_ID
            assert successor.state.ownership.epoch_of(AGENT_ID) == epoch

            paused = time.monotonic()
            owner.send_signal(signal.SIGSTOP)
            handoff_id = await recovery.publish("handoff", ev.Handoff(from_agent=AGENT_ID, to_agent="billing",
                                                                      reason="the owner stopped answering"))
            handoff_seq = await successor.wait_for_event(handoff_id, 15)
            assert successor.state.ownership.epoch_of("billing") == handoff_seq
            successor.adopt_epoch(handoff_seq)  # as LedgerLink.resume does, from the dispatch's ledger_seq
            await successor.request_floor(task="took over")
            patched = await successor.patch_session({"billing": True})
            await successor.wait_for_event(patched, 15)
            await successor.wait_for_floor(timeout=15)
            # A stall of a fixed length is the fault itself (a GC pause, a frozen container).
            await asyncio.sleep(max(0.0, PAUSE_S - (time.monotonic() - paused)))
            owner.send_signal(signal.SIGCONT)

            woke = (await report(owner, "woke", 30, output))["woke"]
            sent: dict[str, str] = woke["sent"]
            # What it sent before its followed log caught up, and what its helpers refused already:
            # all three tried, its first at least on its way before it could know.
            assert set(sent) | set(woke["refused"]) == FENCED and "session.patch" in sent, woke
            assert all(why.startswith("Superseded: ") for why in woke["refused"].values()), woke
            await log.until(lambda rs: set(sent.values()) <= {r.event.id for r in rs}, timeout=20,
                            what="the paused owner's writes")

            told = await report(owner, "superseded", 30, output)
            assert told["all_superseded"], told
            assert set(told["superseded"]) == FENCED
            assert all(f"agent {AGENT_ID!r} in room {room!r} owned its call at epoch {epoch}" in why
                       for why in told["superseded"].values()), told
            # (its exit status is not checked: the FFI has been seen to abort at exit, tests/README.md)
        except BaseException:
            # what the log and the owner saw, for a failure on a loaded machine
            print("the log:", [(r.seq, r.type, r.event.sender.identity) for r in log.records], "\nthe owner:",
                  tail(output))
            raise
        finally:
            if owner.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    owner.send_signal(signal.SIGCONT)
            await processes.stop(owner)
        await recovery.stop()
        await successor.stop()

    records: list[Record] = [r async for r in ledger.read(room)]
    stale = {r.seq: r for r in records if r.event.id in set(sent.values())}
    state = fold(records)
    # 0 of its writes changed the state: folding the log without them gives the same state
    assert without_rejections(state) == without_rejections(fold([r for r in records if r.seq not in stale]))
    assert state.session == {"caller": "Ana", "billing": True}
    assert state.floor.holder == "billing" and AGENT_ID not in [c.agent_id for c in state.floor.queue]
    # each recorded as rejected: its sequence, agent, type, epoch and why
    assert sorted((r.seq, r.agent_id, r.kind, r.epoch) for r in state.ownership.rejected) == sorted(
        (seq, AGENT_ID, r.type, epoch) for seq, r in stale.items())
    assert all(r.reason == f"{AGENT_ID!r} handed the call to 'billing' at {handoff_seq}"
               for r in state.ownership.rejected)
    assert state.index.rejected == len(stale)
    # and nothing else of that epoch reached the log after it woke: the helpers refused the rest
    of_epoch = [r for r in records if r.type in FENCED and getattr(getattr(r.event, "body", None), "epoch", None) == epoch]
    assert [r.seq for r in of_epoch if r.seq > handoff_seq] == sorted(stale)
    # every reader agrees: hydration (from the log here) and `ledger replay --json`
    snapshot = await hydrate(ledger, room)
    assert [r.seq for r in snapshot.state.ownership.rejected] == sorted(stale)
    out = io.BytesIO()
    await replay_ndjson(ledger, room, Window(), out=out)
    marked = [json.loads(line) for line in out.getvalue().splitlines() if b'"rejected"' in line]
    assert [line["seq"] for line in marked] == sorted(stale)
    await log.close()
