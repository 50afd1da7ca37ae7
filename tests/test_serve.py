"""``ledger serve``: the web view in headless Chromium (DevTools protocol) against the real log (NATS).

The page loads; a new event appears live (waited for with a timeout: how fast is bench/serve.py's
figure); the slider shows the room's state at that moment; hostile room names and transcripts are
shown as text; a wrong token gets 401. The JSON API is checked with a plain HTTP client.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from room_ledger import events as ev
from room_ledger.client import Ledger
from room_ledger.settings import Settings
from tests.cdp import Browser, Page
from tests.test_cli_helpers import BILLING, TRIAGE, USER, at, env_for, scripted_events


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with Browser.launch() as launched:
        yield launched


async def _serve(ledger: Ledger, token: str | None = None) -> tuple[Any, str]:
    from room_ledger.web.serve import start

    runner, served = await start(ledger, host="127.0.0.1", port=0, token=token)
    return runner, served.url


@pytest.fixture
async def served(ledger: Ledger) -> AsyncIterator[str]:
    runner, url = await _serve(ledger)
    yield url
    await runner.cleanup()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    opened = await browser.page()
    yield opened
    await opened.close()


def _q(room: str) -> str:
    from urllib.parse import urlencode

    return urlencode({"room": room})


async def test_rooms_page_lists_the_room_and_links_to_it(ledger: Ledger, room: str, served: str, page: Page) -> None:
    await ledger.append_many(scripted_events(room))
    assert await page.goto(served) == 200
    link = await page.wait_for(
        f"[...document.querySelectorAll('a.room-link')].find(a => a.textContent === {json.dumps(room)})?.href")
    assert link.endswith("/room?" + _q(room))
    row = await page.evaluate(f"document.querySelector('tr[data-room={json.dumps(room)}]').innerText")
    assert "12" in row and "billing" in row and "triage" in row  # 12 events; present participants


async def test_room_page_shows_the_room_and_follows_the_log(ledger: Ledger, room: str, served: str,
                                                           page: Page) -> None:
    positions = await ledger.append_many(scripted_events(room))
    last = positions[-1].seq
    assert await page.goto(f"{served}room?{_q(room)}") == 200
    await page.wait_for(f"document.querySelectorAll('#timeline li').length === 12 && "
                        f"document.body.dataset.viewSeq === '{last}'")
    assert await page.text("#room-name") == room
    # Floor lanes, handoffs with dead air, participants, conversation, session and its patches, gaps.
    assert await page.evaluate("document.querySelectorAll('#floor-lanes rect.tenure').length") == 2
    handoff = await page.text("#handoff-rows")
    assert "triage" in handoff and "billing" in handoff and "billing question" in handoff and "4.5s" in handoff
    assert "I was charged twice." in await page.text("#conversation-items")
    assert '"caller_name": "Ann"' in await page.text("#session-doc")
    assert "set caller_name, account" in await page.text("#session-changes")
    assert "reconnect" in await page.text("#gap-rows") and "1 bridge gap" in await page.text("#gap-warning")
    assert await page.text("#floor-holder") == "free"  # billing released at the end

    # A new event appears in the open page, pushed over its WebSocket.
    started = time.monotonic()
    new = await ledger.append(ev.make_event(room, ev.AgentStatus(agent_id="billing", status="processing",
                                                                 action_lock=True, task="refund #2"),
                                            sender=BILLING))
    await page.wait_for(f"document.querySelector('#timeline li[data-seq=\"{new.seq}\"]')?.textContent"
                        ".includes('billing is processing on refund #2')", timeout=10)
    took = time.monotonic() - started
    # ... and the folded view follows it (at most one refresh a second).
    await page.wait_for("document.querySelector('#floor-holder').textContent.startsWith('billing')", timeout=10)
    assert "holds the floor" in await page.evaluate(
        "document.querySelector('#participant-rows tr[data-identity=\"billing\"]').innerText")
    print(f"event to page: {took * 1000:.0f} ms")


async def test_the_slider_shows_the_room_at_that_moment(ledger: Ledger, room: str, served: str, page: Page) -> None:
    positions = await ledger.append_many(scripted_events(room))
    seqs = [p.seq for p in positions]
    await page.goto(f"{served}room?{_q(room)}")
    await page.wait_for(f"document.body.dataset.viewSeq === '{seqs[-1]}' && "
                        "document.querySelectorAll('#timeline li').length === 12")
    # Before the handoff (the 9th event) triage held the floor with billing queued; then billing took it.
    for index, holder, queue in ((5, "triage", "billing"), (8, "billing", "empty")):
        seq = seqs[index]
        await page.evaluate(f"(() => {{ const s = document.getElementById('slider'); s.value = '{seq}'; "
                            "s.dispatchEvent(new Event('input')); s.dispatchEvent(new Event('change')); })()")
        await page.wait_for(f"document.body.dataset.viewSeq === '{seq}'")
        assert (await page.text("#floor-holder")).startswith(holder), seq
        assert await page.text("#floor-queue") == queue
        assert "at #" in await page.text("#live-badge")
        assert f"#{seq}" in await page.text("#at-banner")
        future = await page.evaluate("[...document.querySelectorAll('#timeline li.future')].map(li => +li.dataset.seq)")
        assert future == [s for s in seqs if s > seq]
    # The state at #4 had no session yet; the handoff at #8 shows in the handoff table.
    assert "triage" in await page.text("#handoff-rows")
    await page.evaluate("document.getElementById('back-to-live').click()")
    await page.wait_for(f"document.body.dataset.viewSeq === '{seqs[-1]}' && "
                        "document.querySelector('#live-badge').textContent === 'live'")
    assert await page.text("#floor-holder") == "free"


async def test_search_within_a_room(ledger: Ledger, room: str, served: str, page: Page) -> None:
    positions = await ledger.append_many(scripted_events(room))
    await page.goto(f"{served}room?{_q(room)}")
    await page.wait_for("document.querySelectorAll('#timeline li').length === 12")
    await page.evaluate("document.getElementById('search').value = 'CHARGE'; "
                        "document.getElementById('search-form').requestSubmit()")
    hits = await page.wait_for("[...document.querySelectorAll('#search-hits li')].map(li => +li.dataset.seq)"
                               ".join(',') || ''")
    # "I was charged twice." and "Billing here, I see the double charge." — any case.
    assert hits == f"{positions[7].seq},{positions[9].seq}"
    await page.evaluate("document.querySelector('#search-hits li').click()")
    await page.wait_for(f"document.body.dataset.viewSeq === '{positions[7].seq}'")


async def test_hostile_room_names_and_transcripts_are_shown_as_text(ledger: Ledger, served: str,
                                                                    page: Page) -> None:
    room = f'<img src=x onerror="window.pwned=1">&amp;"{os.urandom(3).hex()}</script>'
    text = "<script>window.pwned=2</script><b>bold?</b> & <img src=x onerror=\"window.pwned=3\">"
    e = ev.make_event
    await ledger.append_many([
        e(room, ev.ParticipantJoined(identity="<i>caller</i>", kind="standard"), sender=USER, at=at(0)),
        e(room, ev.Transcript(speaker="<i>caller</i>", text=text, segment_id="s1"), sender=USER, at=at(1)),
        e(room, ev.SessionPatch(patch={"<b>k</b>": "<svg onload=alert(1)>"}), sender=TRIAGE, at=at(2)),
        e(room, ev.FloorRequest(agent_id='<svg onload="window.pwned=4">', task="<u>t</u>"), sender=TRIAGE, at=at(3)),
    ])
    await page.goto(served)
    await page.wait_for(f"[...document.querySelectorAll('a.room-link')].some(a => a.textContent === {json.dumps(room)})")
    await page.goto(f"{served}room?{_q(room)}")
    await page.wait_for("document.querySelectorAll('#timeline li').length === 4 && "
                        "document.body.dataset.viewSeq !== undefined")
    assert await page.text("#room-name") == room
    assert text in await page.text("#timeline") and text in await page.text("#conversation-items")
    assert "<svg onload" in await page.text("#floor-holder")
    assert '"<b>k</b>": "<svg onload=alert(1)>"' in await page.text("#session-doc")
    assert "<svg onload" in await page.text("#floor-lanes")  # the lane label, as text in the SVG
    # Nothing the room said became markup, and no handler ran.
    assert await page.evaluate("document.querySelectorAll('main img, #timeline img, #conversation-items img, "
                               "img, b, i, u, script:not([src])').length") == 0
    assert await page.evaluate("document.querySelectorAll('svg svg, svg[onload]').length") == 0
    assert await page.evaluate("window.pwned === undefined")
    assert page.exceptions == []


async def test_token_wrong_gets_401_right_gets_in(ledger: Ledger, room: str, browser: Browser) -> None:
    await ledger.append_many(scripted_events(room))
    runner, url = await _serve(ledger, token="s3cret-token")
    page = await browser.page()
    try:
        async with aiohttp.ClientSession() as http:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer s3cret-token-"}):
                for path in ("", "room?" + _q(room), "api/rooms", "api/room?" + _q(room),
                             "api/events?" + _q(room), "static/room.js"):
                    async with http.get(url + path, headers=headers) as response:
                        assert response.status == 401, (path, headers)
                        assert response.headers["WWW-Authenticate"].startswith("Bearer")
            async with http.get(url + "api/rooms", headers={"Authorization": "Bearer s3cret-token"}) as response:
                assert response.status == 200 and room in [r["room"] for r in await response.json()]
            async with http.get(url + "api/rooms?token=wrong") as response:
                assert response.status == 401
        # A browser: the wrong token is refused, the right one (once, in the address) lets it in,
        # and the event stream follows with the cookie it left.
        assert await page.goto(f"{url}?token=wrong") == 401
        assert "needs its token" in await page.text("body")
        assert await page.goto(f"{url}room?{_q(room)}&token=s3cret-token") == 200
        assert "token" not in await page.evaluate("location.search")
        await page.wait_for("document.querySelectorAll('#timeline li').length === 12")
        new = await ledger.append(ev.make_event(room, ev.Transcript(speaker="user-1", text="still there?"),
                                                sender=USER))
        await page.wait_for(f"!!document.querySelector('#timeline li[data-seq=\"{new.seq}\"]')")
    finally:
        await page.close()
        await runner.cleanup()


async def test_event_stream_resumes_after_a_position(ledger: Ledger, room: str, served: str) -> None:
    positions = await ledger.append_many(scripted_events(room))
    seqs = [p.seq for p in positions]
    async with aiohttp.ClientSession() as http:
        # What a browser reconnecting with Last-Event-ID gets: the events after it, then live ones.
        async with http.get(f"{served}api/events?{_q(room)}", headers={"Last-Event-ID": str(seqs[5])}) as response:
            assert response.headers["Content-Type"] == "text/event-stream"
            got: list[int] = []

            async def read_until(n: int) -> None:
                async for line in response.content:
                    if line.startswith(b"id: "):
                        got.append(int(line[4:]))
                        if len(got) == n:
                            return

            await asyncio.wait_for(read_until(len(seqs) - 6), 10)
            assert got == seqs[6:]
            new = await ledger.append(ev.make_event(room, ev.FloorRequest(agent_id="triage"), sender=TRIAGE))
            await asyncio.wait_for(read_until(len(seqs) - 5), 10)
            assert got[-1] == new.seq
        # The page's WebSocket: JSON arrays of records, after a position, then live ones.
        async with http.ws_connect(f"{served}api/live?{_q(room)}&after={seqs[8]}") as ws:
            first = json.loads((await ws.receive(timeout=10)).data)
            assert [r["seq"] for r in first] == [*seqs[9:], new.seq]
            assert first[0]["type"] == "transcript" and "double charge" in first[0]["text"]
            later = await ledger.append(ev.make_event(room, ev.FloorRelease(agent_id="triage"), sender=TRIAGE))
            assert [r["seq"] for r in json.loads((await ws.receive(timeout=10)).data)] == [later.seq]
        async with http.get(f"{served}api/room?{_q(room)}&at={seqs[3]}") as response:
            view = await response.json()
            assert view["seq"] == seqs[3] and view["floor"]["holder"] == "triage" and view["live"] is False
        async with http.get(f"{served}api/room?room=no-such-room-{room}") as response:
            assert response.status == 404 and "no-such-room" in (await response.json())["error"]
        async with http.get(f"{served}api/room?{_q(room)}&at=yesterday-ish") as response:
            assert response.status == 400 and "is not a position" in (await response.json())["error"]


def test_ledger_serve_command(settings: Settings, room: str) -> None:
    """``ledger serve --port 0 --json`` says where it listens, serves, and stops on Ctrl-C."""
    import urllib.request

    env = {**os.environ, **env_for(settings)}
    proc = subprocess.Popen([sys.executable, "-m", "room_ledger.cli.main", "serve", "--port", "0", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "serving" and ready["host"] == "127.0.0.1" and ready["token"] is False
        with urllib.request.urlopen(ready["url"], timeout=10) as response:
            assert response.status == 200
            assert "default-src 'none'" in response.headers["Content-Security-Policy"]
            assert b'<script src="/static/rooms.js"' in response.read()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_eight_tabs_follow_one_room(ledger: Ledger, room: str, served: str, browser: Browser) -> None:
    """More tabs than a browser's six HTTP/1.1 connections per server: each one still follows live."""
    await ledger.append_many(scripted_events(room))
    pages = [await browser.page() for _ in range(8)]
    try:
        for page in pages:
            assert await page.goto(f"{served}room?{_q(room)}") == 200
            await page.wait_for("document.querySelectorAll('#timeline li').length === 12")
        new = await ledger.append(ev.make_event(room, ev.Transcript(speaker="user-1", text="all of you?"),
                                                sender=USER))
        for page in pages:
            await page.wait_for(f"!!document.querySelector('#timeline li[data-seq=\"{new.seq}\"]')")
    finally:
        for page in pages:
            await page.close()


def test_a_view_open_to_others_without_a_token_is_flagged() -> None:
    from room_ledger.web.auth import open_to_others

    assert not open_to_others("127.0.0.1", None) and not open_to_others("::1", None)
    assert not open_to_others("localhost", None) and not open_to_others("0.0.0.0", "tok")
    assert open_to_others("0.0.0.0", None) and open_to_others("::", None) and open_to_others("10.1.2.3", None)
    assert open_to_others("ledger.internal", None)
