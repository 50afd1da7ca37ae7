"""One trace across a real cross-process handoff (issue 16.2), on the real livekit-server.

examples/handoff's two AgentServer workers run with ``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at an
OTLP/HTTP receiver in this process: triage's handoff span (with the dispatch inside) carries its trace
context in the ``handoff`` event, and billing's resume (with its hydration inside) and its first
reply continue that trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

from room_ledger import events as ev
from room_ledger.client import Ledger
from room_ledger.settings import Settings
from room_ledger.watch import RoomWatch as Log
from tests.handoff_example import ExampleWorkers, Replies, workers  # noqa: F401
from tests.test_bridge_livekit import lk_settings, running_bridge  # noqa: F401
from tests.test_tracing import Receiver, receiver  # noqa: F401

pytestmark = pytest.mark.livekit


async def test_one_trace_from_the_handoff_to_the_targets_first_reply(
        lk_settings: Settings, ledger: Ledger, room: str, livekit_connect: Any,
        workers: ExampleWorkers, receiver: Receiver) -> None:
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    log = Log(ledger, room)
    await workers.start("triage", OTEL_SERVICE_NAME="triage", **otel)
    await workers.start("billing", OTEL_SERVICE_NAME="billing", **otel)
    async with running_bridge(lk_settings, room):
        user = await livekit_connect("caller", room)
        replies = Replies(user)
        await workers.dispatch(room, workers.triage)
        greeting = await replies.next()
        await log.until(lambda rs: any(r.type == "floor.request" for r in rs))
        await user.local_participant.send_text("Hi, I'm Ana, my account is 7", topic="lk.chat")
        await replies.next()
        await log.until(lambda rs: len(log.of("session.patch")) >= 2)
        await user.local_participant.send_text("I have a question about my bill", topic="lk.chat")
        await replies.next()
        hello = await replies.next(timeout=40)
        assert hello.agent == workers.billing and hello.identity != greeting.identity

        def spans() -> dict[str, dict[str, Any]]:
            return {s["name"]: s for s in receiver.spans}

        deadline = time.monotonic() + 30
        wanted = {"ledger.handoff", "ledger.dispatch", "ledger.handoff.resume", "ledger.hydrate",
                  "ledger.handoff.first_reply"}
        while not wanted <= {s["name"] for s in receiver.spans if s["service"] in ("triage", "billing")}:
            assert time.monotonic() < deadline, f"spans so far: {sorted({s['name'] for s in receiver.spans})}"
            receiver.arrived.clear()
            with contextlib.suppress(TimeoutError):  # a batch of spans arrives, or look again
                await asyncio.wait_for(receiver.arrived.wait(), 1.0)

    (handoff_record,) = log.of("handoff")
    sent = ev.extra_fields(handoff_record.event)  # type: ignore[arg-type]
    assert str(sent["traceparent"]).startswith("00-")
    found = spans()
    handoff, resume, first_reply = found["ledger.handoff"], found["ledger.handoff.resume"], \
        found["ledger.handoff.first_reply"]
    assert handoff["service"] == "triage" and resume["service"] == first_reply["service"] == "billing"
    assert handoff["trace"] == resume["trace"] == first_reply["trace"]
    assert resume["parent"] == handoff["id"] and first_reply["parent"] == resume["id"]
    assert sent["traceparent"].split("-")[1] == handoff["trace"]
    hydrations = [s for s in receiver.spans if s["name"] == "ledger.hydrate" and s["parent"] == resume["id"]]
    assert len(hydrations) == 1 and hydrations[0]["trace"] == handoff["trace"]
    assert handoff["attributes"]["ledger.to"] == workers.billing
    dispatch = found["ledger.dispatch"]  # LiveKit's agent dispatch, inside the handoff
    assert dispatch["parent"] == handoff["id"] and dispatch["attributes"]["ledger.agent_name"] == workers.billing

