"""Roles decided by log order (seed 002): the rule on appended events, its place in the projection,
hydration, ``ledger state`` and ``replay --at``; and the seed's exact race on the real livekit-server:
two agent workers (separate processes) dispatched to one room at the same instant, 50 rooms in a row."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from livekit import api

from room_ledger import events as ev
from room_ledger.bridge.tokens import create_dispatch
from room_ledger.client import Ledger, Record
from room_ledger.hydrate import close, hydrate
from room_ledger.projections.projector import Projector
from room_ledger.roles import Roles, apply_event
from room_ledger.settings import Settings
from room_ledger.watch import RoomWatch
from tests import processes
from tests.test_bridge_worker import lk_settings, restore_environ, worker_bridge
from tests.test_cli_helpers import env_for, json_of, ok

__all__ = ["lk_settings", "restore_environ"]  # fixtures used by name

T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
BOTH = ["customer", "support"]


def agent(name: str) -> ev.Sender:
    return ev.Sender(identity=name, kind="agent")


class _Record:
    def __init__(self, seq: int, event: ev.KnownEvent) -> None:
        self.seq, self.event, self.time = seq, event, T0 + timedelta(seconds=seq)


def body_of(record: Any) -> Any:
    return record.event.body


def fold_roles(events: list[ev.KnownEvent]) -> Roles:
    roles = Roles()
    for n, event in enumerate(events, 1):
        record = _Record(n, event)
        apply_event(roles, record.event, record.seq, record.time)
    return roles


def claim(who: str, roles: list[str] = BOTH) -> ev.KnownEvent:
    return ev.make_event("r", ev.RoleClaim(agent_id=who, roles=roles), sender=agent(who))


def test_the_earliest_claim_gets_the_first_free_role() -> None:
    roles = fold_roles([claim("b"), claim("a"), claim("c"), claim("a")])
    assert roles.assignment() == {"customer": "b", "support": "a"}
    assert [w.agent_id for w in roles.waiting] == ["c"]  # a's second claim changes nothing

    # Preference order is the claim's; a taken role falls through to the next.
    roles = fold_roles([claim("a", ["support", "customer"]), claim("b", ["support", "customer"])])
    assert roles.assignment() == {"support": "a", "customer": "b"}


def test_a_freed_role_goes_to_the_earliest_waiting_claim_that_lists_it() -> None:
    left = ev.make_event("r", ev.ParticipantLeft(identity="a"), sender=agent("a"))
    roles = fold_roles([claim("a"), claim("b"), claim("c", ["support"]), claim("d"), left])
    # a's customer role goes to d (c does not accept customer), c keeps waiting for support.
    assert roles.assignment() == {"customer": "d", "support": "b"}
    assert [w.agent_id for w in roles.waiting] == ["c"]
    release = ev.make_event("r", ev.RoleRelease(agent_id="b"), sender=agent("b"))
    roles = fold_roles([claim("a"), claim("b"), claim("c", ["support"]), claim("d"), left, release])
    assert roles.assignment() == {"customer": "d", "support": "c"} and roles.waiting == []
    withdraw = ev.make_event("r", ev.RoleRelease(agent_id="c"), sender=agent("c"))
    roles = fold_roles([claim("a"), claim("b"), claim("c"), withdraw, left])
    assert roles.assignment() == {"support": "b"} and roles.waiting == []


async def test_roles_in_projection_hydration_state_and_replay(pg_settings: Settings) -> None:
    room = f"roles-{uuid.uuid4().hex[:10]}"
    events: list[ev.KnownEvent] = [
        ev.make_event(room, ev.ParticipantJoined(identity=who, kind="agent"), sender=agent(who)) for who in "abc"]
    events += [ev.make_event(room, ev.RoleClaim(agent_id=who, roles=BOTH), sender=agent(who)) for who in "abc"]
    async with Ledger(pg_settings) as ledger:
        positions = await ledger.append_many(events)
        async with Projector(pg_settings) as projector:
            await projector.catch_up()
        left = await ledger.append(ev.make_event(room, ev.ParticipantLeft(identity="a"), sender=agent("a")))
        snapshot = await hydrate(ledger, room)
        await close(ledger)
    assert snapshot.source == "projection+log" and snapshot.projection_seq == positions[-1].seq
    assert snapshot.state.roles.assignment() == {"customer": "c", "support": "b"}
    assert snapshot.state.roles.holders["customer"].seq == left.seq  # taken when a left

    env = env_for(pg_settings)
    state = json_of(await asyncio.to_thread(ok, pg_settings, ["state", room, "--json"], **env))
    holders = state["roles"]["holders"]
    assert {role: h["agent_id"] for role, h in holders.items()} == {"customer": "c", "support": "b"}
    text = (await asyncio.to_thread(ok, pg_settings, ["state", room], **env)).stdout
    assert "roles: customer = c, support = b" in text
    before = (await asyncio.to_thread(ok, pg_settings, ["replay", room, "--at", str(positions[-1].seq)],
                                      **env)).stdout
    assert "roles: customer = a, support = b" in before and "waiting: c (customer/support)" in before
    timeline = (await asyncio.to_thread(ok, pg_settings, ["replay", room], **env)).stdout
    assert "claims a role: customer/support" in timeline


# --- the seed's race on the real livekit-server -----------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


@contextlib.asynccontextmanager
async def role_workers(settings: Settings, livekit_server: Any, agent_name: str, count: int, logs: Path) -> AsyncIterator[
        list[asyncio.subprocess.Process]]:
    """``count`` worker processes (tests/role_worker.py) registered under one agent name; output in ``logs``."""
    env = {**os.environ, **env_for(settings), "LIVEKIT_URL": livekit_server.url,
           "LIVEKIT_API_KEY": livekit_server.api_key, "LIVEKIT_API_SECRET": livekit_server.api_secret}
    env.pop("LEDGER_DATABASE_URL", None)
    env["ROLE_WORKER_ONE_PER_ROOM"] = "1"  # a room's two jobs go to two worker processes
    procs: list[asyncio.subprocess.Process] = []
    try:
        for _ in range(count):
            mark = livekit_server.log_mark()
            output = logs / f"role-worker-{len(procs)}.log"
            with output.open("wb") as sink:
                proc = await processes.start(
                    sys.executable, "-m", "tests.role_worker", agent_name, env=env, cwd=REPO,
                    stdout=sink, stderr=asyncio.subprocess.STDOUT)
            procs.append(proc)
            await livekit_server.worker_registered(agent_name, 60, after=mark)
        yield procs
    finally:
        # each worker with its job processes (the workers run jobs in processes, as in the seed)
        await asyncio.gather(*(processes.stop(proc) for proc in procs))


def _roles_reported(records: list[Record]) -> dict[str, dict[str, str]]:
    """identity -> its test.* attributes, as the bridge recorded them."""
    seen: dict[str, dict[str, str]] = {}
    for record in records:
        event = record.event
        # Attributes set before the server announced the agent arrive with its join.
        if isinstance(event, ev.ParticipantAttributesEvent | ev.ParticipantJoinedEvent) and (
                "test.role" in event.body.attributes):
            seen[event.body.identity] = dict(event.body.attributes)
    return seen


def _what_happened(logs: Path, livekit_server: Any, room: str) -> str:
    workers = [path.read_text(errors="replace")[-2000:] for path in sorted(logs.glob("role-worker-*"))]
    lines = livekit_server.log_path.read_text(errors="replace").splitlines()
    start = next((n for n, line in enumerate(lines) if room in line), len(lines))
    server = [line[:300] for line in lines[start:] if "unified" in line or '"level":"warn' in line
              or '"level":"error' in line or "job" in line.lower()]
    return f"workers said {workers}; the server said {server[:25]}"


@pytest.mark.livekit
@pytest.mark.timeout(900)
@pytest.mark.parametrize("rooms", [5, pytest.param(50, marks=pytest.mark.slow)], ids=["5-rooms", "50-rooms"])
async def test_two_agents_dispatched_at_once_take_distinct_roles_room_after_room(
        lk_settings: Settings, ledger: Ledger, livekit_server: Any, tmp_path: Path, rooms: int) -> None:
    """Seed 002's race, room after room (50 rooms take two minutes: ``-m slow``)."""
    name = f"unified-{uuid.uuid4().hex[:8]}"
    claim_ms: list[float] = []
    workers_per_room: list[int] = []
    async with worker_bridge(lk_settings, livekit_server), role_workers(lk_settings, livekit_server, name, 2,
                                                                                   tmp_path):
        for n in range(rooms):
            room = f"race-{uuid.uuid4().hex[:8]}-{n}"
            log = RoomWatch(ledger, room)
            try:
                await create_dispatch(lk_settings, room)  # the bridge first: claims travel through the room
                await log.until(lambda rs: any(r.type == "bridge.joined" for r in rs), timeout=30)
                # Seed 002: two dispatches of the same agent at the same instant.
                await asyncio.gather(create_dispatch(lk_settings, room, agent_name=name),
                                     create_dispatch(lk_settings, room, agent_name=name))
                await log.until(lambda rs: len(_roles_reported(rs)) == 2, timeout=30)
            except AssertionError:
                raise AssertionError(f"room {n}: {[r.type for r in log.records]}; "
                                     f"{await asyncio.to_thread(_what_happened, tmp_path, livekit_server, room)}"
                                     ) from None
            finally:
                await log.close()
            reported = _roles_reported(log.records)
            claims = [r for r in log.records if r.type == "role.claim"]
            assert len(claims) == 2, [r.type for r in log.records]
            # Each agent's own answer, the log's order and hydration agree: distinct roles.
            assert sorted(a["test.role"] for a in reported.values()) == ["customer", "support"], reported
            # A sorted set: the claim first in the log gets "customer". (The claim may reach the bridge
            # before the server announces its sender, so the event's sender can be empty: the body says who.)
            claim = claims[0].event
            assert isinstance(claim, ev.RoleClaimEvent)
            first = claim.body.agent_id
            assert reported[first]["test.role"] == "customer"
            snapshot = await hydrate(ledger, room)
            assert {h.agent_id: role for role, h in snapshot.state.roles.holders.items()} == {
                identity: attrs["test.role"] for identity, attrs in reported.items()}
            claim_ms.extend(float(a["test.claim_ms"]) for a in reported.values())
            workers_per_room.append(len({a["test.worker"] for a in reported.values()}))
            async with lk_api(lk_settings) as lk:
                await lk.room.delete_room(api.DeleteRoomRequest(room=room))

    print(f"\n{rooms} rooms: claim to role median {statistics.median(claim_ms):.1f} ms, "
          f"max {max(claim_ms):.1f} ms; rooms whose two agents ran in two worker processes: "
          f"{sum(1 for w in workers_per_room if w == 2)}")
    assert workers_per_room == [2] * rooms, workers_per_room


@contextlib.asynccontextmanager
async def lk_api(settings: Settings) -> AsyncIterator[api.LiveKitAPI]:
    from room_ledger.bridge.tokens import livekit_api

    lk = livekit_api(settings)
    try:
        yield lk
    finally:
        await lk.aclose()


@pytest.mark.livekit
async def test_a_role_is_freed_when_its_holder_leaves(lk_settings: Settings, ledger: Ledger, room: str,
                                                      livekit_server: Any, livekit_connect: Any) -> None:
    """Three agents, two roles, on the real server: the third waits; the customer leaves; it becomes customer."""
    from room_ledger.agents import LedgerAgent

    log = RoomWatch(ledger, room)
    async with worker_bridge(lk_settings, livekit_server):
        await create_dispatch(lk_settings, room)
        await log.until(lambda rs: any(r.type == "bridge.joined" for r in rs), timeout=30)
        rooms = {name: await livekit_connect(name, room, kind="agent") for name in ("ann", "bob", "cid")}
        # The bridge must know them for their leaving to be in the log.
        await log.until(lambda rs: {body_of(r).identity for r in rs if r.type == "participant.joined"} >= set(rooms),
                        timeout=30)
        agents = {name: LedgerAgent(lk_room, ledger) for name, lk_room in rooms.items()}
        for agent in agents.values():
            await agent.start()
        assert await agents["ann"].claim_role(["customer", "support"]) == "customer"
        assert await agents["bob"].claim_role(["customer", "support"]) == "support"
        waiting = asyncio.ensure_future(agents["cid"].claim_role(["customer", "support"], timeout=30))
        await agents["bob"].wait_until(lambda s: [w.agent_id for w in s.roles.waiting] == ["cid"])
        assert not waiting.done()
        await rooms["ann"].disconnect()  # the bridge records participant.left: ann's role is free
        assert await waiting == "customer"
        await agents["bob"].wait_until(lambda s: s.roles.assignment() == {"customer": "cid", "support": "bob"})
        for agent in agents.values():
            await agent.stop()
    await log.close()
    left = next(r for r in log.records if r.type == "participant.left")
    snapshot = await hydrate(ledger, room)
    assert snapshot.state.roles.holders["customer"].seq == left.seq
