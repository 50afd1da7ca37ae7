"""Helpers shared by the CLI tests (no tests here): run ``ledger`` with CliRunner against real servers, seed rooms."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from typer.testing import CliRunner, Result

from room_ledger import events as ev
from room_ledger.cli.main import app
from room_ledger.client import Ledger, Position
from room_ledger.settings import Settings

T0 = datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)
TRIAGE = ev.Sender("triage", "agent")
BILLING = ev.Sender("billing", "agent")
USER = ev.Sender("user-1", "standard")


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    env = {
        "LEDGER_NATS_URL": ",".join(settings.nats_urls or ()),
        "LEDGER_HOME": str(settings.home),
        "LEDGER_STREAM": settings.stream,
        "LEDGER_DATABASE_URL": settings.database_url or "",
        "COLUMNS": "200",
    }
    env.update(extra)
    return env


def invoke(settings: Settings, args: Sequence[str], *, input: str | None = None, **extra: str) -> Result:
    runner = CliRunner()
    return runner.invoke(app, list(args), env=env_for(settings, **extra), input=input, catch_exceptions=False)


def ok(settings: Settings, args: Sequence[str], **extra: str) -> Result:
    result = invoke(settings, args, **extra)
    assert result.exit_code == 0, result.output
    return result


def json_of(result: Result) -> Any:
    return json.loads(result.stdout)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def scripted_events(room: str) -> list[ev.KnownEvent]:
    """A small room: a floor claim, a queued claim, speech, a handoff with 4.5 s of dead air, a gap."""
    e = ev.make_event
    return [
        e(room, ev.ParticipantJoined(identity="user-1", kind="standard"), sender=USER, at=at(0)),
        e(room, ev.ParticipantJoined(identity="triage", kind="agent"), sender=TRIAGE, at=at(0.1)),
        e(room, ev.ParticipantJoined(identity="billing", kind="agent"), sender=BILLING, at=at(0.2)),
        e(room, ev.FloorRequest(agent_id="triage", task="greet"), sender=TRIAGE, at=at(0.5)),
        # (a transcript's at: its stream opened; observed_at: its final segment reached the bridge)
        e(room, ev.Transcript(speaker="triage", text="Hello, how can I help?", segment_id="s1"),
          sender=TRIAGE, at=at(1), observed_at=at(1)),
        e(room, ev.AgentStatus(agent_id="billing", status="processing", action_lock=True, task="refund"),
          sender=BILLING, at=at(2)),
        e(room, ev.SessionPatch(patch={"caller_name": "Ann", "account": {"id": 3}}), sender=TRIAGE, at=at(2.5)),
        e(room, ev.Transcript(speaker="user-1", text="I was charged twice.", segment_id="s2"),
          sender=TRIAGE, at=at(3)),
        e(room, ev.Handoff(from_agent="triage", to_agent="billing", reason="billing question"),
          sender=TRIAGE, at=at(4)),
        e(room, ev.Transcript(speaker="billing", text="Billing here, I see the double charge.", segment_id="s3"),
          sender=BILLING, at=at(5.5), observed_at=at(6)),
        e(room, ev.BridgeGap(bridge_id="b1", started_at=at(6), ended_at=at(9), reason="reconnect"), at=at(9)),
        e(room, ev.FloorRelease(agent_id="billing", reason="done"), sender=BILLING, at=at(10)),
    ]


async def _append(settings: Settings, events: list[ev.KnownEvent]) -> list[Position]:
    async with Ledger(settings) as ledger:
        return await ledger.append_many(events)


def seed(settings: Settings, room: str, events: list[ev.KnownEvent] | None = None) -> list[int]:
    """Append the scripted room (or ``events``); returns their stream sequences."""
    positions = asyncio.run(_append(settings, events if events is not None else scripted_events(room)))
    return [p.seq for p in positions]


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)
