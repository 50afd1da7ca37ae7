"""10,000 fuzzed packets and streams through ingest and the writer: nothing raises, all are stored."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from room_ledger import events as ev
from room_ledger.bridge.ingest import Ingest
from room_ledger.bridge.writer import BridgeWriter
from room_ledger.client import Ledger

TOPICS = st.sampled_from(["", "ledger", "state", "lk.chat", "lk.transcription", "lk.agent.session", "x.y", "🙂"])
IDENTITIES = st.one_of(st.sampled_from(["", "agent-a", "user"]), st.text(max_size=40))
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
SHAPED = st.fixed_dictionaries(
    {"type": st.sampled_from(["agent.status", "floor.request", "floor.release", "handoff", "session.patch",
                              "context.summary", "conversation.item", "bridge.gap", "what"])},
    optional={"id": st.one_of(st.text(max_size=12), st.integers()), "agent_id": st.one_of(st.text(max_size=8), st.none()),
              "status": st.sampled_from(["processing", "idle", "resolved", "busy"]), "action_lock": JSONISH,
              "patch": JSONISH, "text": st.text(max_size=50), "covers_seq": st.integers(), "from_agent": st.text(max_size=5),
              "to_agent": st.text(max_size=5), "item_id": st.text(max_size=5), "body": JSONISH},
)
PAYLOADS = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
    JSONISH.map(lambda v: json.dumps(v).encode()),
    SHAPED.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 3000).map(lambda d: b"[" * d + b"]" * d),
    st.just(b"{" * 50),
)
ATTRS = st.dictionaries(st.sampled_from(["lk.transcription_final", "lk.segment_id", "lk.transcribed_track_id", "k"]),
                        st.sampled_from(["true", "false", "TR_1", "", "x"]), max_size=4)
OBSERVATION = st.one_of(
    st.tuples(st.just("packet"), PAYLOADS, TOPICS, IDENTITIES),
    st.tuples(st.just("text"), PAYLOADS, TOPICS, IDENTITIES, ATTRS, st.text(max_size=8), st.booleans()),
    st.tuples(st.just("bytes"), PAYLOADS, TOPICS, IDENTITIES, ATTRS, st.text(max_size=8)),
    st.tuples(st.just("attrs"), IDENTITIES, st.dictionaries(st.text(max_size=20), st.text(max_size=50), max_size=5)),
    st.tuples(st.just("join"), IDENTITIES, st.sampled_from([0, 1, 4, 99, "agent", None]), st.text(max_size=8)),
)


def apply(ingest: Ingest, obs: tuple[Any, ...]) -> None:
    kind = obs[0]
    if kind == "packet":
        ingest.data_packet(obs[1], topic=obs[2], sender_identity=obs[3])
    elif kind == "text":
        text = obs[1].decode("utf-8", "surrogateescape") if obs[6] else obs[1]
        ingest.text_stream(text, topic=obs[2], sender_identity=obs[3], attributes=obs[4], stream_id=obs[5])
    elif kind == "bytes":
        ingest.byte_stream(obs[1], topic=obs[2], sender_identity=obs[3], attributes=obs[4], stream_id=obs[5])
    elif kind == "attrs":
        ingest.participant_attributes(obs[1], obs[2], obs[2])
    else:
        ingest.participant_joined(obs[1], kind=obs[2], sid=obs[3])


async def test_ten_thousand_fuzzed_observations_all_stored(ledger: Ledger, room: str) -> None:
    emitted: list[ev.KnownEvent] = []
    ingest = Ingest(room, emitted.append, bridge_id="fuzz")
    observed = 0

    @settings(max_examples=200, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(st.lists(OBSERVATION, min_size=50, max_size=50))
    def feed(batch: list[tuple[Any, ...]]) -> None:
        nonlocal observed
        for obs in batch:
            before = len(emitted)
            skipped = ingest.counters.skipped
            apply(ingest, obs)  # never raises
            observed += 1
            produced = len(emitted) - before
            # every observation is recorded (an interim transcript is counted instead)
            assert produced >= 1 or ingest.counters.skipped > skipped, obs
            for event in emitted[before:]:
                ev.encode(event)  # and storable

    feed()
    assert observed == 10_000
    writer = BridgeWriter(ledger, stats_interval=0)
    await writer.start()
    for event in emitted:
        writer.submit(event)
    assert await writer.flush(120)
    stored = {r.event.id async for r in ledger.read(room)}
    assert stored == {e.id for e in emitted}
    c = ingest.counters
    assert c.typed + c.raw + c.rejected == len(emitted)
    await writer.close()
