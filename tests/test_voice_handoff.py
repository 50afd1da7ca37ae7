"""The handoff example by voice on the real livekit-server: triage -> billing -> triage, the caller speaking.

``examples/handoff`` with ``HANDOFF_VOICE=1``: the caller is a real microphone track (espeak-ng),
the agents hear it (silero VAD, pocketsphinx) and speak (espeak-ng), each worker in its own
process with its models loaded before it registered. Asserted from the caller's ears (voiced
10 ms frames) and the log:

- the target speaks first, and the source says nothing after its last words;
- ``ledger replay --handoffs`` measures the dead air the caller heard;
- words the caller says during the switch are lost by neither side and answered once, by the target;
- the handoff and back (billing -> a new triage job) carries billing's change.
"""

from __future__ import annotations

from typing import Any

import pytest

from room_ledger.client import Ledger, Record
from room_ledger.settings import Settings
from room_ledger.timeline import handoffs as replay_handoffs
from room_ledger.watch import watch
from tests.handoff_example import ExampleWorkers, workers  # noqa: F401
from tests.test_bridge_livekit import body_of, lk_settings, running_bridge  # noqa: F401

pytestmark = pytest.mark.livekit


def _replies(records: list[Record]) -> list[tuple[str, str, int]]:
    """(agent identity, text, seq) of every reply, from the agents' own session feeds."""
    return [(r.event.sender.identity, body_of(r).text, r.seq) for r in records if r.type == "conversation.item"
            and body_of(r).item_type == "message" and body_of(r).role == "assistant"]


async def _reply(log: Any, starts: str, after: int = 0, timeout: float = 40) -> tuple[str, str, int]:
    """The first reply (after sequence ``after``) beginning with ``starts``, once fully spoken
    (a session adds a reply to its history when its audio has played)."""
    def said(rs: list[Record]) -> bool:
        return any(text.startswith(starts) and seq > after for _, text, seq in _replies(rs))

    await log.until(said, timeout, what=f"a reply starting {starts!r}")
    return next(r for r in _replies(log.records) if r[1].startswith(starts) and r[2] > after)


def _identities(records: list[Record]) -> dict[str, list[str]]:
    """agent name -> its participants' identities (a name can have several jobs), in order of joining."""
    found: dict[str, list[str]] = {}
    for r in records:
        if r.type in ("participant.joined", "participant.attributes") and (
                name := body_of(r).attributes.get("lk.agent_name")):
            ids = found.setdefault(name, [])
            if body_of(r).identity not in ids:
                ids.append(body_of(r).identity)
    return found


async def test_voice_handoff_there_and_back(lk_settings: Settings, ledger: Ledger, room: str, livekit_connect: Any,
                                            workers: ExampleWorkers) -> None:
    from examples.voice.offline import VoiceCaller, espeak_available

    if not espeak_available():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): the voice tests speak with it")
    await workers.start("triage", HANDOFF_VOICE="1")
    await workers.start("billing", HANDOFF_VOICE="1")
    log = watch(ledger, room)


    async with running_bridge(lk_settings, room):
        caller_room = await livekit_connect("caller", room)
        caller = await VoiceCaller.create(caller_room)
        await workers.dispatch(room, workers.triage)
        await _reply(log, "Hi, this is triage")
        await caller.say("my account is seven")
        await _reply(log, "Thanks Ana, I found your account.")
        await caller.say("i have a question about my bill")
        moment = await _reply(log, "One moment, I'm transferring you now.")
        hello = await _reply(log, "Hi Ana, billing here.", after=moment[2])
        # billing spoke first, and triage said nothing more
        assert next(r for r in _replies(log.records) if r[2] > moment[2]) == hello
        await caller.say("back to triage please")
        back = await _reply(log, "I'm sending you back to triage now.", after=hello[2])
        # the caller speaks at once, while the call switches: billing holds it (answers nothing,
        # keeps it in its history and the log), the new triage job answers it
        await caller.say("are you there")
        welcome = await _reply(log, "Welcome back Ana, triage here.", after=back[2])

        def answered(rs: list[Record]) -> bool:
            return any("are you there" in text for _, text, _ in _replies(rs))

        await log.until(answered, 40, what="an answer to 'are you there'")
        # once billing has left (it stays until the caller's turn is kept), nothing more is coming
        await log.until(lambda rs: any(r.type == "participant.left" and body_of(r).identity == hello[0] for r in rs),
                        30, what="billing leaving")
        await log.until(lambda rs: sum(1 for r in rs if r.type == "handoff") >= 2, 20, what="both handoffs")
        records = list(log.records)
        await caller_room.disconnect()
    await log.close()

    names = _identities(records)
    triage_first, triage_again = names[workers.triage][0], names[workers.triage][-1]
    billing = names[workers.billing][0]
    assert triage_again != triage_first  # a new triage job
    assert hello[0] == billing and welcome[0] == triage_again
    # the new triage job spoke first, with billing's turns ("So far"), then answered "are you there"
    # once; billing, which heard it while the call switched, said nothing after its last words
    assert "So far:" in welcome[1]
    asked = [r for r in _replies(records) if "are you there" in r[1]]
    assert len(asked) == 1 and asked[0][0] == triage_again, _replies(records)
    assert [r for r in _replies(records) if r[0] == billing and r[2] > back[2]] == []
    # nothing the caller said was lost: each utterance once in the conversation, the caller's
    from room_ledger.state import fold

    said = [(i.text, i.speaker) for i in fold(records).conversation if i.role == "user"]
    assert [t for t, _ in said] == ["my account is seven", "i have a question about my bill",
                                    "back to triage please", "are you there"], said
    assert {s for _, s in said} == {"caller"}
    # the dead air of the first handoff at the caller's ears, and what `ledger replay --handoffs` says
    rows = await replay_handoffs(ledger, room)
    first = rows[0]
    assert (first.from_agent, first.to_agent, first.outcome) == (workers.triage, workers.billing, "ok")
    handed = first.time.timestamp()
    billing_start = caller.first_voiced_after(billing, handed - 2.0)
    assert billing_start is not None
    triage_end = caller.last_voiced_before(triage_first, billing_start)
    assert triage_end is not None
    heard = billing_start - triage_end
    print(f"dead air at the caller: {heard * 1000:.0f} ms; replay --handoffs: "
          f"{(first.dead_air_s or 0) * 1000:.0f} ms")
    # The replay measures from the source's playout ending (its agent state) to the target's
    # playout starting: the TTS's own trailing and leading silence count as speech there, so the
    # caller, who hears only voiced sound, hears that much more (espeak-ng: about 0.3-0.5 s).
    assert first.dead_air_s is not None and 0.0 <= heard - first.dead_air_s <= 0.7, (first.to_builtins(), heard)
    # the two agents were never audible at once
    assert caller.overlap_ms(triage_first, billing) == 0
    assert caller.overlap_ms(billing, triage_again) == 0
    await caller.aclose()
    # the live web view's "who spoke when": a lane for the caller and each agent job, in order
    from room_ledger.web.room_json import view_json
    from room_ledger.web.roomview import collect

    view = view_json(await collect(ledger, room), live=False)
    lanes = [s["speaker"] for s in view["speech"]]
    assert {"caller", triage_first, billing, triage_again} <= set(lanes), lanes
    assert lanes.index(triage_first) < lanes.index(billing) < lanes.index(triage_again)
    assert all(f'data-speaker="{who}"' in view["speech_svg"] for who in ("caller", triage_first, billing))


async def test_voice_warm_standby_is_silent_until_handed_the_call(lk_settings: Settings, ledger: Ledger, room: str,
                                                                  livekit_connect: Any,
                                                                  workers: ExampleWorkers) -> None:
    """Billing joins as a warm standby when the call starts (voice pipeline loaded, hearing the
    caller), says nothing while triage has the call, and takes over with no dispatch."""
    from examples.voice.offline import VoiceCaller, espeak_available
    from room_ledger.handoff import standing_by
    from room_ledger.state import fold

    if not espeak_available():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): the voice tests speak with it")
    await workers.start("triage", HANDOFF_VOICE="1", HANDOFF_WARM="1")
    await workers.start("billing", HANDOFF_VOICE="1")
    log = watch(ledger, room)


    async with running_bridge(lk_settings, room):
        caller_room = await livekit_connect("caller", room)
        caller = await VoiceCaller.create(caller_room)
        await workers.dispatch(room, workers.triage)
        await _reply(log, "Hi, this is triage")
        await log.until(lambda rs: standing_by(fold(rs), workers.billing), 40, what="billing standing by")
        await caller.say("my account is seven")
        await _reply(log, "Thanks Ana, I found your account.")
        await caller.say("i have a question about my bill")
        moment = await _reply(log, "One moment, I'm transferring you now.")
        hello = await _reply(log, "Hi Ana, billing here.", after=moment[2])
        records = list(log.records)
        await caller_room.disconnect()
    await log.close()

    names = _identities(records)
    billing = names[workers.billing][0]
    (handoff,) = [r for r in records if r.type == "handoff"]
    assert hello[0] == billing
    # the standby was in the call from the start, and silent until the handoff
    joined = next(r for r in records if r.type == "participant.joined" and body_of(r).identity == billing)
    assert joined.seq < handoff.seq
    first_voiced = caller.first_voiced_after(billing, 0.0)
    assert first_voiced is not None and first_voiced > handoff.time.timestamp() - 0.05, (first_voiced, handoff.time)
    assert not [r for r in _replies(records) if r[0] == billing and r[2] < handoff.seq]
    # no dispatch at the handoff: the standby took over from the log it follows
    dispatched = [body_of(r).agent_name for r in records if r.type == "dispatch.created" and r.seq > handoff.seq]
    assert workers.billing not in dispatched, dispatched
    assert caller.overlap_ms(names[workers.triage][0], billing) == 0
    await caller.aclose()


async def test_the_caller_can_cut_the_sources_last_words_short(lk_settings: Settings, ledger: Ledger, room: str,
                                                               livekit_connect: Any,
                                                               workers: ExampleWorkers) -> None:
    """The caller speaks while triage is still saying "One moment, I'm transferring you now.": triage
    stops (its reply is recorded as interrupted), the handoff goes on, and billing answers what the
    caller said, once."""
    from examples.voice.offline import VoiceCaller, espeak_available

    if not espeak_available():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): the voice tests speak with it")
    await workers.start("triage", HANDOFF_VOICE="1")
    await workers.start("billing", HANDOFF_VOICE="1")
    log = watch(ledger, room)


    async with running_bridge(lk_settings, room):
        caller_room = await livekit_connect("caller", room)
        caller = await VoiceCaller.create(caller_room)
        await workers.dispatch(room, workers.triage)
        await _reply(log, "Hi, this is triage")
        triage = _identities(log.records)[workers.triage][0]
        _, asked_end = await caller.say("i have a question about my bill")
        # triage's answer is audible: cut in
        await _until_voiced(caller, triage, asked_end)
        await caller.say("are you there")
        answered = await _reply(log, "Billing here: about 'are you there'")
        records = list(log.records)
        await caller_room.disconnect()
    await log.close()

    items = [body_of(r) for r in records if r.type == "conversation.item" and body_of(r).item_type == "message"
             and body_of(r).role == "assistant" and r.event.sender.identity == triage]
    moment = [i for i in items if i.text.startswith("One")]  # (cut short: maybe one word)
    assert moment and moment[-1].interrupted, [(i.text, i.interrupted) for i in items]
    assert [r for r in _replies(records) if "are you there" in r[1]] == [answered]
    assert answered[0] == _identities(records)[workers.billing][0]
    await caller.aclose()


async def _until_voiced(caller: Any, identity: str, after: float, timeout: float = 20.0) -> None:
    """Until ``identity`` is audible after ``after`` (the caller's frames arrive as audio plays)."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while caller.first_voiced_after(identity, after) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{identity} was not audible within {timeout:g}s")
        await asyncio.sleep(0.02)  # frames come every 10 ms; no event says "voiced"
