"""Seed 002 by voice, on the real livekit-server: two agents, no human, talking for the whole script.

examples/voice/dialogue.py runs as one AgentServer worker in its own process; it is dispatched
twice into one room. Each job claims ``{"customer", "support"}`` through the ledger (the bridge, in
this process and hidden, records the claims; log order decides), then runs an ``AgentSession``
with the offline voice stack (Silero VAD, PocketSphinx with a grammar of the script's lines,
espeak-ng with a voice per role, a scripted LLM), its RoomIO linked to the *other agent*. Support
speaks first; every line after the first is an answer to what the agent heard through the room.

Checked from what the bridge recorded: both sessions' ``lk.agent.session`` feeds (each agent's
own lines, and what its STT heard the other say), the final ``transcript`` events of both
sides, ``export_room`` (one conversation per side, each side's own lines as ``assistant``), and
the word error rate of what each agent heard against the script, printed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from livekit import api

from room_ledger.bridge.tokens import create_dispatch
from room_ledger.client import Ledger, Record
from room_ledger.export import export_room
from room_ledger.hydrate import hydrate
from room_ledger.settings import Settings
from room_ledger.watch import RoomWatch as Log
from tests import processes
from tests.test_bridge_livekit import body_of, lk_settings, running_bridge
from tests.test_cli_helpers import env_for

__all__ = ["lk_settings"]  # a fixture, used by name

pytestmark = pytest.mark.livekit

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "examples" / "voice" / "dialogue.py"
#: Seconds the room stays open with no standard participant (the server's default here: 20).
ROOM_EMPTY_TIMEOUT_S = 120


@pytest.fixture
def espeak() -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): the agents speak with it")


# --- reading the log ---------------------------------------------------------------------------------


def feed_messages(records: Sequence[Record], role: str) -> dict[str, list[str]]:
    """Feed owner -> the texts of its ``conversation.item`` messages of ``role``, in log order, once per item."""
    seen: set[tuple[str, str]] = set()
    out: dict[str, list[str]] = {}
    for record in records:
        if record.type != "conversation.item":
            continue
        body = body_of(record)
        owner = record.event.sender.identity
        if body.item_type != "message" or body.role != role or (owner, body.item_id) in seen:
            continue
        seen.add((owner, body.item_id))
        out.setdefault(owner, []).append(body.text)
    return out


def transcripts(records: Sequence[Record]) -> list[tuple[str, str, str]]:
    """Final transcripts as (transcriber, speaker, text), in log order."""
    return [(r.event.sender.identity, body_of(r).speaker, body_of(r).text)
            for r in records if r.type == "transcript" and body_of(r).final]


def conversation_over(lines: int) -> Any:
    """Every line said (in both feeds) and heard (each agent's STT, in its feed), and each line's
    two final transcripts (the speaker's, the listener's) recorded."""

    def over(records: list[Record]) -> bool:
        said = sum(len(v) for v in feed_messages(records, "assistant").values())
        heard = sum(len(v) for v in feed_messages(records, "user").values())
        return said >= lines and heard >= lines and len(transcripts(records)) >= 2 * lines

    return over


# --- word error rate ----------------------------------------------------------------------------------


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def word_error_rate(heard: Sequence[str], said: Sequence[str]) -> float:
    """(substitutions + deletions + insertions) / words said, over the whole side (the heard turns
    joined, so a line heard as two turns, or two lines as one, is not misaligned)."""
    from examples.voice.offline import normalize_phrase

    reference = " ".join(normalize_phrase(s) for s in said).split()
    hypothesis = " ".join(normalize_phrase(h) for h in heard).split()
    return edit_distance(reference, hypothesis) / max(1, len(reference))


# --- the worker ---------------------------------------------------------------------------------------


async def start_worker(settings: Settings, livekit_server: Any, agent_name: str, output: Path
                       ) -> asyncio.subprocess.Process:
    """examples/voice/dialogue.py under ``agent_name``, once the server has registered it."""
    env = {**os.environ, **env_for(settings), "LIVEKIT_URL": livekit_server.url,
           "LIVEKIT_API_KEY": livekit_server.api_key, "LIVEKIT_API_SECRET": livekit_server.api_secret,
           "DIALOGUE_AGENT": agent_name, "PYTHONUNBUFFERED": "1"}
    env.pop("LEDGER_DATABASE_URL", None)
    mark = livekit_server.log_mark()
    with output.open("wb") as sink:
        proc = await processes.start(sys.executable, str(WORKER), env=env, cwd=REPO, stdout=sink,
                                     stderr=subprocess.STDOUT)
    registered = asyncio.ensure_future(livekit_server.worker_registered(agent_name, 60, after=mark))
    while not registered.done():
        await asyncio.wait({registered}, timeout=0.5)
        if proc.returncode is not None and not registered.done():
            registered.cancel()
            raise AssertionError(f"the worker exited with {proc.returncode} before registering:\n"
                                 f"{tail(output)}")
    registered.result()
    return proc


def tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


# --- the test -----------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_two_agents_hold_the_scripted_call_by_voice(lk_settings: Settings, ledger: Ledger, room: str,
                                                          livekit_server: Any, tmp_path: Path,
                                                          espeak: None) -> None:
    from examples.voice.dialogue import ATTR_ROLE, SCRIPT, lines_of

    started = time.perf_counter()
    name = f"dialogue-{uuid.uuid4().hex[:8]}"
    output = tmp_path / "dialogue-worker.log"
    worker = await start_worker(lk_settings, livekit_server, name, output)
    registered = time.perf_counter()
    log = Log(ledger, room)
    try:
        # livekit-server closes a room no standard participant ever joined once its empty_timeout
        # (20 s here) has passed, agents in it or not: a call between agents outlasts that, so
        # the room is made first, with a timeout of its own.
        lk = livekit_server.api()
        try:
            await lk.room.create_room(api.CreateRoomRequest(name=room, empty_timeout=ROOM_EMPTY_TIMEOUT_S))
        finally:
            await lk.aclose()
        # The bridge first (claims travel through the room and the log), then both agents at once.
        async with running_bridge(lk_settings, room):
            await asyncio.gather(create_dispatch(lk_settings, room, agent_name=name),
                                 create_dispatch(lk_settings, room, agent_name=name))
            try:
                await log.until(conversation_over(len(SCRIPT)), timeout=90, what=f"all {len(SCRIPT)} lines")
            except TimeoutError as exc:
                raise AssertionError(f"{exc}\n--- the worker said:\n{tail(output)}") from None
        talked = time.perf_counter()
    finally:
        await log.close()
        await processes.stop(worker)
    records = log.records

    # Roles: decided by the log, one each; the agents showed theirs in their attributes.
    snapshot = await hydrate(ledger, room)
    holders = snapshot.state.roles.assignment()
    assert set(holders) == {"customer", "support"} and holders["customer"] != holders["support"], holders
    ids = {role: holders[role] for role in ("customer", "support")}
    role_of = {identity: role for role, identity in ids.items()}
    shown = {body_of(r).identity: body_of(r).attributes.get(ATTR_ROLE) for r in records
             if r.type in ("participant.attributes", "participant.joined") and ATTR_ROLE in body_of(r).attributes}
    assert shown == role_of, shown
    # No human: everyone the bridge saw is an agent (the bridge itself is hidden, never listed).
    kinds = {identity: p.kind for identity, p in snapshot.state.participants.items()}
    assert kinds == {ids["customer"]: "agent", ids["support"]: "agent"}, kinds

    # Each agent's own lines, in its feed, in script order; support spoke first.
    said = feed_messages(records, "assistant")
    for role, identity in ids.items():
        assert said.get(identity) == lines_of(role), (role, said.get(identity))
    first = next(r for r in records if r.type == "conversation.item" and body_of(r).role == "assistant")
    assert first.event.sender.identity == ids["support"]
    # The lines alternate: in the log's order, the speakers of the agents' own lines follow the script.
    spoken = [(r.event.sender.identity, body_of(r).text) for r in records
              if r.type == "conversation.item" and body_of(r).item_type == "message" and body_of(r).role == "assistant"]
    assert [(role_of[who], text) for who, text in dict.fromkeys(spoken)] == list(SCRIPT)

    # The final transcripts of both sides, by speaker: each line twice, once as its speaker's agent
    # transcription, once as the listener's STT transcription of it. Which is which, the log cannot
    # say: LiveKit Agents publishes a user transcription with the stream's sender_identity set to
    # the transcribed participant, and the bridge records that as the sender (see the report).
    finals = transcripts(records)
    heard = feed_messages(records, "user")
    for role, identity in ids.items():
        other = ids["support" if role == "customer" else "customer"]
        spoken_by = Counter(text for _, speaker, text in finals if speaker == identity)
        assert spoken_by == Counter(lines_of(role)) + Counter(heard.get(other, [])), (role, spoken_by)
        assert {who for who, speaker, _ in finals if speaker == identity} == {identity}

    # What each agent heard (its STT's user turns, in its feed) against what the other said.
    rates: dict[str, float] = {}
    for role, identity in ids.items():
        expected = lines_of("support" if role == "customer" else "customer")
        got = heard.get(identity, [])
        rates[role] = word_error_rate(got, expected)
        exact = sum(1 for g, e in zip(got, expected, strict=False) if g == e)
        print(f"\n{role} ({identity}) heard {len(got)} turns, {exact}/{len(expected)} lines exactly, "
              f"WER {rates[role]:.3f}")
        for line in got:
            print(f"    heard: {line!r}")
        assert len(got) == len(expected), (role, got)
    assert all(rate < 0.5 for rate in rates.values()), rates

    # `ledger export`: one conversation per side, each side's own lines as assistant.
    conversations = await export_room(ledger, room)
    assert len(conversations) == 2 and all(c.agent_to_agent for c in conversations), [
        (c.id, c.agent_to_agent) for c in conversations]
    sides = {c.perspective or "": c for c in conversations}
    assert set(sides) == set(role_of), set(sides)
    for identity, side in sides.items():
        turns = [t for t in side.turns if t["type"] == "message"]
        assert len(turns) == len(SCRIPT), side.turns
        # and the side's own session start (LiveKit's agent_handoff item to its Agent), nothing else
        others = [(t["type"], t.get("speaker"), t.get("new_agent_id")) for t in side.turns if t["type"] != "message"]
        assert others == [("agent_handoff", identity, "dialogue_agent")], others
        assert [(t["speaker"], t["text"]) for t in turns] == [(ids[role], line) for role, line in SCRIPT]
        assert [t["role"] for t in turns] == [
            "assistant" if ids[role] == identity else "user" for role, _ in SCRIPT]
        assert {t["kind"] for t in turns} == {"agent"}
        messages = side.messages()
        assert [(m["role"], m["content"]) for m in messages] == [
            ("assistant" if ids[role] == identity else "user", line) for role, line in SCRIPT], messages
        assert {p["identity"]: p["kind"] for p in side.participants} == kinds

    print(f"\n{len(SCRIPT)} lines; worker registered in {registered - started:.1f} s, the call took "
          f"{talked - registered:.1f} s; export: {[(c.id, len(c.turns)) for c in conversations]}")

