"""``ledger demo`` and ``ledger up`` on a fresh embedded default, and ``replay --html`` in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from room_ledger import embedded
from room_ledger.settings import Settings
from tests.conftest import fresh_home
from tests.test_cli_helpers import invoke, json_of, ok, seed

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture
def empty_home() -> Iterator[Path]:
    home = fresh_home("cli")
    yield home
    embedded.stop_nats(home)
    embedded.stop_postgres(home)
    shutil.rmtree(home, ignore_errors=True)


def _unconfigured(home: Path) -> dict[str, str]:
    """The environment of a fresh install: nothing configured but the data folder."""
    return {"LEDGER_NATS_URL": "", "LEDGER_DATABASE_URL": "", "LEDGER_HOME": str(home), "LEDGER_STREAM": ""}


def test_demo_on_the_embedded_default(settings: Settings, empty_home: Path) -> None:
    started = time.monotonic()
    result = invoke(settings, ["demo", "--json"], **_unconfigured(empty_home))
    took = time.monotonic() - started
    assert result.exit_code == 0, result.output
    summary = json_of(result)
    assert took < 30, f"demo took {took:.1f}s"
    assert summary["room"].startswith("demo-") and summary["events"] > 40
    assert summary["floor_holder"] is None  # the billing agent resolved at the end
    assert summary["session_fields"] >= 120
    late = summary["late_joiner"]
    assert late["source"] == "projection+log" and late["seq"] >= late["handoff_seq"]
    assert late["session_fields"] >= 120 and late["chat_ctx_items"] >= 6 and late["caller"] == "Dana Whitfield"
    assert late["pid"] != os.getpid()
    assert [(h["from"], h["to"]) for h in summary["handoffs"]] == [("triage", "billing")]
    assert summary["handoffs"][0]["dead_air_s"] is not None
    timings = summary["timings"]
    assert timings["ingest_events_per_s"] > 0 and timings["hydrate_ms"] > 0
    # Cleaned up: the room is gone and the servers the demo started are stopped.
    assert summary["kept"] is False and summary["cleanup"]["events_removed"] == summary["events"]
    assert summary["cleanup"]["projection_rows_removed"]["room_state"] == 1
    assert embedded.status(empty_home) == {"nats": None, "postgres": None}


def test_demo_keep_then_explore(settings: Settings, empty_home: Path) -> None:
    env = _unconfigured(empty_home)
    result = invoke(settings, ["demo", "--keep"], **env)
    assert result.exit_code == 0, result.output
    out = result.stdout
    room = re.search(r"ledger demo: room '([^']+)'", out)
    assert room is not None
    for heading in ("ledger replay", "--floor", "--handoffs", "what billing hydrated", "timings", "kept: try"):
        assert heading in out, heading
    assert "triage hands the caller to billing" in out
    rooms = json_of(ok(settings, ["rooms", "--json"], **env))
    assert room.group(1) in [r["room"] for r in rooms]
    state = json_of(ok(settings, ["state", room.group(1), "--json"], **env))
    assert state["session"]["caller_name"] == "Dana Whitfield"


def test_up_runs_until_ctrl_c(empty_home: Path) -> None:
    env = {**os.environ, **_unconfigured(empty_home)}
    proc = subprocess.Popen([sys.executable, "-m", "room_ledger.cli.main", "up", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())  # blocks until both servers answer
        assert ready["event"] == "ready"
        assert ready["nats"]["url"].startswith("nats://") and ready["postgres"]["url"].startswith("postgresql://")
        live = embedded.status(empty_home)
        assert live["nats"] is not None and live["postgres"] is not None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
        assert embedded.status(empty_home) == {"nats": None, "postgres": None}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_up_with_both_servers_configured_is_an_error(settings: Settings) -> None:
    result = invoke(settings, ["up"], LEDGER_DATABASE_URL="postgresql://x@127.0.0.1:1/db")
    assert result.exit_code == 1 and "nothing to run" in result.stderr


# --- the HTML page in headless Chromium ---------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (apt-get install -y chromium)")


def test_html_page_is_self_contained_and_renders(settings: Settings, room: str, tmp_path: Path) -> None:
    chromium = _chromium()
    seed(settings, room)
    page = tmp_path / "room.html"
    summary = json_of(ok(settings, ["replay", room, "--html", str(page), "--json"]))
    assert summary["file"] == str(page) and summary["events"] == 12 and summary["handoffs"] == 1
    html = page.read_text()
    # Nothing to fetch at view time: no external scripts, styles, images or fonts.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html, re.IGNORECASE)
    assert "@import" not in html and "url(" not in html
    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=90, check=True,
    ).stdout
    assert f'<code id="room-name">{room}</code>' in dom
    for section in ("floor", "handoffs", "participants", "conversation", "session", "gaps"):
        assert f'id="{section}"' in dom, section
    assert dom.count('class="tenure"') == 2 and 'data-agent="triage"' in dom and 'data-agent="billing"' in dom
    assert "I was charged twice." in dom and "Billing here, I see the double charge." in dom
    assert "caller_name" in dom and "billing question" in dom and "4.5s" in dom
    assert "user-1" in dom and "reconnect" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
                   capture_output=True, timeout=90, check=True)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_html_escapes_what_the_room_says(settings: Settings, room: str, tmp_path: Path) -> None:
    from room_ledger import events as ev

    seed(settings, room, [ev.make_event(room, ev.Transcript(speaker="<b>x</b>", text="<script>alert(1)</script>"))])
    page = tmp_path / "room.html"
    ok(settings, ["replay", room, "--html", str(page)])
    html = page.read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


@pytest.mark.livekit
def test_demo_through_a_real_livekit_room(settings: Settings, empty_home: Path, livekit_server: Any) -> None:
    """With LIVEKIT_URL set, the demo's caller and agents are real participants and the bridge records them."""
    env = {**_unconfigured(empty_home), "LIVEKIT_URL": livekit_server.url,
           "LIVEKIT_API_KEY": livekit_server.api_key, "LIVEKIT_API_SECRET": livekit_server.api_secret}
    summary = json_of(ok(settings, ["demo", "--json", "--keep"], **env))
    room = summary["room"]
    assert summary["session_fields"] >= 120 and summary["floor_holder"] is None
    assert [h["to"] for h in summary["handoffs"]] == ["billing"] and summary["handoffs"][0]["dead_air_s"] is not None
    out = ok(settings, ["replay", room, "--json"], **env)
    records = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    types = [r["type"] for r in records]
    assert types[0] == "bridge.joined" and "bridge.left" in types
    joined = {r["body"]["identity"]: r["body"] for r in records if r["type"] == "participant.joined"}
    assert set(joined) == {"caller", "triage", "lookup", "scribe", "billing"}
    assert all(body["sid"].startswith("PA_") for body in joined.values())  # sids the server gave
    transcripts = [r["body"] for r in records if r["type"] == "transcript"]
    assert transcripts[0]["speaker"] == "caller"  # triage transcribed the caller's microphone track
    assert transcripts[0]["text"].startswith("Hi, I was charged twice")
    statuses = [(r["sender"]["identity"], r["body"]["status"]) for r in records if r["type"] == "agent.status"]
    assert statuses[:2] == [("triage", "processing"), ("lookup", "processing")]
