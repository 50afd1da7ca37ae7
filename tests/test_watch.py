"""``watch(ledger, room)``: waiting on a room's log against the real nats-server, with deadlines, never sleeps."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from room_ledger import events as ev
from room_ledger.client import Ledger
from room_ledger.errors import LedgerError, LogUnavailable
from room_ledger.watch import WatchTimeout, watch


def status(agent_id: str, task: str) -> ev.KnownEvent:
    return ev.make_event(ROOM, ev.AgentStatus(agent_id=agent_id, status="processing", task=task))


ROOM = f"watch-{uuid.uuid4().hex[:8]}"


async def test_until_sees_history_and_live_records(ledger: Ledger) -> None:
    await ledger.append(status("a", "before"))
    async with watch(ledger, ROOM) as log:
        records = await log.until(lambda rs: len(rs) >= 1, what="the first record")
        assert records[0].event.body.task == "before"  # type: ignore[union-attr]
        waiting = asyncio.create_task(log.until(lambda rs: log.count("agent.status") >= 2, 10))
        await asyncio.sleep(0)
        assert not waiting.done()
        appended = await ledger.append(status("a", "after"))
        assert (await waiting)[-1].seq == appended.seq
        index = await log.next_index(lambda r: r.event.body.task == "after", after=0)  # type: ignore[union-attr]
        assert log.records[index].seq == appended.seq and log.of("agent.status") == log.records


async def test_timeout_says_what_was_awaited_and_what_the_log_has(ledger: Ledger) -> None:
    room = f"watch-{uuid.uuid4().hex[:8]}"
    await ledger.append(ev.make_event(room, ev.FloorRelease(agent_id="a")))
    async with watch(ledger, room) as log:
        with pytest.raises(WatchTimeout) as caught:
            await log.until(lambda rs: log.count("handoff") > 0, 0.5, what="the handoff")
    message = str(caught.value)
    assert "waited 0.5s for the handoff" in message and "1 record, the last: floor.release" in message
    assert isinstance(caught.value, LedgerError) and isinstance(caught.value, TimeoutError)


async def test_a_failed_follow_is_reported_not_waited_out(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        raise LogUnavailable("NATS is down: start it, or set LEDGER_NATS_URL")
        yield  # an async generator, as Ledger.follow is

    monkeypatch.setattr(ledger, "follow", broken)
    log = watch(ledger, ROOM)
    with pytest.raises(LogUnavailable, match="NATS is down"):
        await log.until(lambda rs: False, 30)
    await log.close()  # reported once, not raised again
