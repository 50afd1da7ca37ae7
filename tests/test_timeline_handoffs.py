"""``ledger replay --handoffs``: dead air from the end of the source's last speech, failed attempts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from room_ledger import events as ev
from room_ledger.client import Record
from room_ledger.timeline import HandoffTracker

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


class _Log:
    def __init__(self) -> None:
        self.records: list[Record] = []

    def add(self, body: ev.Body, sender: str, at: float, observed: float | None = None) -> int:
        seq = len(self.records) + 1
        event = ev.make_event("r", body, id=f"e{seq}", sender=ev.Sender(identity=sender, kind="agent"),
                              at=_at(at), observed_at=_at(observed if observed is not None else at))
        self.records.append(Record(seq=seq, subject="", time=_at(observed if observed is not None else at),
                                   event=event))
        return seq

    def say(self, who: str, start: float, end: float, text: str = "words") -> int:
        """A voice agent's turn: speaking state, final transcript (recorded when it ends), listening."""
        self.add(ev.AgentState(identity=who, state="speaking", old_state="thinking"), who, start)
        seq = self.add(ev.Transcript(speaker=who, text=text, segment_id=f"s{start}"), who, start, end)
        self.add(ev.AgentState(identity=who, state="listening", old_state="speaking"), who, end)
        return seq

    def rows(self) -> list:  # type: ignore[type-arg]
        tracker = HandoffTracker()
        for record in self.records:
            tracker.feed(record)
        return tracker.finish()


def test_dead_air_runs_from_the_end_of_the_source_s_last_words() -> None:
    """A 2.5 s "transferring you" whose transcript is recorded when it ends: dead air starts there,
    not at its start (which overstated it by the length of the speech)."""
    log = _Log()
    log.say("triage", 0.0, 1.0, "hello")
    log.add(ev.Handoff(from_agent="triage", to_agent="billing"), "triage", 4.0)
    log.say("triage", 1.5, 4.0, "one moment, I'm transferring you")  # begun before the handoff
    log.say("billing", 4.8, 6.0, "billing here")
    (row,) = log.rows()
    assert row.outcome == "ok"
    assert row.dead_air_s is not None and abs(row.dead_air_s - 0.8) < 1e-6
    assert row.waited_s is not None and abs(row.waited_s - 0.8) < 1e-6


def test_a_progress_line_breaks_the_silence_but_is_not_the_last_words() -> None:
    log = _Log()
    log.say("triage", 0.0, 1.0)
    log.add(ev.Handoff(from_agent="triage", to_agent="billing"), "triage", 1.1)
    log.say("triage", 5.0, 6.5, "I'm still connecting you")  # the progress line
    log.say("billing", 7.0, 8.0)
    (row,) = log.rows()
    assert row.outcome == "ok" and row.last_speech == _at(1.0)
    assert row.dead_air_s is not None and abs(row.dead_air_s - 6.0) < 1e-6
    assert row.waited_s is not None and abs(row.waited_s - 4.0) < 1e-6


def test_a_failed_attempt_is_one_row_with_its_outcome_and_what_the_caller_waited() -> None:
    log = _Log()
    log.say("triage", 0.0, 1.0, "one moment")
    log.add(ev.Handoff(from_agent="triage", to_agent="nobody"), "triage", 1.05)
    log.add(ev.Handoff(from_agent="nobody", to_agent="triage",
                       reason=ev.FAILED_HANDOFF_PREFIX + "no worker registered as 'nobody'"), "triage", 11.0)
    log.say("triage", 11.2, 13.0, "Sorry, I could not reach nobody")  # 18 s later it was "last speech"
    (row,) = log.rows()
    assert (row.outcome, row.error) == ("failed", "no worker registered as 'nobody'")
    assert row.last_speech == _at(1.0) and row.first_speech is None and row.dead_air_s is None
    assert row.waited_s is not None and abs(row.waited_s - 10.2) < 1e-6


def test_text_sessions_with_feed_items_only_still_measure() -> None:
    """Logs of older bridges: no transcripts or states, only the feed's messages (created_at)."""
    log = _Log()
    log.add(ev.ConversationItem(item_id="a", role="assistant", text="one moment", speaker="triage",
                                created_at=_at(1.0).timestamp()), "triage", 1.0)
    log.add(ev.Handoff(from_agent="triage", to_agent="billing"), "triage", 1.2)
    log.add(ev.ConversationItem(item_id="b", role="assistant", text="billing here", speaker="billing",
                                created_at=_at(2.0).timestamp()), "billing", 2.0)
    (row,) = log.rows()
    assert row.outcome == "ok" and row.dead_air_s is not None and abs(row.dead_air_s - 1.0) < 1e-6


def test_who_spoke_when_from_agent_states_and_the_callers_feed_state() -> None:
    from room_ledger.timeline import SpeechTracker

    log = _Log()
    log.add(ev.ParticipantJoined(identity="ana", kind="standard"), "ana", 0.0)
    log.add(ev.ParticipantJoined(identity="triage", kind="agent"), "triage", 0.0)
    for agent in ("triage", "billing"):  # two agents' sessions report the same caller: one lane, merged
        log.add(ev.Data(topic="lk.agent.session", transport="byte_stream", json={"new_state": "US_SPEAKING"},
                        attributes={"event": "user_state_changed"}), agent, 1.0 + (agent == "billing") * 0.05)
        log.add(ev.Data(topic="lk.agent.session", transport="byte_stream", json={"new_state": "US_LISTENING"},
                        attributes={"event": "user_state_changed"}), agent, 2.0)
    log.say("triage", 2.5, 4.0)
    tracker = SpeechTracker()
    for record in log.records:
        tracker.feed(record)
    spans = [(s.speaker, s.start, s.end) for s in tracker.finish()]
    assert spans == [("ana", _at(1.0), _at(2.0)), ("triage", _at(2.5), _at(4.0))]
