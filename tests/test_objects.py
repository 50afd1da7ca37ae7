"""Payloads above the inline limit: spooled, put into the Object Store bucket before their event,
loaded by every reader, shown and written byte-exact by the CLI, purged with their room.

Real nats-server (and PostgreSQL for the projection); the bridge's ingest and writer driven
directly, as ``ledger demo`` does. The same through real LiveKit participants is in
tests/test_lossless.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from room_ledger import events as ev
from room_ledger.agents import encode_protocol, protocol_event_id
from room_ledger.bridge.ingest import Ingest
from room_ledger.bridge.room import _read_spooled
from room_ledger.bridge.writer import BridgeWriter
from room_ledger.client import Ledger, Record
from room_ledger.hydrate import close as close_hydration
from room_ledger.hydrate import hydrate
from room_ledger.projections.projector import Projector
from room_ledger.settings import Settings
from room_ledger.state import fold
from tests.test_cli_helpers import invoke, json_of, ok

MiB = 1024 * 1024


async def bridged(settings: Settings, home: Path, room: str, feed: Callable[[Ingest], None]) -> list[Record]:
    """Feed one room's ingest through a real writer; the room's log afterwards (bodies loaded)."""
    async with Ledger(settings) as ledger:
        writer = BridgeWriter(ledger, home=home, stats_interval=0)
        await writer.start()
        feed(writer.ingest(room))
        assert await writer.flush(60), "the writer did not store everything within 60 s"
        assert await writer.close() == 0
        assert not list((home / "bridge" / "payloads").glob("*")), "payload files left after their events"
        return [r async for r in ledger.read(room)]


def big_patch(size: int) -> dict[str, Any]:
    """A session document of ``size`` bytes or so: many fields and a long conversation."""
    fields = {f"field_{i:03d}": f"value {i} " * 8 for i in range(120)}
    turns = [{"role": "user" if i % 2 else "assistant", "text": f"turn {i} " + "words " * 40} for i in range(
        size // 260)]
    return {"caller": fields, "conversation": turns}


def test_a_2mb_session_patch_is_stored_as_an_object_and_applied(settings: Settings, room: str, tmp_path: Path) -> None:
    patch = big_patch(2 * MiB)
    pid, data = encode_protocol("session.patch", ev.SessionPatch(patch=patch), payload_id="patch-1")
    assert len(data) > 2 * MiB

    def feed(ingest: Ingest) -> None:
        ingest.participant_joined("triage", kind="agent")
        ingest.text_stream(data.decode(), topic="ledger", stream_id="st-1", sender_identity="triage")

    records = asyncio.run(bridged(settings, tmp_path, room, feed))
    event = records[-1].event
    assert isinstance(event, ev.SessionPatchEvent) and event.id == protocol_event_id(room, pid)
    assert event.body.patch == patch  # loaded from the bucket by the reader
    assert event.payload is not None and event.payload.size == len(data)
    assert event.payload.sha256 == hashlib.sha256(data).hexdigest()
    assert fold(records).session == patch

    # the CLI: exact bytes, the reference in replay --json and in payload --json
    seq = records[-1].seq
    out = ok(settings, ["payload", room, str(seq)])
    assert out.stdout_bytes == data
    shown = json_of(ok(settings, ["payload", room, str(seq), "--json"]))
    assert shown["object"] == event.payload.name and shown["size"] == len(data) and shown["form"] == "json"
    lines = [json.loads(line) for line in ok(settings, ["replay", room, "--json"]).stdout.splitlines()]
    assert lines[-1]["payload"]["name"] == event.payload.name
    target = tmp_path / "out.json"
    ok(settings, ["payload", room, str(seq), "--out", str(target)])
    assert target.read_bytes() == data


def test_projection_and_hydration_load_large_bodies(pg_settings: Settings, room: str, tmp_path: Path) -> None:
    patch = big_patch(600 * 1024)
    summary = "the caller asked about a refund. " * 20_000  # ~640 KB
    _, patch_data = encode_protocol("session.patch", ev.SessionPatch(patch=patch))
    _, summary_data = encode_protocol("context.summary", ev.ContextSummary(text=summary, covers_seq=1))

    def feed(ingest: Ingest) -> None:
        ingest.text_stream(patch_data.decode(), topic="ledger", stream_id="p", sender_identity="triage")
        ingest.text_stream(summary_data.decode(), topic="ledger", stream_id="s", sender_identity="triage")

    asyncio.run(bridged(pg_settings, tmp_path, room, feed))

    async def project_and_hydrate() -> Any:
        async with Projector(pg_settings) as projector:
            await projector.catch_up()
        async with Ledger(pg_settings) as ledger:
            try:
                return await hydrate(ledger, room)
            finally:
                await close_hydration(ledger)

    snapshot = asyncio.run(project_and_hydrate())
    assert snapshot.session == patch
    assert snapshot.summary is not None and snapshot.summary.text == summary


def test_binary_bytes_of_any_size_come_back_exactly(settings: Settings, room: str, tmp_path: Path) -> None:
    blobs = [os.urandom(n) for n in (0, 1, 64 * 1024, 64 * 1024 + 1, 3 * MiB)]

    def feed(ingest: Ingest) -> None:
        for i, blob in enumerate(blobs):
            ingest.byte_stream(blob, topic="files", stream_id=f"b{i}", sender_identity="user", name=f"f{i}.bin")

    records = asyncio.run(bridged(settings, tmp_path, room, feed))
    assert len(records) == len(blobs)
    for record, blob in zip(records, blobs, strict=True):
        assert isinstance(record.event, ev.DataEvent) and record.event.body.size == len(blob)
        assert (record.event.payload is not None) == (len(blob) > settings.inline_limit)
        result = ok(settings, ["payload", room, str(record.seq)])
        assert result.stdout_bytes == blob, (len(result.stdout_bytes), len(blob))


def test_over_the_hard_limit_is_data_with_the_reason_and_still_byte_exact(
        settings: Settings, room: str, tmp_path: Path) -> None:
    small = settings.replace(max_payload=1 * MiB)
    _, data = encode_protocol("session.patch", ev.SessionPatch(patch=big_patch(2 * MiB)))

    def feed(ingest: Ingest) -> None:
        assert ingest.max_payload == 1 * MiB
        ingest.text_stream(data.decode(), topic="ledger", stream_id="big", sender_identity="triage")

    records = asyncio.run(bridged(small, tmp_path, room, feed))
    event = records[-1].event
    assert isinstance(event, ev.DataEvent) and event.body.reason.startswith("over the hard limit")
    assert "LEDGER_MAX_PAYLOAD" in event.body.reason and event.body.size == len(data)
    assert ok(settings, ["payload", room, str(records[-1].seq)]).stdout_bytes == data


def test_purge_removes_the_rooms_objects_and_only_those(settings: Settings, room: str, tmp_path: Path) -> None:
    other = room + "-other"
    for name in (room, other):
        asyncio.run(bridged(settings, tmp_path, name, lambda ingest: ingest.byte_stream(
            os.urandom(200 * 1024), topic="files", stream_id="x", sender_identity="u")))

    async def names() -> list[str]:
        async with Ledger(settings) as ledger:
            store = await ledger.payloads.store()
            return [i.name or "" for i in await store.list(ignore_deletes=True)]

    assert any(n.startswith(ev.payload_object_name(room, "")) for n in asyncio.run(names()))
    result = json_of(ok(settings, ["purge", room, "--yes", "--json"]))
    assert result["payload_objects_removed"] == 1 and result["events_removed"] == 1
    left = asyncio.run(names())
    assert not any(n.startswith(ev.payload_object_name(room, "")) for n in left)
    assert any(n.startswith(ev.payload_object_name(other, "")) for n in left)
    ok(settings, ["purge", other, "--yes"])


def test_doctor_reports_the_bucket(settings: Settings, room: str, tmp_path: Path) -> None:
    asyncio.run(bridged(settings, tmp_path, room, lambda ingest: ingest.byte_stream(
        os.urandom(100 * 1024), topic="files", stream_id="d", sender_identity="u")))
    report = json_of(invoke(settings, ["doctor", "--json"]))
    payloads = report["stream"]["payloads"]
    assert payloads["exists"] and payloads["bucket"] == settings.payload_bucket
    assert payloads["replicas"] == settings.replicas and payloads["inline_limit"] == settings.inline_limit
    ok(settings, ["purge", room, "--yes"])


def test_a_payload_whose_object_is_gone_reads_as_opaque_with_the_reason(
        settings: Settings, room: str, tmp_path: Path) -> None:
    _, data = encode_protocol("session.patch", ev.SessionPatch(patch=big_patch(200 * 1024)))
    asyncio.run(bridged(settings, tmp_path, room, lambda ingest: ingest.text_stream(
        data.decode(), topic="ledger", stream_id="gone", sender_identity="a")))

    async def delete_and_read() -> list[Record]:
        async with Ledger(settings) as ledger:
            assert await ledger.payloads.purge_room(room) == 1
            return [r async for r in ledger.read(room)]

    (record,) = asyncio.run(delete_and_read())
    assert isinstance(record.event, ev.OpaqueEvent) and "payload not loaded" in record.event.error
    assert fold([record]).session == {}  # skipped and counted, not folded as an empty patch
    failed = invoke(settings, ["payload", room, str(record.seq)])
    assert failed.exit_code == 1 and "not readable" in failed.stderr


# --- bounded memory ---------------------------------------------------------------------------------


async def _chunks(total: int, size: int = 15_000) -> AsyncIterator[bytes]:
    chunk = os.urandom(size)
    sent = 0
    while sent < total:
        piece = chunk[: min(size, total - sent)]
        sent += len(piece)
        yield piece


def test_a_large_stream_is_spooled_with_bounded_memory(tmp_path: Path) -> None:
    from room_ledger.bridge.payloads import PayloadSpool

    ingest = Ingest("r", lambda event: None, spool=PayloadSpool(tmp_path))
    total = 60 * MiB

    async def read() -> tuple[bytes, ev.PayloadRef | None, str | None]:
        return await _read_spooled(_chunks(total), ingest, "s1", "files")

    tracemalloc.start()
    try:
        head, ref, error = asyncio.run(read())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert error is None and ref is not None and ref.size == total
    assert len(head) <= 4096
    assert peak < 4 * MiB, f"reading a {total // MiB} MiB stream peaked at {peak / MiB:.1f} MiB"
    assert ingest.spool.path(ref.name).stat().st_size == total


def test_a_json_stream_within_the_hard_limit_is_read_back_whole_to_be_typed(tmp_path: Path) -> None:
    from room_ledger.bridge.payloads import PayloadSpool

    ingest = Ingest("r", lambda event: None, spool=PayloadSpool(tmp_path))
    document = msgspec.json.encode({"x": "y" * (200 * 1024)})

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(document), 15_000):
            yield document[start:start + 15_000]

    data, ref, error = asyncio.run(_read_spooled(chunks(), ingest, "s2", "app"))
    assert data == document and ref is not None and ref.size == len(document) and error is None


@pytest.mark.parametrize("size", [0, 100, 64 * 1024])
def test_small_streams_stay_in_memory(tmp_path: Path, size: int) -> None:
    from room_ledger.bridge.payloads import PayloadSpool

    ingest = Ingest("r", lambda event: None, spool=PayloadSpool(tmp_path))
    data, ref, error = asyncio.run(_read_spooled(_chunks(size), ingest, "s3", "files"))
    assert len(data) == size and ref is None and error is None
    assert not list(tmp_path.iterdir())


def test_a_spooled_stream_is_in_the_bucket_when_it_ends(settings: Settings, room: str, tmp_path: Path) -> None:
    """The bridge's spool uploads while the stream arrives: the object is whole when the stream ends."""
    blob = os.urandom(5 * MiB + 123)

    async def go() -> None:
        async with Ledger(settings) as ledger:
            writer = BridgeWriter(ledger, home=tmp_path, stats_interval=0)
            await writer.start()
            ingest = writer.ingest(room)
            head, ref, error = await _read_spooled(_chunks_of(blob), ingest, "up-1", "files")
            assert ref is not None and error is None and ref.size == len(blob)
            assert await ledger.payloads.info(ref) is not None  # stored before any event points at it
            ingest.byte_stream(head, topic="files", stream_id="up-1", sender_identity="u", spooled=ref)
            assert await writer.flush(60)
            await writer.close()
            (record,) = [r async for r in ledger.read(room)]
            assert not isinstance(record.event, ev.OpaqueEvent)
            assert record.event.payload == ev.PayloadRef(name=ref.name, size=ref.size, sha256=ref.sha256)
            assert await ledger.payloads.read(ref) == blob
            assert await ledger.payloads.purge_room(room) == 1

    asyncio.run(go())


async def _chunks_of(data: bytes, size: int = 15_000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        await asyncio.sleep(0)
        yield data[start:start + size]


def test_payload_of_a_missing_sequence_or_room_is_one_line(settings: Settings, room: str, tmp_path: Path) -> None:
    records = asyncio.run(bridged(settings, tmp_path, room, lambda ingest: ingest.data_packet(
        b"hello", topic="t", sender_identity="u")))
    assert ok(settings, ["payload", room, str(records[0].seq)]).stdout_bytes == b"hello"
    shown = json_of(ok(settings, ["payload", room, str(records[0].seq), "--json"]))
    assert shown["object"] is None and shown["size"] == 5
    for args in ([room, str(records[0].seq + 10_000)], [room + "-nope", "1"]):
        result = invoke(settings, ["payload", *args])
        assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
    joined = asyncio.run(bridged(settings, tmp_path, room, lambda ingest: ingest.participant_joined("u")))
    result = invoke(settings, ["payload", room, str(joined[-1].seq)])
    assert result.exit_code == 1 and "carries no payload" in result.stderr
    text = ok(settings, ["doctor"]).stdout
    assert "payload bucket" in text


def test_two_uploads_of_one_name_leave_one_object_and_no_stray_chunks(settings: Settings, room: str) -> None:
    """Two bridges in a room spool the same large stream at the same moment: both find no object
    when they start, both upload; the first meta wins and the second upload drops its chunks
    (before, the second meta replaced the first and left its chunks under no object)."""
    blob = os.urandom(3 * MiB + 7)
    digest = hashlib.sha256(blob).hexdigest()

    async def go() -> None:
        async with Ledger(settings) as ledger:
            await ledger.payloads.store()
            bucket = settings.payload_bucket

            async def chunk_subjects() -> set[str]:
                info = await ledger.connection.js.stream_info(f"OBJ_{bucket}", subjects_filter=f"$O.{bucket}.C.>")
                return set(info.state.subjects or {})

            before = await chunk_subjects()
            name = f"{room}/same-stream"
            uploads = [ledger.payloads.upload(name), ledger.payloads.upload(name)]
            for upload in uploads:
                await upload.write(blob)
            assert len(await chunk_subjects() - before) == 2  # both uploads' chunks are stored
            first, second = await asyncio.gather(*(u.finish(digest) for u in uploads))
            assert first.nuid == second.nuid  # both report the one object stored
            assert await ledger.payloads.read(ev.PayloadRef(name=name, size=len(blob), sha256=digest)) == blob

            async def only_the_objects_chunks_left() -> None:
                # the server's state, polled: the losing upload purges its chunks in the background
                while await chunk_subjects() - before != {f"$O.{bucket}.C.{first.nuid}"}:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(only_the_objects_chunks_left(), 10)

    asyncio.run(go())
