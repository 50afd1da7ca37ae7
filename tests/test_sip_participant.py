"""A telephony caller (a SIP participant) in the room: recorded with kind ``sip``, its ``sip.*``
attributes kept, its words credited to it, and folded as the person on the line.

No SIP test runs a call: LiveKit's SIP bridge (``github.com/livekit/sip``) cannot be built here (the
Go module proxy refuses it). A SIP participant is an ordinary participant of kind
``PARTICIPANT_KIND_SIP`` (3) whose attributes the SIP bridge sets, so the ingest and the fold are
checked with the observations a bridge would make of one (as ``tests/test_bridge_ingest.py`` does),
and through the real livekit-server with a participant whose token says ``kind: sip``.

Attribute names: livekit/protocol ``livekit/attrs.go`` (``AttrSIPCallID`` = ``sip.callID``,
``AttrSIPTrunkID``, ``AttrSIPDispatchRuleID`` = ``sip.ruleID``, ``AttrSIPTrunkNumber`` =
``sip.trunkPhoneNumber``, ``AttrSIPPhoneNumber`` = ``sip.phoneNumber``, ``AttrSIPCallStatus`` =
``sip.callStatus``: ``dialing``, ``ringing``, ``active``, ``automation``, ``hangup``).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from room_ledger import events as ev
from room_ledger.bridge.ingest import Ingest, ParticipantObservation
from room_ledger.client import Ledger
from room_ledger.settings import Settings
from room_ledger.state import fold
from room_ledger.watch import RoomWatch as Log
from tests.test_bridge_livekit import lk_settings, running_bridge  # noqa: F401
from tests.test_cli_helpers import ok

PHONE = "sip_+15105550100"
AGENT = "triage"
SIP_ATTRIBUTES = {
    "sip.callID": "SCL_2x8kQZt9Fh3C",
    "sip.trunkID": "ST_inbound_1",
    "sip.ruleID": "SDR_support",
    "sip.trunkPhoneNumber": "+15105550199",
    "sip.phoneNumber": "+15105550100",
    "sip.callStatus": "active",
}
T0 = datetime(2025, 3, 1, 9, 0, 0, tzinfo=UTC)


def make(room: str = "r1") -> tuple[Ingest, list[ev.KnownEvent]]:
    out: list[ev.KnownEvent] = []
    return Ingest(room, out.append, bridge_id="b1"), out


@dataclass(frozen=True)
class Rec:
    """What the fold needs of a stored record."""

    seq: int
    time: datetime
    event: ev.Event


def records(events: list[ev.KnownEvent]) -> list[Rec]:
    return [Rec(seq, T0 + timedelta(seconds=seq), e) for seq, e in enumerate(events, 1)]


def a_call(ingest: Ingest) -> None:
    """An inbound call as a bridge sees it: the agent, then the phone line (kind 3, as ``rtc`` gives
    it), its attributes set by the SIP bridge, its transcript published by the agent for it."""
    ingest.participant_joined(AGENT, kind=4, sid="PA_agent", attributes={"lk.agent.state": "listening"})
    ingest.participant_joined(PHONE, kind=3, sid="PA_phone", name="Phone +15105550100",
                              attributes=SIP_ATTRIBUTES, tracks=["TR_phone_audio"])


@pytest.mark.parametrize("kind", [3, "sip", "SIP", "PARTICIPANT_KIND_SIP"])
def test_a_sip_participant_is_recorded_with_kind_sip_and_its_sip_attributes(kind: object) -> None:
    ingest, out = make()
    ingest.participant_joined(PHONE, kind=kind, sid="PA_phone", name="Phone +15105550100",
                              attributes=SIP_ATTRIBUTES)
    (joined,) = out
    assert isinstance(joined, ev.ParticipantJoinedEvent)
    assert joined.body.kind == "sip" and joined.sender == ev.Sender(PHONE, "sip")
    assert joined.body.attributes == SIP_ATTRIBUTES
    assert joined.body.name == "Phone +15105550100"
    assert ev.decode(ev.encode(joined)) == joined


def test_a_sip_participant_in_a_snapshot_keeps_its_kind_and_attributes() -> None:
    ingest, out = make()
    ingest.snapshot([ParticipantObservation(PHONE, kind=3, sid="PA_phone", attributes=SIP_ATTRIBUTES)])
    (joined,) = out
    assert isinstance(joined, ev.ParticipantJoinedEvent) and joined.body.snapshot
    assert joined.body.kind == "sip" and joined.body.attributes == SIP_ATTRIBUTES


def test_call_status_changes_are_recorded_and_folded() -> None:
    ingest, out = make()
    dialing = {**SIP_ATTRIBUTES, "sip.callStatus": "dialing"}
    ingest.participant_joined(PHONE, kind=3, sid="PA_phone", attributes=dialing)
    for status in ("ringing", "active", "hangup"):
        ingest.participant_attributes(PHONE, {"sip.callStatus": status}, {**SIP_ATTRIBUTES, "sip.callStatus": status})
    ingest.participant_left(PHONE, sid="PA_phone", reason="CLIENT_INITIATED")
    changes = [e for e in out if isinstance(e, ev.ParticipantAttributesEvent)]
    assert [e.body.changed for e in changes] == [{"sip.callStatus": s} for s in ("ringing", "active", "hangup")]
    assert all(e.sender == ev.Sender(PHONE, "sip") for e in changes)
    assert not [e for e in out if isinstance(e, ev.AgentStateEvent)]  # a phone line is no agent
    state = fold(records(out[:-1]))
    phone = state.participants[PHONE]
    assert phone.kind == "sip" and phone.present and not phone.is_agent
    assert phone.attributes == {**SIP_ATTRIBUTES, "sip.callStatus": "hangup"}
    state = fold(records(out))
    assert not state.participants[PHONE].present


def test_a_sip_callers_data_and_transcripts_are_credited_to_it_with_kind_sip() -> None:
    ingest, out = make()
    a_call(ingest)
    out.clear()
    ingest.data_packet(b'{"menu": "billing"}', topic="ivr", sender_identity=PHONE, sender_kind=3)
    ingest.data_packet(b"no kind on this one", topic="ivr", sender_identity=PHONE)  # known from the join
    ingest.text_stream("I was charged twice.", topic="lk.transcription", stream_id="ST_1", sender_identity=PHONE,
                       attributes={"lk.segment_id": "SG_1", "lk.transcribed_track_id": "TR_phone_audio",
                                   "lk.transcription_final": "true"})
    ingest.text_stream("hello from the phone app", topic="lk.chat", stream_id="ST_2", sender_identity=PHONE)
    data, data2, transcript, chat = out
    assert all(e.sender == ev.Sender(PHONE, "sip") for e in out), [e.sender for e in out]
    assert isinstance(data.body, ev.Data) and data.body.json == {"menu": "billing"}
    assert isinstance(data2.body, ev.Data) and data2.body.text == "no kind on this one"
    assert isinstance(transcript.body, ev.Transcript) and transcript.body.speaker == PHONE
    assert isinstance(chat.body, ev.ChatMessage) and chat.body.identity == PHONE


def test_the_agent_transcribing_the_caller_credits_the_words_to_the_phone_line() -> None:
    """The agent publishes the caller's transcript; the transcribed track names the speaker."""
    ingest, out = make()
    a_call(ingest)
    out.clear()
    ingest.text_stream("I was charged twice.", topic="lk.transcription", stream_id="ST_1", sender_identity=AGENT,
                       attributes={"lk.segment_id": "SG_1", "lk.transcribed_track_id": "TR_phone_audio",
                                   "lk.transcription_final": "true"})
    (transcript,) = out
    assert isinstance(transcript.body, ev.Transcript) and transcript.body.speaker == PHONE
    state = fold(records([*_joins(), transcript]))
    (item,) = state.conversation
    assert (item.role, item.speaker, item.text) == ("user", PHONE, "I was charged twice.")


def _joins() -> list[ev.KnownEvent]:
    ingest, out = make()
    a_call(ingest)
    return [e for e in out if isinstance(e, ev.ParticipantJoinedEvent)]


def test_a_feeds_user_message_is_credited_to_the_one_sip_caller_present() -> None:
    """An agent session's feed names no user (ledger.state._user_speaker): a sip caller is the person."""
    e = ev.make_event
    agent = ev.Sender(AGENT, "agent")
    events = [
        *_joins(),
        e("r1", ev.ConversationItem(item_id="item_u1", role="user", text="I was charged twice."), sender=agent),
        e("r1", ev.ConversationItem(item_id="item_a1", role="assistant", text="Let me check."), sender=agent),
    ]
    state = fold(records(events))
    assert [(i.role, i.speaker) for i in state.conversation] == [("user", PHONE), ("assistant", AGENT)]
    # with two people on the line, the feed cannot tell which one spoke
    second = e("r1", ev.ParticipantJoined(identity="web-user", kind="standard"), sender=ev.Sender("web-user", "standard"))
    state = fold(records([*events[:2], second, *events[2:]]))
    assert [(i.role, i.speaker) for i in state.conversation] == [("user", None), ("assistant", AGENT)]


def test_the_floor_and_a_handoff_treat_a_sip_caller_like_any_caller() -> None:
    """The phone line claims nothing; the agents' floor and handoff go on around it."""
    e = ev.make_event
    triage, billing = ev.Sender(AGENT, "agent"), ev.Sender("billing", "agent")
    events = [
        *_joins(),
        e("r1", ev.FloorRequest(agent_id=AGENT, task="greet"), sender=triage),
        e("r1", ev.AgentStatus(agent_id="billing", status="processing", action_lock=True, task="refund"),
          sender=billing),
        e("r1", ev.Handoff(from_agent=AGENT, to_agent="billing", reason="billing question"), sender=triage),
        e("r1", ev.ParticipantLeft(identity=PHONE, sid="PA_phone", reason="CLIENT_INITIATED"),
          sender=ev.Sender(PHONE, "sip")),
    ]
    state = fold(records(events))
    assert state.floor.holder == "billing"  # the caller hanging up releases no agent's floor
    assert [(t.holder, t.end_reason) for t in state.floor.history] == [(AGENT, "handoff"), ("billing", None)]


def test_ledger_export_lists_the_sip_caller_with_kind_sip(settings: Settings, room: str, tmp_path: Path) -> None:
    ingest, out = make(room)
    a_call(ingest)
    agent = ev.Sender(AGENT, "agent")
    ingest.text_stream("I was charged twice.", topic="lk.transcription", stream_id="ST_1", sender_identity=AGENT,
                       attributes={"lk.segment_id": "SG_1", "lk.transcribed_track_id": "TR_phone_audio",
                                   "lk.transcription_final": "true"})
    out.append(ev.make_event(room, ev.Transcript(speaker=AGENT, text="Let me check.", segment_id="SG_2"),
                             sender=agent))

    async def append() -> None:
        async with Ledger(settings) as ledger:
            await ledger.append_many(out)

    asyncio.run(append())
    ok(settings, ["export", room, "--out", str(tmp_path / "calls.jsonl")])
    (line,) = (tmp_path / "calls.jsonl").read_text().splitlines()
    exported = json.loads(line)
    assert {"identity": PHONE, "kind": "sip"} in exported["participants"]
    turns = [(t["role"], t.get("speaker"), t.get("kind"), t["text"]) for t in exported["turns"]]
    assert turns == [("user", PHONE, "sip", "I was charged twice."), ("assistant", AGENT, "agent", "Let me check.")]


# --- through the real livekit-server -----------------------------------------------------------------


@pytest.mark.livekit
async def test_a_participant_joining_with_a_sip_token_is_recorded_with_kind_sip(
        lk_settings: Settings, ledger: Ledger, room: str, livekit_connect: Any) -> None:
    """livekit-server takes the kind from the token (``kind: sip``): what LiveKit's SIP bridge does."""
    log = Log(ledger, room)
    async with running_bridge(lk_settings, room):
        phone = await livekit_connect(PHONE, room, kind="sip", name="Phone +15105550100",
                                      attributes={**SIP_ATTRIBUTES, "sip.callStatus": "ringing"})
        await log.until(lambda rs: any(isinstance(r.event, ev.ParticipantJoinedEvent)
                                       and r.event.body.identity == PHONE for r in rs), what="the phone joined")
        await phone.local_participant.set_attributes({"sip.callStatus": "active"})
        await log.until(lambda rs: any(isinstance(r.event, ev.ParticipantAttributesEvent)
                                       and r.event.body.changed.get("sip.callStatus") == "active" for r in rs),
                        what="the call status change")
        await phone.local_participant.publish_data(b'{"menu": "billing"}', topic="ivr")
        await log.until(lambda rs: any(isinstance(r.event, ev.DataEvent) and r.event.body.topic == "ivr"
                                       for r in rs), what="the phone's data")
    joined = [r.event for r in log.records if isinstance(r.event, ev.ParticipantJoinedEvent)
              and r.event.body.identity == PHONE]
    assert joined and all(e.body.kind == "sip" and e.sender.kind == "sip" for e in joined)
    assert joined[0].body.attributes == {**SIP_ATTRIBUTES, "sip.callStatus": "ringing"}
    (change,) = [r.event for r in log.records if isinstance(r.event, ev.ParticipantAttributesEvent)
                 and r.event.body.identity == PHONE]
    assert change.sender == ev.Sender(PHONE, "sip") and change.body.changed == {"sip.callStatus": "active"}
    (data,) = [r.event for r in log.records if isinstance(r.event, ev.DataEvent) and r.event.body.topic == "ivr"]
    assert data.sender == ev.Sender(PHONE, "sip")
    state = fold(log.records)
    assert state.participants[PHONE].kind == "sip"
    await log.close()


@pytest.mark.livekit
async def test_dtmf_digits_from_the_phone_line_are_recorded(
        lk_settings: Settings, ledger: Ledger, room: str, livekit_connect: Any) -> None:
    from livekit import rtc

    log = Log(ledger, room)
    agent = await livekit_connect(AGENT, room, kind="agent")
    digits: asyncio.Queue[rtc.SipDTMF] = asyncio.Queue()
    agent.on("sip_dtmf_received", digits.put_nowait)
    async with running_bridge(lk_settings, room):
        phone = await livekit_connect(PHONE, room, kind="sip", attributes=SIP_ATTRIBUTES)
        await log.until(lambda rs: any(isinstance(r.event, ev.ParticipantJoinedEvent)
                                       and r.event.body.identity == PHONE for r in rs), what="the phone joined")
        await phone.local_participant.publish_dtmf(code=1, digit="1")
        # a data packet after the digit, on the same reliable channel: once it is recorded, the
        # digit has reached the bridge too
        await phone.local_participant.publish_data(b"after the digit", topic="marker")
        heard = await asyncio.wait_for(digits.get(), 10)
        assert (heard.digit, heard.participant.identity if heard.participant else None) == ("1", PHONE)
        await log.until(lambda rs: any(isinstance(r.event, ev.DataEvent) and r.event.body.topic == "marker"
                                       for r in rs), what="the marker after the digit")
    recorded = [r for r in log.records if r.event.sender.identity == PHONE and "dtmf" in json.dumps(
        ev.to_builtins(r.event)).lower()]
    await log.close()
    assert recorded, "no event records the DTMF digit"
    (digit,) = recorded
    assert isinstance(digit.event, ev.DataEvent) and digit.event.body.topic == "lk.sip.dtmf"
    assert digit.event.body.json == {"code": 1, "digit": "1"} and digit.event.sender == ev.Sender(PHONE, "sip")
