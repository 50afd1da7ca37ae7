"""What people see is true: after a handoff, or once the holder left, no view shows a lock the agent lost.

``ledger state``, ``ledger replay --html`` and ``ledger serve`` all derive a participant's status
through ``web.roomview.participant_views``; the room here is folded from the real log (NATS).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from room_ledger import events as ev
from room_ledger.settings import Settings
from tests.test_cli_helpers import BILLING, TRIAGE, USER, at, ok, run_async, seed


def _handoff_room(room: str) -> list[ev.KnownEvent]:
    e = ev.make_event
    return [
        e(room, ev.ParticipantJoined(identity="user-1", kind="standard"), sender=USER, at=at(0)),
        e(room, ev.ParticipantJoined(identity="triage", kind="agent"), sender=TRIAGE, at=at(0.1)),
        e(room, ev.ParticipantJoined(identity="billing", kind="agent"), sender=BILLING, at=at(0.2)),
        e(room, ev.AgentStatus(agent_id="triage", status="processing", action_lock=True, task="greet"),
          sender=TRIAGE, at=at(1)),
        e(room, ev.Handoff(from_agent="triage", to_agent="billing", reason="billing question"),
          sender=TRIAGE, at=at(2)),
        e(room, ev.AgentStatus(agent_id="billing", status="processing", action_lock=True, task="refund"),
          sender=BILLING, at=at(3)),
        e(room, ev.AgentStatus(agent_id="scribe", status="processing", action_lock=True, task="notes"),
          sender=ev.Sender("scribe", "agent"), at=at(4)),
    ]


def test_after_a_handoff_the_source_agent_shows_no_lock(settings: Settings, room: str, tmp_path: Path) -> None:
    from room_ledger.client import Ledger
    from room_ledger.web.roomview import ParticipantView, collect, participant_views

    seqs = seed(settings, room, _handoff_room(room))

    async def views() -> dict[str, ParticipantView]:
        async with Ledger(settings) as ledger:
            page = await collect(ledger, room)
        return {v.identity: v for v in participant_views(page.state)}

    by_id: dict[str, ParticipantView] = run_async(views())
    triage, billing, scribe = by_id["triage"], by_id["billing"], by_id["scribe"]
    # The log says triage last sent processing + lock; the floor went to billing at the handoff.
    assert triage.status_sent == "processing" and triage.lock == ""
    assert triage.note == f"floor passed on: handed the caller off at #{seqs[4]}"
    assert triage.status == "processing (no lock)"
    assert billing.lock == "holds" and billing.note == ""
    assert scribe.lock == "queued" and scribe.status == "processing"

    # The HTML report: one lock icon, billing's; triage's row says why it has none.
    page = tmp_path / "room.html"
    ok(settings, ["replay", room, "--html", str(page)])
    html = page.read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"<tr><td>([^<]+)</td>.*?</tr>", html)}
    assert "🔒" in rows["billing"] and "🔒" not in rows["triage"]
    assert "handed the caller off" in rows["triage"] and "processing (no lock)" in rows["triage"]
    assert "queued" in rows["scribe"]
    assert html.count("🔒") == 1

    # `ledger state`: the lock column says lock only for billing.
    out = ok(settings, ["state", room]).stdout
    cells = [line.strip("│ ").split() for line in out.splitlines()]
    lines = {c[0]: " ".join(c) for c in cells if c and c[0] in by_id}
    assert lines["billing"].endswith("refund lock") and "greet lock" not in lines["triage"], out
    assert "handed the caller off" in lines["triage"]
    # `ledger state --json`: lock is the truth now; what the last packet claimed is lock_sent.
    people = json.loads(ok(settings, ["state", room, "--json"]).stdout)["participants"]
    assert people["triage"]["lock"] is False and people["triage"]["lock_sent"] is True
    assert people["triage"]["note"].startswith("floor passed on: handed the caller off")
    assert people["billing"]["lock"] is True and people["scribe"]["queued"] is True


def test_an_agent_that_left_holds_nothing(settings: Settings, room: str) -> None:
    from room_ledger.client import Ledger
    from room_ledger.web.roomview import ParticipantView, collect, participant_views

    e = ev.make_event
    seqs = seed(settings, room, [
        e(room, ev.ParticipantJoined(identity="triage", kind="agent"), sender=TRIAGE, at=at(0)),
        e(room, ev.AgentStatus(agent_id="triage", status="processing", action_lock=True), sender=TRIAGE, at=at(1)),
        e(room, ev.ParticipantLeft(identity="triage"), sender=TRIAGE, at=at(2)),
    ])

    async def views() -> list[ParticipantView]:
        async with Ledger(settings) as ledger:
            return list(participant_views((await collect(ledger, room)).state))

    (triage,) = run_async(views())
    assert triage.present is False and triage.lock == ""
    assert triage.note == f"floor passed on: left the room at #{seqs[2]}"
