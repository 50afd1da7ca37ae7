"""Lossless capture through the real SDK and livekit-server (``pytest -m livekit``).

Random JSON and bytes, 0 B to 5 MB, on any topic, as data packets, text streams and byte streams,
sent by a real ``rtc.Room`` participant to an in-process bridge: ``ledger payload`` gives back the
bytes sent, and ``replay --json`` the JSON sent. NATS restarted while a large stream is being
stored: nothing half-stored is visible, nothing is lost once it is back. Purge leaves no object.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats.js.errors
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from livekit import rtc

from room_ledger import embedded
from room_ledger import events as ev
from room_ledger.cli import read_commands, server_commands
from room_ledger.client import Ledger, Record
from room_ledger.hydrate import hydrate
from room_ledger.settings import Settings
from room_ledger.timeline import ndjson_line
from room_ledger.watch import RoomWatch
from tests.test_bridge_livekit import running_bridge

pytestmark = pytest.mark.livekit

MiB = 1024 * 1024
SENDER = "sender"
#: Reliable data packets carry at most 15 KiB of payload (LiveKit's limit).
PACKET_MAX = 15_000


@pytest.fixture
def lk_settings(settings: Settings, livekit_server: Any) -> Settings:
    return settings.replace(livekit_url=livekit_server.url, livekit_api_key=livekit_server.api_key,
                            livekit_api_secret=livekit_server.api_secret)


# --- what is sent --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    transport: str  # packet, text_stream, byte_stream
    topic: str
    data: bytes
    is_json: bool

    def __repr__(self) -> str:  # hypothesis prints failing examples: keep 5 MB out of it
        return f"Send({self.transport}, topic={self.topic!r}, {len(self.data)} bytes, json={self.is_json})"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=25,
)
# Any topic but LiveKit's own (lk.*: those are interpreted by definition); "ledger" included.
topics = st.one_of(st.just(""), st.just("ledger"), st.just("files"),
                   st.text(min_size=1, max_size=20).filter(lambda t: not t.startswith("lk.")))
#: Mostly small, some around the inline limit, some up to 5 MB.
sizes = st.one_of(st.integers(0, 2_000), st.integers(60 * 1024, 70 * 1024), st.integers(70 * 1024, 5 * MiB))


@st.composite
def sends(draw: st.DrawFn) -> Send:
    transport = draw(st.sampled_from(["packet", "text_stream", "byte_stream"]))
    topic = draw(topics)
    size = draw(sizes)
    if transport == "packet":
        size = max(1, min(size, PACKET_MAX))  # an empty packet is not a packet
    as_json = draw(st.booleans())
    rng = random.Random(draw(st.integers(0, 2**32)))
    if as_json:
        value = draw(json_values)
        document: Any = {"value": value, "pad": ""}
        encoded = msgspec.json.encode(document)
        # pad with text up to the size drawn (JSON, not just its head, is what is compared)
        document["pad"] = "".join(rng.choices("abcdefghij ", k=max(0, size - len(encoded))))
        data = json.dumps(document, ensure_ascii=False).encode()
    elif transport == "byte_stream":
        data = rng.randbytes(size)
    else:
        data = "".join(rng.choices("héllo wörld ✓ 42\n", k=size)).encode()[:size]
        data = data.decode("utf-8", "ignore").encode()
    if transport == "packet" and len(data) > PACKET_MAX:
        data = data[:PACKET_MAX].decode("utf-8", "ignore").encode() if as_json is False else data
        if len(data) > PACKET_MAX:
            transport = "text_stream"
    return Send(transport, topic, data, as_json)


async def send(room: rtc.Room, item: Send) -> None:
    lp = room.local_participant
    if item.transport == "packet":
        await lp.publish_data(item.data, reliable=True, topic=item.topic)
    elif item.transport == "text_stream":
        await lp.send_text(item.data.decode(), topic=item.topic)
    else:
        await lp.send_bytes(item.data, topic=item.topic, name="blob.bin")


# --- the rig: one bridge and one sender for all examples of a test ---------------------------------


@dataclass
class Rig:
    settings: Settings
    room: str
    ledger: Ledger
    sender: rtc.Room
    log: RoomWatch
    received: int = 0

    def mine(self) -> list[Record]:
        return [r for r in self.log.records if r.event.sender.identity == SENDER
                and not r.type.startswith("participant.")]


@contextlib.asynccontextmanager
async def rig(lk_settings: Settings, room: str, livekit_connect: Any) -> AsyncIterator[Rig]:
    async with Ledger(lk_settings) as ledger, running_bridge(lk_settings, room):
        log = RoomWatch(ledger, room)
        try:
            sender = await livekit_connect(SENDER, room)
            await log.until(lambda rs: any(r.type == "participant.joined" and r.event.sender.identity == SENDER
                                           for r in rs), timeout=30)
            yield Rig(lk_settings, room, ledger, sender, log)
        finally:
            await log.close()


@pytest.fixture
async def lossless_rig(lk_settings: Settings, room: str, livekit_connect: Any) -> AsyncIterator[Rig]:
    """One bridge and one sender for every example of a property test (then the room purged)."""
    async with rig(lk_settings, room, livekit_connect) as r:
        yield r
    await server_commands.purge(lk_settings, room, yes=True, as_json=True)


async def payload_of(rig: Rig, record: Record, tmp: Path) -> bytes:
    """What ``ledger payload <room> <seq> --out FILE`` writes."""
    target = tmp / f"payload-{record.seq}"
    await read_commands.payload(rig.settings, rig.room, record.seq, out=target, as_json=False)
    return target.read_bytes()


def check_json_fields(line: dict[str, Any], item: Send) -> None:
    """``replay --json``: the JSON as sent, for an inline payload; the reference for a large one."""
    sent = json.loads(item.data)
    if "payload" in line:
        assert line["payload"]["size"] == len(item.data)
        assert line["payload"]["sha256"] == hashlib.sha256(item.data).hexdigest()
    elif "sent" in line:
        assert line["sent"] == sent
    else:
        assert line["type"] == "data" and line["body"]["json"] == sent, line


@settings(max_examples=20, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(sends(), min_size=1, max_size=3))
async def test_random_json_and_bytes_come_back_exactly(lossless_rig: Rig, tmp_path: Path, batch: list[Send]) -> None:
    r = lossless_rig
    for item in batch:
        band = "inline" if len(item.data) <= r.settings.inline_limit else "object"
        event(f"{item.transport}, {'json' if item.is_json else 'raw'}, {band}")  # --hypothesis-show-statistics
        await send(r.sender, item)
        r.received += 1
        await r.log.until(lambda rs: len(r.mine()) >= r.received, timeout=90)
        record = r.mine()[r.received - 1]
        assert not isinstance(record.event, ev.OpaqueEvent), record.event
        got = await payload_of(r, record, tmp_path)
        assert got == item.data, (item, len(got), record.event.payload)
        line = json.loads(ndjson_line(record))
        if item.is_json:
            check_json_fields(line, item)
        if isinstance(record.event, ev.DataEvent):
            assert record.event.body.size == len(item.data) and record.event.body.topic == item.topic


async def test_purge_leaves_no_object_behind(lk_settings: Settings, room: str, livekit_connect: Any) -> None:
    async with rig(lk_settings, room, livekit_connect) as r:
        for i, size in enumerate((100 * 1024, 1 * MiB)):
            await r.sender.local_participant.send_bytes(random.Random(i).randbytes(size), topic="files", name="x")
        await r.log.until(lambda rs: len([x for x in rs if x.type == "data"]) >= 2, timeout=60)
    async with Ledger(lk_settings) as ledger:
        store = await ledger.payloads.store()
        prefix = ev.payload_object_name(room, "")

        async def names() -> list[str]:
            try:
                infos = await store.list(ignore_deletes=True)
            except nats.js.errors.NotFoundError:
                return []
            return [i.name or "" for i in infos if (i.name or "").startswith(prefix)]

        assert len(await names()) == 2
        await server_commands.purge(lk_settings, room, yes=True, as_json=True)
        assert await names() == []
        assert [rec async for rec in ledger.read(room)] == []


async def test_a_2mb_session_patch_from_the_helper_is_applied(lk_settings: Settings, room: str,
                                                              livekit_connect: Any) -> None:
    from room_ledger.agents import LedgerAgent

    patch = {"caller": {f"field_{i:03d}": f"value {i}" for i in range(120)},
             "conversation": [{"role": "user", "text": "words " * 40} for _ in range(8_000)]}
    async with rig(lk_settings, room, livekit_connect) as r:
        agent = LedgerAgent(r.sender, r.ledger)
        event_id = await agent.patch_session(patch)
        await r.log.until(lambda rs: any(x.event.id == event_id for x in rs), timeout=90)
        (record,) = [x for x in r.log.records if x.event.id == event_id]
        assert isinstance(record.event, ev.SessionPatchEvent) and record.event.payload is not None
        assert record.event.payload.size > 2 * MiB and record.event.body.patch == patch
        hydrated = await hydrate(r.ledger, room)
        assert hydrated.session == patch
        with pytest.raises(ev.PayloadTooLarge):
            await LedgerAgent(r.sender, r.ledger.__class__(lk_settings.replace(max_payload=1 * MiB))).patch_session(
                patch)


# --- NATS restarted while a large stream is being stored ---------------------------------------------


async def test_nats_restarted_while_a_large_stream_is_stored(lk_settings: Settings, room: str,
                                                             livekit_connect: Any, tmp_path: Path) -> None:
    home = tmp_path / "nats"
    server = embedded.ensure_nats(home)
    own = lk_settings.replace(nats_urls=(server.url,), home=home)
    blob = random.Random(7).randbytes(24 * MiB)
    try:
        async with Ledger(own) as watcher, running_bridge(own, room) as (writer, _):
            writer.retry_max = 0.5
            log = RoomWatch(watcher, room)
            sender = await livekit_connect(SENDER, room)
            await log.until(lambda rs: any(x.event.sender.identity == SENDER for x in rs), timeout=30)
            chunks_stream = f"OBJ_{own.payload_bucket}"

            async def chunks_stored() -> int:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    return int((await watcher.connection.js.stream_info(chunks_stream)).state.messages or 0)
                return 0

            info = await sender.local_participant.send_bytes(blob, topic="files", name="big.bin")
            # wait until the put is under way (some chunks stored, the event not yet appended)
            deadline = asyncio.get_running_loop().time() + 120
            while await chunks_stored() < 10:
                assert asyncio.get_running_loop().time() < deadline, "the object put never started"
                assert not [x for x in log.records if x.event.sender.identity == SENDER and x.type == "data"]
                await asyncio.sleep(0.01)
            assert not [x for x in log.records if x.type == "data"], "the event was appended before its object"
            name = ev.payload_object_name(room, ev.derived_event_id(room, "stream", info.stream_id))
            store = await watcher.payloads.store()
            with pytest.raises(nats.js.errors.ObjectNotFoundError):
                await store.get_info(name)  # half-stored: chunks without their meta are no object
            embedded.stop_nats(home)
            # Down until the put has failed (nats-py would otherwise resend across a short blip).
            while writer.counters.append_failures < 1:
                assert asyncio.get_running_loop().time() < deadline + 60, "the put never failed with NATS down"
                await asyncio.sleep(0.05)
            assert not writer.nats_ok
            embedded.ensure_nats(home, port=server.port)
            await log.until(lambda rs: any(x.type == "data" for x in rs), timeout=120)
            (record,) = [x for x in log.records if x.type == "data"]
            ref = record.event.payload  # type: ignore[union-attr]
            assert ref is not None and ref.size == len(blob) and ref.name == name
            assert await watcher.payloads.read(ref) == blob
            assert not list(writer.spool.directory.glob("*.bin")), "the spooled file outlived its event"
            info = await store.get_info(name)
            # nothing of the failed attempt left: the object's chunks and its meta message only
            assert await chunks_stored() == (info.chunks or 0) + 1
            await log.close()
    finally:
        embedded.stop_nats(home)
