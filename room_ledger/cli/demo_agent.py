"""The billing specialist of ``ledger demo``: another process that takes over a call.

It behaves like a pre-warmed agent worker: it loads LiveKit Agents and connects first, says
``{"ready": …}``, then follows the room's log. When a ``handoff`` to it appears, it hydrates the
room to at least that sequence (read-your-writes), builds its ``ChatContext``, reads the session,
and prints one JSON line with what it got and how long each step took::

    python -m room_ledger.cli.demo_agent <room> <agent id>
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import msgspec


def _emit(data: dict[str, Any]) -> None:
    sys.stdout.write(msgspec.json.encode(data).decode() + "\n")
    sys.stdout.flush()


async def take_over(room: str, agent_id: str) -> dict[str, Any]:
    started = time.perf_counter()
    import livekit.agents  # noqa: F401, PLC0415 - timed: the warm-up an agent worker does before it gets a job

    from room_ledger import events as ev  # noqa: PLC0415 - timed with the warm-up above
    from room_ledger.client import Ledger  # noqa: PLC0415 - timed with the warm-up above
    from room_ledger.hydrate import close as close_hydration  # noqa: PLC0415 - timed with the warm-up above
    from room_ledger.hydrate import hydrate  # noqa: PLC0415 - timed with the warm-up above
    from room_ledger.settings import Settings  # noqa: PLC0415 - timed with the warm-up above

    warmed = time.perf_counter()
    async with Ledger(Settings.from_env(), name=f"demo-{agent_id}") as ledger:
        after = await ledger.room_last_seq(room)
        _emit({"ready": True, "after": after, "warm_ms": round((warmed - started) * 1000, 1)})
        async for record in ledger.follow(room, after=after, types=["handoff"]):
            event = record.event
            if isinstance(event, ev.HandoffEvent) and event.body.to_agent == agent_id:
                break
        seen = time.perf_counter()
        handoff_seq = record.seq
        snapshot = await hydrate(ledger, room, min_seq=handoff_seq, timeout=10.0)
        hydrated = time.perf_counter()
        chat_ctx = snapshot.chat_ctx()
        built = time.perf_counter()
        await close_hydration(ledger)
    return {
        "handoff_seq": handoff_seq,
        "seq": snapshot.seq,
        "source": snapshot.source,
        "projection_seq": snapshot.projection_seq,
        "caught_up": snapshot.caught_up,
        "chat_ctx_items": len(chat_ctx.items),
        "session_fields": len(snapshot.session),
        "session_version": snapshot.session_version,
        "floor_holder": snapshot.floor.holder,
        "floor_queue": [c.agent_id for c in snapshot.floor.queue],
        "participants_present": sorted(p.identity for p in snapshot.participants.values() if p.present),
        "caller": snapshot.session.get("caller_name"),
        "timings_ms": {
            "hydrate": round((hydrated - seen) * 1000, 1),
            "chat_ctx": round((built - hydrated) * 1000, 1),
        },
    }


def main() -> None:
    room, agent_id = sys.argv[1], sys.argv[2]
    _emit(asyncio.run(take_over(room, agent_id)))


if __name__ == "__main__":
    main()
