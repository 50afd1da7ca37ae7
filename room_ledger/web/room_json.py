"""What a room looks like as JSON: a timeline line per event, and the room page's whole view.

The view is the same derivation as ``ledger replay --html`` (:mod:`room_ledger.web.roomview`);
its lanes are the report's SVG, escaped there (:mod:`room_ledger.web.html`).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from room_ledger import events as ev
from room_ledger.client import Record
from room_ledger.web.html import floor_svg, speech_svg
from room_ledger.web.roomview import PageData, item_text, participant_views
from room_ledger.words import event_time, summary

#: Items of the conversation and session changes sent with a view (the latest ones).
VIEW_ITEMS: Final = 150


def record_json(record: Record) -> dict[str, Any]:
    """One timeline line: the event in words, with what the page needs to place and colour it."""
    event = record.event
    return {
        "seq": record.seq,
        "time": event_time(record).isoformat(),
        "type": ev.event_type(event),
        "sender": event.sender.identity,
        "kind": event.sender.kind,
        "text": summary(event),
    }


def view_json(page: PageData, *, live: bool) -> dict[str, Any]:
    """What the room page shows: the same derivation as ``ledger replay --html`` (room_ledger/web/roomview.py)."""

    state = page.state
    timeline = page.floor
    index = state.index
    floor = state.floor
    conversation = state.conversation[-VIEW_ITEMS:]
    return {
        "room": page.room,
        "live": live,
        "seq": state.seq,
        "events": index.events,
        "first_seq": index.first_seq,
        "last_seq": index.last_seq,
        "last_activity": index.last_activity.isoformat() if index.last_activity else None,
        "start": timeline.start.isoformat() if timeline.start else None,
        "end": timeline.end.isoformat() if timeline.end else None,
        "floor": {
            "holder": floor.holder, "task": floor.task, "since_seq": floor.since_seq,
            "queue": [{"agent_id": c.agent_id, "task": c.task, "seq": c.seq} for c in floor.queue],
        },
        "floor_svg": floor_svg(timeline),
        "speech_svg": speech_svg(page.speech),
        "speech": [{"speaker": s.speaker, "start": s.start.isoformat(), "end": s.end.isoformat(), "text": s.text}
                   for s in page.speech[-VIEW_ITEMS:]],
        "tenures": [
            {"holder": t.holder, "task": t.task, "start_seq": t.start_seq, "start": t.start_time.isoformat(),
             "end_seq": t.end_seq, "end": t.end_time.isoformat() if t.end_time else None,
             "end_reason": t.end_reason}
            for t in timeline.tenures
        ],
        "handoffs": msgspec.to_builtins([h.to_builtins() for h in page.handoffs]),
        "participants": [p.to_builtins() for p in participant_views(state)],
        "conversation": [
            {"seq": i.seq, "time": i.time.isoformat(), "role": i.role or i.type, "speaker": i.speaker,
             "text": item_text(i)}
            for i in conversation
        ],
        "conversation_total": page.conversation_total,
        "session": msgspec.to_builtins(state.session),
        "session_version": state.session_version,
        "session_changes": [
            {"seq": c.seq, "time": c.time.isoformat(), "sender": c.sender, "patch": msgspec.to_builtins(c.patch),
             "set": msgspec.to_builtins(c.set_values)}
            for c in page.session_changes[-VIEW_ITEMS:]
        ],
        "session_changes_total": page.session_changes_total,
        "summary": None if state.summary is None else {
            "text": state.summary.text, "covers_seq": state.summary.covers_seq, "seq": state.summary.seq},
        "gaps": [
            {"seq": g.seq, "bridge_id": g.bridge_id, "started_at": g.started_at.isoformat(),
             "ended_at": g.ended_at.isoformat(), "reason": g.reason}
            for g in index.gaps
        ],
    }


def record_bytes(record: Record) -> bytes:
    return msgspec.json.encode(record_json(record))
