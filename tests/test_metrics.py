"""Prometheus metrics (room_ledger/metrics.py), scraped over HTTP from real work against NATS and PostgreSQL.

The registry is the process's default one, shared by every test in the session: each test reads
the figures before and after its own work and asserts on the difference.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from room_ledger import events as ev
from room_ledger import metrics
from room_ledger.client import Ledger
from room_ledger.hydrate import hydrate
from room_ledger.settings import Settings
from tests.test_cli_helpers import env_for, scripted_events

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def metrics_url() -> str:
    host, port = metrics.serve("127.0.0.1:0")
    return f"http://{host}:{port}/metrics"


async def scrape(url: str, headers: dict[str, str] | None = None) -> Samples:
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_bridge_writer_metrics(ledger: Ledger, room: str, metrics_url: str, tmp_path: Path) -> None:
    from room_ledger.bridge.writer import BridgeWriter

    before = await scrape(metrics_url)
    writer = BridgeWriter(ledger, home=tmp_path, stats_interval=0)
    await writer.start()
    try:
        events = scripted_events(room)
        for event in events:
            writer.submit(event)
        assert await writer.flush(20)
        again = events[4]  # the same event id again: stored once, counted as a duplicate
        writer.submit(again)
        assert await writer.flush(20)
        after = await scrape(metrics_url)
    finally:
        await writer.close()
    transcripts = sum(1 for e in events if e.type == "transcript")
    assert transcripts == 3
    for name in ("ledger_bridge_events_observed_total", "ledger_bridge_events_written_total"):
        assert value(after, name, type="transcript") - value(before, name, type="transcript") == transcripts + 1
        assert value(after, name, type="handoff") - value(before, name, type="handoff") == 1
    dup = "ledger_bridge_duplicates_total"
    assert value(after, dup, type="transcript") - value(before, dup, type="transcript") == 1
    batches = value(after, "ledger_bridge_append_seconds_count") - value(before, "ledger_bridge_append_seconds_count")
    assert batches >= 2
    assert value(after, "ledger_bridge_append_seconds_sum") > value(before, "ledger_bridge_append_seconds_sum")
    assert value(after, "ledger_bridge_last_write_timestamp_seconds") >= time.time() - 60
    assert value(after, "ledger_bridge_pending") == 0 and value(after, "ledger_bridge_nats_ok") == 1
    for name in ("ledger_bridge_rooms", "ledger_bridge_gaps_total", "ledger_bridge_spilled_total",
                 "ledger_bridge_spill_pending", "ledger_bridge_append_failures_total"):
        assert (name, ()) in after, name


async def test_projector_and_hydrate_metrics(pg_settings: Settings, room: str, metrics_url: str) -> None:
    from room_ledger.projections.projector import Projector

    async with Ledger(pg_settings) as ledger:
        await ledger.append_many(scripted_events(room))
        before = await scrape(metrics_url)
        async with Projector(pg_settings, projection=f"t{uuid.uuid4().hex[:8]}") as projector:
            checkpoint = await projector.catch_up()
            folded = (value(await scrape(metrics_url), "ledger_projector_events_folded_total", partition="0")
                      - value(before, "ledger_projector_events_folded_total", partition="0"))
            assert 0 < folded <= checkpoint  # a fresh projection folds the whole stream (purged rooms leave holes)
            deadline = time.monotonic() + 10
            while True:  # the head is read every HEAD_EVERY_S while metrics are served
                now = await scrape(metrics_url)
                if value(now, "ledger_stream_head") >= checkpoint:
                    break
                assert time.monotonic() < deadline, "ledger_stream_head never appeared"
                await asyncio.sleep(0.1)
            assert value(now, "ledger_projector_checkpoint", partition="0") >= checkpoint
            assert ("ledger_projector_lag_events", (("partition", "0"),)) in now
            assert value(now, "ledger_projector_batch_seconds_count", partition="0") > value(
                before, "ledger_projector_batch_seconds_count", partition="0")
        before = await scrape(metrics_url)
        await hydrate(ledger, room)
        after = await scrape(metrics_url)
    hydrations = {
        source: value(after, "ledger_hydrate_seconds_count", source=source)
        - value(before, "ledger_hydrate_seconds_count", source=source)
        for source in ("projection+log", "log")
    }
    assert sum(hydrations.values()) == 1


def test_metrics_port_option_and_serve_endpoint(pg_settings: Settings, room: str) -> None:
    """``ledger project --metrics-port 127.0.0.1:0`` says where /metrics is; ``ledger serve`` answers it too."""
    env = {**os.environ, **env_for(pg_settings)}
    proc = subprocess.Popen([sys.executable, "-m", "room_ledger.cli.main", "project", "--metrics-port", "127.0.0.1:0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        found = re.search(r"metrics: (http://127\.0\.0\.1:\d+/metrics)", line)
        assert found, line
        deadline = time.monotonic() + 30
        while True:  # the projector registers once connected to NATS and PostgreSQL
            samples = asyncio.run(scrape(found.group(1)))
            if ("ledger_projector_checkpoint", (("partition", "0"),)) in samples:
                break
            assert time.monotonic() < deadline, sorted({name for name, _ in samples})
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    bad = subprocess.run([sys.executable, "-m", "room_ledger.cli.main", "project", "--metrics-port", "nine"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 1 and "expected a port (9100) or HOST:PORT" in bad.stderr


async def test_serve_answers_metrics_behind_its_token(ledger: Ledger, room: str) -> None:
    from room_ledger.web.serve import start

    await ledger.append(ev.make_event(room, ev.Transcript(speaker="a", text="hi")))
    runner, served = await start(ledger, port=0, token="tok")
    try:
        async with aiohttp.ClientSession() as http, http.get(served.url + "metrics") as response:
            assert response.status == 401
        samples = await scrape(served.url + "metrics", {"Authorization": "Bearer tok"})
        assert ("ledger_serve_event_streams", ()) in samples and ("ledger_serve_rooms_followed", ()) in samples
    finally:
        await runner.cleanup()


def test_metrics_address_forms() -> None:
    assert metrics.parse_address("9100") == ("127.0.0.1", 9100)
    assert metrics.parse_address("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert metrics.parse_address("[::1]:9100") == ("::1", 9100)
    for bad in ("", "x", "70000", "host:", ":9100x"):
        with pytest.raises(Exception, match="expected a port"):
            metrics.parse_address(bad)


def test_grafana_dashboard_uses_only_metrics_that_exist() -> None:
    import json

    from prometheus_client import REGISTRY, generate_latest

    dashboard = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    used = {name for expr in exprs for name in re.findall(r"\bledger_[a-z_]+", expr)}
    from room_ledger.bridge import metrics as bridge_metrics
    from room_ledger.projections import metrics as projector_metrics

    bridge_metrics.observed("transcript")  # so that labelled families have a sample
    metrics.hydrated("log", 0.001, 0)
    projector_metrics.projected(0, 1, 0, 0.001)
    exposed: set[str] = set()
    for line in generate_latest(REGISTRY).decode().splitlines():
        if line.startswith("# TYPE ledger_"):  # families without samples yet are described too
            _, _, name, kind = line.split()
            suffixes = {"histogram": ["_bucket", "_sum", "_count"]}.get(kind, [""])  # counters: name_total
            exposed.update(name + suffix for suffix in suffixes)
    assert used - exposed == set(), f"the dashboard asks for metrics nobody exposes: {used - exposed}"
    assert {"ledger_bridge_append_seconds_bucket", "ledger_projector_lag_events", "ledger_hydrate_seconds_bucket",
            "ledger_bridge_events_written_total"} <= used


def test_doctor_reads_the_metrics_endpoints(pg_settings: Settings, tmp_path: Path) -> None:
    """``ledger doctor`` reads what the processes' /metrics say; a bridge without one falls back to its stats file."""
    import json

    from room_ledger.bridge.stats import Counters, stats_path, write_stats
    from tests.test_cli_helpers import invoke, json_of

    home = tmp_path / "home"
    # This process stands in for a running bridge: its stats file, and its metrics noted under home.
    metrics.serve("127.0.0.1:0", home=home, role="bridge")
    write_stats(home, "bridge-live", Counters(written=5, rooms=1))
    write_stats(home, "bridge-old", Counters(written=7))
    old = stats_path(home, "bridge-old")
    old.write_text(json.dumps({**json.loads(old.read_text()), "pid": 2**22 + 12345}))  # a process long gone

    env = {**os.environ, **env_for(pg_settings), "LEDGER_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "room_ledger.cli.main", "project", "--metrics-port", "127.0.0.1:0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stderr is not None
        url = re.search(r"(http://\S+/metrics)", proc.stderr.readline())
        assert url, "the projector did not say where its metrics are"
        deadline = time.monotonic() + 30
        while ("ledger_projector_checkpoint", (("partition", "0"),)) not in asyncio.run(scrape(url.group(1))):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        unreachable = "http://127.0.0.1:9/metrics"
        result = invoke(pg_settings, ["doctor", "--json"], LEDGER_HOME=str(home), LEDGER_METRICS_URLS=unreachable)
        report = json_of(result)
        by_url = {m["url"]: m for m in report["metrics"]}
        projector = by_url[url.group(1)]
        assert projector["reachable"] and projector["role"] == "projector 0/1" and projector["pid"] == proc.pid
        assert "0" in projector["figures"]["projector"]["checkpoint"]
        mine = next(m for m in report["metrics"] if m.get("pid") == os.getpid())
        assert mine["reachable"] and mine["role"] == "bridge"
        assert by_url[unreachable]["reachable"] is False and by_url[unreachable]["from"] == "LEDGER_METRICS_URLS"
        assert any(unreachable in p["message"] and p["level"] == "warning" for p in report["problems"])
        bridges = {b["bridge_id"]: b for b in report["bridges"]}
        assert bridges["bridge-live"]["source"] == "metrics" and "events_written" in bridges["bridge-live"]["metrics"]
        assert bridges["bridge-old"]["source"] == "stats file (no metrics endpoint reachable)"
        human = " ".join(invoke(pg_settings, ["doctor"], LEDGER_HOME=str(home)).stdout.split())  # titles wrap
        assert "metrics of projector 0/1" in human and "from its metrics" in human
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    # Gone with its process: nothing left to read.
    assert not any(e["pid"] == proc.pid for e in metrics.endpoints(home))
