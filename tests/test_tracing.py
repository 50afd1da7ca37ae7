"""OpenTelemetry traces (room_ledger/tracing.py): real ``ledger`` processes export to a real OTLP/HTTP receiver.

The receiver is a small aiohttp server that decodes what the exporter posts (the OTLP protobuf
request); the processes are configured only by the standard ``OTEL_`` variables.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from room_ledger import tracing
from room_ledger.settings import Settings
from tests.test_cli_helpers import env_for, scripted_events


@dataclass
class Receiver:
    url: str = ""
    spans: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def names(self) -> list[str]:
        return [s["name"] for s in self.spans]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    got = Receiver()

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        for resource_spans in message.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}.get("service.name")
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    attributes = {a.key: (a.value.string_value or a.value.int_value) for a in span.attributes}
                    got.spans.append({"name": span.name, "service": service, "attributes": attributes,
                                      "seconds": (span.end_time_unix_nano - span.start_time_unix_nano) / 1e9,
                                      "trace": span.trace_id.hex(), "id": span.span_id.hex(),
                                      "parent": span.parent_span_id.hex()})
        got.arrived.set()
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    got.url = f"http://{host}:{port}"
    yield got
    await runner.cleanup()


async def _ledger(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "room_ledger.cli.main", *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, (out + err).decode()


async def test_projector_and_hydration_spans_reach_an_otlp_endpoint(pg_settings: Settings, room: str,
                                                                   receiver: Receiver) -> None:
    from room_ledger.client import Ledger

    async with Ledger(pg_settings) as ledger:
        await ledger.append_many(scripted_events(room))
    env = {**os.environ, **env_for(pg_settings), "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
           "OTEL_SERVICE_NAME": "ledger-test"}
    env.pop("OTEL_SDK_DISABLED", None)
    code, output = await _ledger(env, "project", "--once", "--json")
    assert code == 0, output
    code, output = await _ledger(env, "state", room, "--json")
    assert code == 0, output
    # Both processes flushed their spans on the way out.
    names = receiver.names()
    assert "ledger.projector.batch" in names and "ledger.hydrate" in names, names
    batch = next(s for s in receiver.spans if s["name"] == "ledger.projector.batch")
    assert batch["service"] == "ledger-test" and batch["attributes"]["ledger.events"] > 0
    assert batch["attributes"]["ledger.partition"] == 0 and batch["seconds"] > 0
    hydrate = next(s for s in receiver.spans if s["name"] == "ledger.hydrate")
    assert hydrate["attributes"]["ledger.source"] in ("projection+log", "log")


async def test_traces_are_off_without_an_endpoint(pg_settings: Settings, room: str, receiver: Receiver) -> None:
    from room_ledger.client import Ledger

    assert not tracing.configured({})
    assert not tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"})
    assert tracing.configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x"})
    async with Ledger(pg_settings) as ledger:
        await ledger.append_many(scripted_events(room))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(env_for(pg_settings))
    # The endpoint is given but the SDK disabled: nothing may arrive.
    env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_SDK_DISABLED": "true"})
    code, output = await _ledger(env, "state", room, "--json")
    assert code == 0, output
    assert receiver.spans == []


_SOURCE = """
import json
from room_ledger import tracing
with tracing.span("ledger.handoff", {"ledger.from": "triage", "ledger.to": "billing"}) as carrier:
    print(json.dumps(carrier))
"""

_TARGET = """
import sys
from room_ledger import metrics, tracing
with tracing.span("ledger.handoff.resume", {"ledger.agent": "billing"}, traceparent=sys.argv[1]):
    metrics.hydrated("projection+log", 0.004, 3)  # what hydrate() records, inside the resume
"""


async def test_a_trace_crosses_processes_through_traceparent(receiver: Receiver) -> None:
    """One process's span hands its traceparent to another: one trace, the hydration inside the resume."""
    import json

    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_SERVICE_NAME": "agent"}
    env.pop("OTEL_SDK_DISABLED", None)

    async def python(code: str, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, *args, env=env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        return out.decode()

    carrier = json.loads(await python(_SOURCE))
    assert carrier["traceparent"].startswith("00-")
    await python(_TARGET, carrier["traceparent"])
    spans = {s["name"]: s for s in receiver.spans}
    handoff, resume, hydrate = spans["ledger.handoff"], spans["ledger.handoff.resume"], spans["ledger.hydrate"]
    assert handoff["trace"] == resume["trace"] == hydrate["trace"]
    assert resume["parent"] == handoff["id"] and hydrate["parent"] == resume["id"]
    assert handoff["attributes"] == {"ledger.from": "triage", "ledger.to": "billing"}

    # Traces off: the same block runs and hands on nothing.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    assert json.loads(await python(_SOURCE)) == {}
