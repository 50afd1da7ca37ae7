"""Seed 000 by voice on the real livekit-server: one caller, three agent processes, one floor.

The caller speaks (espeak-ng into a real microphone track); each agent (``examples/voice/floor.py``,
its own process) hears the caller through silero VAD and pocketsphinx, and only the agent the
floor names answers (``link.attach(session, floor=Addressed(rotate=True))``): unnamed turns go
round-robin, a turn naming an agent goes to that agent. Asserted from what reached the caller's
ears and the log: every utterance answered by exactly one agent, the right one; the agents never
audible at once (voiced 10 ms frames); each utterance once in the conversation although three
agents transcribed it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from livekit import api

from room_ledger.client import Ledger, Record
from room_ledger.settings import Settings
from room_ledger.state import fold
from room_ledger.watch import watch
from tests import processes
from tests.livekit.server import http_url
from tests.test_bridge_livekit import body_of, lk_settings, running_bridge  # noqa: F401

pytestmark = pytest.mark.livekit

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "examples" / "voice" / "floor.py"


def _espeak() -> bool:
    from examples.voice.offline import espeak_available

    return espeak_available()


@pytest.fixture
async def floor_agents(lk_settings: Settings, livekit_server: Any, tmp_path: Path) -> AsyncIterator[list[str]]:
    """Three workers, each its own process and agent name (sales, billing, support), registered."""
    if not _espeak():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): the voice tests speak with it")
    tag = uuid.uuid4().hex[:6]
    names = [f"sales-{tag}", f"billing-{tag}", f"support-{tag}"]
    procs: list[asyncio.subprocess.Process] = []
    try:
        for name in names:
            mark = livekit_server.log_mark()
            env = {**os.environ, "LIVEKIT_URL": livekit_server.url, "LIVEKIT_API_KEY": livekit_server.api_key,
                   "LIVEKIT_API_SECRET": livekit_server.api_secret,
                   "LEDGER_NATS_URL": ",".join(lk_settings.nats_urls or ()), "LEDGER_HOME": str(lk_settings.home),
                   "LEDGER_STREAM": lk_settings.stream, "FLOOR_AGENT": name, "FLOOR_POLICY": "addressed",
                   "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "HANDOFF_LEDGER_LOG_LEVEL": "DEBUG"}
            env.pop("LEDGER_DATABASE_URL", None)
            with (tmp_path / f"{name}.log").open("ab") as out:
                procs.append(await processes.start(sys.executable, str(WORKER), env=env, stdout=out,
                                                   stderr=subprocess.STDOUT, cwd=REPO))
            await livekit_server.worker_registered(name, 60, after=mark)
        yield names
    finally:
        await asyncio.gather(*(processes.stop(p) for p in procs))


def _identities(records: list[Record]) -> dict[str, str]:
    """agent name -> participant identity, from the ``lk.agent_name`` attribute LiveKit sets."""
    return {body_of(r).attributes["lk.agent_name"]: body_of(r).identity for r in records
            if r.type in ("participant.joined", "participant.attributes") and body_of(r).attributes.get("lk.agent_name")}


def _replies(records: list[Record]) -> list[tuple[str, str]]:
    """(agent identity, text) of every reply, from the agents' own session feeds (one item per reply,
    where the transcript of a reply can come as several segments)."""
    return [(r.event.sender.identity, body_of(r).text) for r in records if r.type == "conversation.item"
            and body_of(r).item_type == "message" and body_of(r).role == "assistant"]


async def test_three_voice_agents_one_floor_one_answer_per_turn(lk_settings: Settings, ledger: Ledger, room: str,
                                                                livekit_connect: Any, livekit_server: Any,
                                                                floor_agents: list[str]) -> None:
    from examples.voice.offline import VoiceCaller

    _, billing, support = floor_agents
    log = watch(ledger, room)
    async with running_bridge(lk_settings, room):
        caller_room = await livekit_connect("caller", room)
        caller = await VoiceCaller.create(caller_room)
        async with api.LiveKitAPI(http_url(livekit_server.url), livekit_server.api_key,
                                  livekit_server.api_secret) as lk:
            for name in floor_agents:
                await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(agent_name=name, room=room))
        # every agent attached: its claim is in the log (the floor's order is the claims' order)
        await log.until(lambda rs: {body_of(r).agent_id for r in rs if r.type == "floor.request"} >= set(floor_agents),
                        60, what="all three agents' floor claims")
        claims = [body_of(r).agent_id for r in log.records if r.type == "floor.request"]
        order = list(dict.fromkeys(claims))
        turns = [("hello is anyone there", None), ("i need help with my order", None), ("what is the status", None),
                 ("billing what is my balance", billing), ("support can you help me", support),
                 ("thank you very much", None)]
        expected: list[str] = []
        answered: list[str] = []
        for n, (phrase, named) in enumerate(turns, start=1):
            # who should answer: the agent named, else the floor's holder as every agent folds it now
            holder = fold(log.records).floor.holder
            assert holder is not None
            expected.append(named or holder)
            await caller.say(phrase)

            def answered_n(rs: list[Record], n: int = n) -> bool:
                return len(_replies(rs)) >= n

            def kept_by_all(rs: list[Record], phrase: str = phrase) -> bool:
                return len({r.event.sender.identity for r in rs if r.type == "conversation.item"
                            and body_of(r).role == "user" and body_of(r).text == phrase}) == 3

            await log.until(answered_n, 30, what=f"an answer to {phrase!r}")
            # every agent done with the turn: each keeps the caller's words in its own feed
            await log.until(kept_by_all, 30, what=f"all three agents keeping {phrase!r}")
            answered.append(_replies(log.records)[-1][0])
            # the answer has played before the caller speaks again
            def done_speaking(rs: list[Record], who: str = answered[-1]) -> bool:
                return fold(rs).participants[who].agent_state == "listening"

            await log.until(done_speaking, 30, what="the answering agent done speaking")
        await caller_room.disconnect()
        records = list(log.records)
    await log.close()
    identity = _identities(records)

    by_identity = {v: k for k, v in identity.items()}
    answerers = [by_identity[i] for i in answered]
    # round-robin in the floor's order for the first three turns, the named agent for named ones
    assert expected[:3] == order[:3]
    assert answerers == expected, (answerers, expected)
    # exactly one answer per turn: one reply in the agents' feeds per turn, saying what it heard
    replies = _replies(records)
    assert len(replies) == len(turns), replies
    for (phrase, _), (who, text) in zip(turns, replies, strict=True):
        assert phrase in text, (phrase, by_identity[who], text)
    # never two agents audible at once, at the caller's ears
    for a, b in itertools.combinations(identity.values(), 2):
        assert caller.overlap_ms(a, b) == 0, (a, b)
    # three agents transcribed each utterance; the conversation holds it once, credited to the caller
    state = fold(records)
    user_items = [i for i in state.conversation if i.role == "user"]
    assert [i.text for i in user_items] == [p for p, _ in turns], [
        (i.item_id, i.source, i.speaker, i.seq, i.text) for i in user_items]
    assert {i.speaker for i in user_items} == {"caller"}
    # the log keeps every copy (three transcribers, three feeds): nothing the bridge saw is dropped
    assert sum(1 for r in records if r.type == "conversation.item" and body_of(r).role == "user") == 3 * len(turns)
    await caller.aclose()
