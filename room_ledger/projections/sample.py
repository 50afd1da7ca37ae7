"""Realistic mixed room logs, for tests and benchmarks (deterministic for a given seed).

A room has a user and three agents (seed 000: round-robin with ``action_lock``); its log mixes
presence, agent states, coordination status, floor claims, transcripts, ``lk.agent.session``
conversation items (messages, function calls and outputs), chat, session patches, data
packets and, now and then, a rolling summary.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from room_ledger import events as ev

AGENTS = ("triage", "billing", "support")
USER = "caller"


def room_events(room: str, n: int, *, seed: int = 0, conversation_share: float = 0.4) -> Iterator[ev.KnownEvent]:
    """``n`` events of one room; about ``conversation_share`` of them are conversation items."""
    rng = random.Random(f"{room}:{seed}")
    user = ev.Sender(identity=USER, kind="standard")

    def agent_sender(name: str) -> ev.Sender:
        return ev.Sender(identity=name, kind="agent")

    produced = 0

    def emit(body: ev.Body, sender: ev.Sender) -> ev.KnownEvent:
        nonlocal produced
        produced += 1
        return ev.make_event(room, body, sender=sender, id=f"{room}:{seed}:{produced}")

    yield emit(ev.ParticipantJoined(identity=USER, kind="standard", name="Caller"), user)
    for name in AGENTS:
        yield emit(ev.ParticipantJoined(identity=name, kind="agent", attributes={"lk.agent.state": "idle"}),
                   agent_sender(name))
    turn = 0
    item = 0
    while produced < n:
        roll = rng.random()
        speaker = AGENTS[turn % len(AGENTS)]
        if roll < conversation_share:
            item += 1
            kind = rng.random()
            if kind < 0.45:
                body: ev.Body = ev.ConversationItem(item_id=f"item_{item}", role="user",
                                                    text=f"user says {rng.randrange(10**6)}",
                                                    created_at=1.7e9 + produced)
            elif kind < 0.85:
                body = ev.ConversationItem(item_id=f"item_{item}", role="assistant", speaker=speaker,
                                           text=f"{speaker} answers {rng.randrange(10**6)}",
                                           created_at=1.7e9 + produced)
            elif kind < 0.93:
                body = ev.ConversationItem(item_id=f"item_{item}", item_type="function_call", name="lookup",
                                           call_id=f"call_{item}", arguments='{"q": 1}', created_at=1.7e9 + produced)
            else:
                body = ev.ConversationItem(item_id=f"item_{item}", item_type="function_call_output", name="lookup",
                                           call_id=f"call_{item - 1}", output="found", created_at=1.7e9 + produced)
            yield emit(body, agent_sender(AGENTS[0] if kind < 0.45 else speaker))
        elif roll < 0.55:
            yield emit(ev.AgentStatus(agent_id=speaker, status="processing", action_lock=True,
                                      task=f"task-{turn}"), agent_sender(speaker))
            if produced < n:
                yield emit(ev.AgentStatus(agent_id=speaker, status=rng.choice(["idle", "resolved"]),
                                          action_lock=False), agent_sender(speaker))
            turn += 1
        elif roll < 0.65:
            yield emit(ev.AgentState(identity=speaker, state=rng.choice(["listening", "thinking", "speaking"])),
                       agent_sender(speaker))
        elif roll < 0.75:
            yield emit(ev.SessionPatch(patch={f"field_{rng.randrange(40)}": rng.randrange(1000),
                                              "step": produced}), agent_sender(speaker))
        elif roll < 0.82:
            yield emit(ev.Transcript(speaker=USER, text="hello there", segment_id=f"seg_{produced}",
                                     track_id="TR_user"), agent_sender(speaker))
        elif roll < 0.87:
            yield emit(ev.ChatMessage(message_id=f"m{produced}", text="typed text", identity=USER), user)
        elif roll < 0.97:
            yield emit(ev.Data(topic="app", text='{"k": 1}', json={"k": 1}, size=8), agent_sender(speaker))
        else:
            yield emit(ev.FloorRequest(agent_id=speaker, task="interject"), agent_sender(speaker))
        if produced % 1000 == 0 and produced < n:
            yield emit(ev.ContextSummary(text=f"summary up to {produced}", covers_seq=0), agent_sender(AGENTS[0]))


def interleaved(rooms: list[str], per_room: int, *, seed: int = 0) -> Iterator[ev.KnownEvent]:
    """Events of several rooms interleaved round-robin (as a busy deployment's log looks)."""
    iterators = [room_events(room, per_room, seed=seed) for room in rooms]
    while iterators:
        alive = []
        for it in iterators:
            event = next(it, None)
            if event is not None:
                yield event
                alive.append(it)
        iterators = alive
