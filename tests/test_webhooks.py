"""``ledger webhooks``: a real livekit-server sends its webhooks to the receiver, which verifies them
and appends them to the room's log; a redelivery is stored once; a forged or stale signature gets
401 and nothing is stored."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from livekit import api, rtc

from room_ledger import events as ev
from room_ledger.bridge.webhooks import WebhookRecorder, sign, webhook_app, webhook_event_id
from room_ledger.client import Ledger
from room_ledger.settings import Settings
from room_ledger.watch import RoomWatch
from tests.livekit import netns
from tests.livekit.server import API_KEY, API_SECRET, LocalLiveKit, free_port, have_binary
from tests.test_cli_helpers import env_for, invoke, json_of, ok


@dataclass
class Receiver:
    url: str
    recorder: WebhookRecorder
    #: Webhook ids in the order requests arrived (a redelivery appears twice).
    deliveries: list[str] = field(default_factory=list)
    #: Webhook ids whose first delivery is answered 500 *after* it was stored (a reply lost).
    fail_first: Callable[[dict[str, Any]], bool] = lambda webhook: False
    failed: set[str] = field(default_factory=set)


@pytest.fixture
async def receiver(ledger: Ledger) -> AsyncIterator[Receiver]:
    recorder = WebhookRecorder(ledger, API_KEY, API_SECRET)
    app = webhook_app(recorder)
    port = free_port()
    state = Receiver(url=f"http://127.0.0.1:{port}/livekit", recorder=recorder)

    @web.middleware
    async def faults(request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        body = await request.read()
        webhook = json.loads(body) if body.startswith(b"{") else {}
        webhook_id = str(webhook.get("id", ""))
        state.deliveries.append(webhook_id)
        response = await handler(request)
        if response.status == 200 and webhook_id not in state.failed and state.fail_first(webhook):
            state.failed.add(webhook_id)
            return web.json_response({"error": "injected: the answer was lost"}, status=500)
        return response

    app.middlewares.append(faults)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield state
    finally:
        await runner.cleanup()


def server_events(log: RoomWatch) -> list[Any]:
    return [r for r in log.records if r.type.startswith("server.")]


@pytest.mark.livekit
async def test_a_real_server_reports_every_room_once(ledger: Ledger, receiver: Receiver) -> None:
    if not netns.inside():
        pytest.skip("a second livekit-server runs inside the tests' network namespace only")
    if reason := have_binary():
        pytest.skip(reason)
    room = f"wh-{uuid.uuid4().hex[:10]}"
    # The first delivery of participant_joined is stored but its answer is lost: the server retries.
    receiver.fail_first = lambda webhook: webhook.get("event") == "participant_joined"
    workdir = Path(tempfile.mkdtemp(prefix="livekit-webhooks-"))
    server = LocalLiveKit(workdir, webhook_urls=[receiver.url])
    await asyncio.to_thread(server.start)
    log = RoomWatch(ledger, room)
    lk_room = rtc.Room()
    try:
        await lk_room.connect(server.url, server.token("caller", room, name="Caller"))
        source = rtc.AudioSource(48_000, 1)
        track = rtc.LocalAudioTrack.create_audio_track("mic", source)
        publication = await lk_room.local_participant.publish_track(
            track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
        await log.until(lambda _: any(r.type == "server.track_published" for r in log.records))
        await lk_room.local_participant.unpublish_track(publication.sid)
        await lk_room.disconnect()
        async with server.api() as lk:
            await lk.room.delete_room(api.DeleteRoomRequest(room=room))
        await log.until(lambda _: any(r.type == "server.room_finished" for r in log.records), timeout=30)
    finally:
        if lk_room.isconnected():
            await lk_room.disconnect()
        await asyncio.to_thread(server.stop)
        await log.close()
        shutil.rmtree(workdir, ignore_errors=True)

    records = server_events(log)
    types = [r.type for r in records]
    for expected in ("server.room_started", "server.participant_joined", "server.track_published",
                     "server.track_unpublished", "server.participant_left", "server.room_finished"):
        assert types.count(expected) == 1, types
    # The server queues a room's webhooks in order, one at a time: the log has its order.
    assert types.index("server.room_started") < types.index("server.participant_joined") < types.index(
        "server.track_published") < types.index("server.participant_left") < types.index("server.room_finished")

    joined = next(r.event for r in records if r.type == "server.participant_joined")
    assert isinstance(joined, ev.ServerParticipantJoinedEvent)
    assert (joined.body.identity, joined.body.kind) == ("caller", "standard")
    assert joined.body.participant_sid.startswith("PA_") and joined.body.room_sid.startswith("RM_")
    assert joined.id == webhook_event_id(joined.body.webhook_id, b"")
    assert joined.body.webhook["participant"]["name"] == "Caller"
    assert joined.at is not None and joined.body.created_at == int(joined.at.timestamp())
    published = next(r.event for r in records if r.type == "server.track_published")
    assert isinstance(published, ev.ServerTrackPublishedEvent) and published.body.track_sid == publication.sid

    # Redelivered: the receiver got participant_joined twice and stored it once.
    assert receiver.deliveries.count(joined.body.webhook_id) == 2, receiver.deliveries
    assert receiver.recorder.stats.duplicates == 1
    assert len({r.event.id for r in records}) == len(records)


@dataclass
class Posted:
    status: int
    body: dict[str, Any]


async def post(url: str, body: bytes, authorization: str | None) -> Posted:
    headers = {"Content-Type": "application/webhook+json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as res:
        return Posted(res.status, await res.json())


def webhook_body(room: str, webhook_id: str, event: str = "room_started") -> bytes:
    return json.dumps({"event": event, "room": {"sid": "RM_test", "name": room}, "id": webhook_id,
                       "createdAt": "1764400000"}).encode()


async def test_forged_or_stale_signatures_get_401_and_nothing_is_stored(ledger: Ledger, receiver: Receiver) -> None:
    room = f"wh-{uuid.uuid4().hex[:10]}"
    body = webhook_body(room, "EV_forged_1")
    refused = [
        await post(receiver.url, body, None),
        await post(receiver.url, body, sign(body, API_KEY, "another-secret-0123456789abcdef-xx")),
        await post(receiver.url, body, sign(body, "otherkey", API_SECRET)),
        await post(receiver.url, body.replace(b"room_started", b"room_finished"), sign(body, API_KEY, API_SECRET)),
        await post(receiver.url, body, sign(body, API_KEY, API_SECRET, ttl_s=-600)),  # expired 10 min ago
        await post(receiver.url, body, "not-a-jwt"),
    ]
    assert [p.status for p in refused] == [401] * 6, refused
    assert "Authorization" in refused[0].body["error"]
    assert await ledger.room_last_seq(room) == 0
    assert receiver.recorder.stats.rejected == 6

    stored = await post(receiver.url, body, sign(body, API_KEY, API_SECRET))
    again = await post(receiver.url, body, "Bearer " + sign(body, API_KEY, API_SECRET))
    assert (stored.status, stored.body["duplicate"]) == (200, False)
    assert (again.status, again.body["duplicate"], again.body["seq"]) == (200, True, stored.body["seq"])
    records = [r async for r in ledger.read(room)]
    assert [r.type for r in records] == ["server.room_started"]
    assert records[0].event.id == webhook_event_id("EV_forged_1", body)

    # A webhook naming no room is answered 200 (the server must not retry it) and not stored.
    orphan = json.dumps({"event": "egress_updated", "id": "EV_orphan"}).encode()
    answer = await post(receiver.url, orphan, sign(orphan, API_KEY, API_SECRET))
    assert (answer.status, answer.body["stored"]) == (200, False)


async def test_rooms_flags_what_the_bridge_never_saw(ledger: Ledger, receiver: Receiver, settings: Settings) -> None:
    prefix = f"wh-{uuid.uuid4().hex[:8]}"
    never, partly = f"{prefix}-never", f"{prefix}-partly"

    async def server_says(room: str, webhook_id: str, event: str, identity: str = "", hidden: bool = False) -> None:
        webhook: dict[str, Any] = {"event": event, "room": {"sid": "RM_x", "name": room}, "id": webhook_id}
        if identity:
            webhook["participant"] = {"identity": identity, "sid": f"PA_{identity}",
                                      "permission": {"hidden": hidden}}
        body = json.dumps(webhook).encode()
        assert (await post(receiver.url, body, sign(body, API_KEY, API_SECRET))).status == 200

    await server_says(never, "EV_n1", "room_started")
    await server_says(never, "EV_n2", "participant_joined", "caller")
    await server_says(partly, "EV_p1", "room_started")
    await ledger.append(ev.make_event(partly, ev.BridgeJoined(bridge_id="b1")))
    await server_says(partly, "EV_p2", "participant_joined", "ledger-bridge", hidden=True)
    await server_says(partly, "EV_p3", "participant_joined", "alice")
    await ledger.append(ev.make_event(partly, ev.ParticipantJoined(identity="alice", kind="standard")))
    # Bob came and went while the bridge could not see the room.
    await ledger.append(ev.make_event(partly, ev.BridgeGap(bridge_id="b1", started_at=ev.utcnow(),
                                                           ended_at=ev.utcnow(), reason="reconnect")))
    await server_says(partly, "EV_p4", "participant_joined", "bob")

    rows = {row["room"]: row for row in json_of(await asyncio.to_thread(ok, settings, ["rooms", "--json"]))
            if row["room"].startswith(prefix)}
    assert (rows[never]["uncovered"], rows[never]["missed"]) == (True, ["caller"])
    assert (rows[partly]["uncovered"], rows[partly]["missed"], rows[partly]["gaps"]) == (False, ["bob"], 1)
    assert rows[partly]["server_events"] == 4
    table = (await asyncio.to_thread(ok, settings, ["rooms"])).stdout
    line = next(text for text in table.splitlines() if never in text)
    assert "the whole room" in line
    replay = (await asyncio.to_thread(ok, settings, ["replay", never])).stdout
    assert "server: room started" in replay and "server: participant joined caller (standard)" in replay


async def test_ledger_webhooks_command(ledger: Ledger, settings: Settings) -> None:
    """``ledger webhooks`` as a process: says where it listens, stores a signed webhook, refuses a forged one."""
    room = f"wh-{uuid.uuid4().hex[:10]}"
    port = free_port()
    env = {**os.environ, **env_for(settings), "LIVEKIT_API_KEY": API_KEY, "LIVEKIT_API_SECRET": API_SECRET}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "room_ledger.cli.main", "webhooks", "--port", str(port), "--json", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert first["listening"] == f"http://127.0.0.1:{port}/"
        body = webhook_body(room, "EV_cli_1", "participant_joined")
        assert (await post(first["listening"], body, sign(body, API_KEY, "forged-secret-0123456789abcdef-0123"))
                ).status == 401
        stored = await post(first["listening"], body, sign(body, API_KEY, API_SECRET))
        assert stored.status == 200
        line = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
        assert line == {"type": "server.participant_joined", "room": room, "seq": stored.body["seq"],
                        "duplicate": False}
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        summary = json.loads(out.decode().strip().splitlines()[-1])
        assert (summary["stored"], summary["rejected"]) == (1, 1), err.decode()
        assert proc.returncode == 0, err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert [r.type async for r in ledger.read(room)] == ["server.participant_joined"]


def test_webhooks_needs_the_keys(settings: Settings) -> None:
    result = invoke(settings, ["webhooks"], LIVEKIT_API_KEY="", LIVEKIT_API_SECRET="")
    assert result.exit_code == 1 and "LIVEKIT_API_KEY" in result.output
