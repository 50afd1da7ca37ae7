"""The ``livekit.rtc`` glue: room callbacks -> a queue -> :class:`bridge.ingest.Ingest`.

Room callbacks are plain functions that copy what they need out of the SDK objects and put one
observation on a queue; a single task applies them to the ingest in order. Streams of every
topic are read to their end by their own task (the trailer's attributes are only known then,
e.g. the final flag of an agent transcript) and then queued the same way; a stream larger than
the inline limit is written to the payload spool chunk by chunk as it arrives (bounded memory),
and the writer puts it into the Object Store before its event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any, Final

from livekit import rtc
from livekit.rtc.room import EventTypes

from room_ledger import events as ev
from room_ledger import protocol
from room_ledger.bridge import _sdk
from room_ledger.bridge.ingest import TYPED_TOPICS, Ingest, ParticipantObservation
from room_ledger.bridge.payloads import SpoolWriter
from room_ledger.events import utcnow

log = logging.getLogger("bridge.room")

#: The topic a SIP caller's DTMF digits are recorded under (as data: {"code", "digit"}).
DTMF_TOPIC: Final = protocol.TOPIC_SIP_DTMF

#: Observations handled between two returns to the event loop when a backlog has queued up.
_YIELD_EVERY: Final = 50

Observation = Callable[[], None]


def _observe(participant: rtc.RemoteParticipant) -> ParticipantObservation:
    return ParticipantObservation(
        identity=participant.identity, kind=int(participant.kind), sid=participant.sid, name=participant.name,
        attributes=dict(participant.attributes), metadata=participant.metadata,
        tracks=tuple(participant.track_publications.keys()),
    )


class RoomBridge:
    """Feeds one connected (or about to connect) ``rtc.Room`` into an :class:`Ingest`."""

    def __init__(self, room: rtc.Room, ingest: Ingest, *, livekit_url: str = "") -> None:
        self.room = room
        self.ingest = ingest
        self.livekit_url = livekit_url
        self._queue: asyncio.Queue[Observation | None] = asyncio.Queue()
        self._stream_tasks: set[asyncio.Task[None]] = set()
        #: sender identity -> its newest stream's task: a sender's streams are queued in the
        #: order they opened, though they are read concurrently and may finish in any order.
        self._last_stream: dict[str, asyncio.Task[None]] = {}
        self._agent_states: dict[str, str] = {}
        self._gap_started: datetime | None = None
        self.disconnected = asyncio.Event()
        self.disconnect_reason = ""
        self._pump: asyncio.Task[None] | None = None
        self._attached = False
        #: What attach() registered, undone by close(): the room may live on (a worker's job).
        self._handlers: list[tuple[EventTypes, Callable[..., None]]] = []
        self._restore_streams: Callable[[], None] | None = None
        self._known_topics = False

    # --- setup ---------------------------------------------------------------------------------

    def attach(self) -> None:
        """Register callbacks and stream handlers; call before ``connect`` so nothing is missed."""
        if self._attached:
            return
        self._attached = True
        room = self.room
        events: tuple[tuple[EventTypes, Callable[..., None]], ...] = (
            ("participant_connected", self._on_participant_connected),
            ("participant_disconnected", self._on_participant_disconnected),
            ("participant_attributes_changed", self._on_attributes_changed),
            ("participant_metadata_changed", self._on_metadata_changed),
            ("participant_name_changed", self._on_name_changed),
            ("room_metadata_changed", self._on_room_metadata_changed),
            ("track_published", self._on_track_published),
            ("data_received", self._on_data_received),
            ("sip_dtmf_received", self._on_sip_dtmf),
            ("reconnecting", self._on_reconnecting),
            ("reconnected", self._on_reconnected),
            ("disconnected", self._on_disconnected),
        )
        for event, handler in events:
            room.on(event, handler)
            self._handlers.append((event, handler))
        if _sdk.has_stream_tables(room):
            # every topic, not just the ones we know of: "anything else -> data"
            self._restore_streams = _sdk.catch_all_streams(room, self._on_text_stream, self._on_byte_stream)
        else:  # pragma: no cover - an SDK without the private tables: known topics only
            for topic in (protocol.TOPIC_TRANSCRIPTION, protocol.TOPIC_CHAT, protocol.TOPIC_LEDGER):
                room.register_text_stream_handler(topic, self._on_text_stream)
            room.register_byte_stream_handler(protocol.TOPIC_AGENT_SESSION, self._on_byte_stream)
            self._known_topics = True
        self._pump = asyncio.create_task(self._run_queue(), name="bridge-room-pump")

    def connected(self) -> None:
        """Call once connected: records the bridge's arrival and who is already there."""
        self._put(lambda: self.ingest.bridge_joined(self.livekit_url))
        self._snapshot()

    def _snapshot(self) -> None:
        observed = [_observe(p) for p in self.room.remote_participants.values()]
        for p in observed:
            state = p.attributes.get(protocol.ATTR_AGENT_STATE)
            if state:
                self._agent_states[p.identity] = state
        metadata = self.room.metadata
        self._put(lambda: self.ingest.snapshot(observed, room_metadata=metadata))

    async def close(self, reason: str = "", *, left: bool = True) -> None:
        """Finish open streams (briefly), drain the queue, record ``bridge.left`` (if ``left``)."""
        if self._stream_tasks:
            _, pending = await asyncio.wait(set(self._stream_tasks), timeout=1.0)
            for task in pending:
                task.cancel()
        if left:
            self._put(lambda: self.ingest.bridge_left(reason))
        self._queue.put_nowait(None)
        if self._pump is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        self.detach()

    def detach(self) -> None:
        """Undo :meth:`attach`: the room's callbacks and stream handlers are the bridge's no more."""
        room = self.room
        for event, handler in self._handlers:
            with contextlib.suppress(Exception):
                room.off(event, handler)
        self._handlers.clear()
        if self._restore_streams is not None:
            self._restore_streams()
            self._restore_streams = None
        if self._known_topics:
            for topic in (protocol.TOPIC_TRANSCRIPTION, protocol.TOPIC_CHAT, protocol.TOPIC_LEDGER):
                room.unregister_text_stream_handler(topic)
            room.unregister_byte_stream_handler(protocol.TOPIC_AGENT_SESSION)
            self._known_topics = False
        self._attached = False

    # --- the queue -------------------------------------------------------------------------------

    def _put(self, observation: Observation) -> None:
        self._queue.put_nowait(observation)

    async def _run_queue(self) -> None:
        handled = 0
        while True:
            observation = await self._queue.get()
            if observation is None:
                return
            handled += 1
            if handled % _YIELD_EVERY == 0:
                # A backlog is worked through in slices: the writer's acknowledgements and next
                # batch go out in between, so NATS stores while this ingests.
                await asyncio.sleep(0)
            try:
                observation()
            except Exception as exc:  # Ingest guards itself; this is a last resort
                log.warning("bridge: observation failed (%s)", type(exc).__name__)

    # --- callbacks: copy out, enqueue ------------------------------------------------------------

    def _on_participant_connected(self, participant: rtc.RemoteParticipant) -> None:
        p = _observe(participant)
        if p.attributes.get(protocol.ATTR_AGENT_STATE):
            self._agent_states[p.identity] = p.attributes[protocol.ATTR_AGENT_STATE]
        at = utcnow()
        self._put(lambda: self.ingest.participant_joined(
            p.identity, kind=p.kind, sid=p.sid, name=p.name, attributes=p.attributes, metadata=p.metadata,
            tracks=p.tracks, at=at))

    def _on_participant_disconnected(self, participant: rtc.RemoteParticipant) -> None:
        identity, sid = participant.identity, participant.sid
        try:
            reason = rtc.DisconnectReason.Name(participant.disconnect_reason or 0)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            reason = ""
        self._agent_states.pop(identity, None)
        at = utcnow()
        self._put(lambda: self.ingest.participant_left(identity, sid=sid, reason=reason, at=at))

    def _on_attributes_changed(self, changed: dict[str, str], participant: rtc.Participant) -> None:
        identity = participant.identity
        changed = dict(changed)
        attributes = dict(participant.attributes)
        old_state = self._agent_states.get(identity)
        if protocol.ATTR_AGENT_STATE in changed:
            self._agent_states[identity] = changed[protocol.ATTR_AGENT_STATE]
        at = utcnow()
        self._put(lambda: self.ingest.participant_attributes(identity, changed, attributes,
                                                             old_agent_state=old_state, at=at))

    def _on_metadata_changed(self, participant: rtc.Participant, old: str, new: str) -> None:
        identity, at = participant.identity, utcnow()
        self._put(lambda: self.ingest.participant_metadata(identity, new, at=at))

    def _on_name_changed(self, participant: rtc.Participant, old: str, new: str) -> None:
        identity, at = participant.identity, utcnow()
        self._put(lambda: self.ingest.participant_name(identity, new, at=at))

    def _on_room_metadata_changed(self, old: str, new: str) -> None:
        at = utcnow()
        self._put(lambda: self.ingest.room_metadata(new, at=at))

    def _on_track_published(self, publication: rtc.RemoteTrackPublication,
                            participant: rtc.RemoteParticipant) -> None:
        identity, sid = participant.identity, publication.sid
        self._put(lambda: self.ingest.track_published(identity, sid))

    def _on_data_received(self, packet: rtc.DataPacket) -> None:
        data, topic = packet.data, packet.topic or ""
        identity = packet.participant.identity if packet.participant is not None else ""
        kind = int(packet.participant.kind) if packet.participant is not None else None
        at = utcnow()
        self._put(lambda: self.ingest.data_packet(data, topic=topic, sender_identity=identity,
                                                  sender_kind=kind, at=at))

    def _on_sip_dtmf(self, dtmf: rtc.SipDTMF) -> None:
        # A phone caller's keypad digit: no data packet carries it, so it is recorded as one (topic
        # lk.sip.dtmf, {"code", "digit"}) from the SIP participant.
        identity = dtmf.participant.identity if dtmf.participant is not None else ""
        kind = int(dtmf.participant.kind) if dtmf.participant is not None else None
        payload = json.dumps({"code": dtmf.code, "digit": dtmf.digit}).encode()
        at = utcnow()
        self._put(lambda: self.ingest.data_packet(payload, topic=DTMF_TOPIC, sender_identity=identity,
                                                  sender_kind=kind, at=at))

    def _on_reconnecting(self) -> None:
        if self._gap_started is None:
            self._gap_started = utcnow()
        log.warning("bridge: LiveKit connection lost; reconnecting")

    def _on_reconnected(self) -> None:
        started = self._gap_started or utcnow()
        self._gap_started = None
        ended = utcnow()
        self._put(lambda: self.ingest.bridge_gap(started, ended, reason="livekit reconnect"))
        self._snapshot()
        log.info("bridge: reconnected to LiveKit; gap recorded, participants snapshotted")

    def _on_disconnected(self, reason: Any = None) -> None:
        try:
            self.disconnect_reason = rtc.DisconnectReason.Name(reason) if reason is not None else ""
        except (ValueError, TypeError):
            self.disconnect_reason = str(reason)
        if self._gap_started is None:
            self._gap_started = utcnow()
        self.disconnected.set()

    def gap_started(self) -> datetime | None:
        return self._gap_started

    def resume_after(self, started: datetime, reason: str) -> None:
        """After a fresh connection replaced a lost one: record the gap, then a new snapshot."""
        ended = utcnow()
        self._put(lambda: self.ingest.bridge_gap(started, ended, reason=reason))
        self._snapshot()

    # --- streams ---------------------------------------------------------------------------------

    def _on_text_stream(self, reader: rtc.TextStreamReader, participant_identity: str) -> None:
        self._spawn(self._read_text(reader, participant_identity), participant_identity)

    def _on_byte_stream(self, reader: rtc.ByteStreamReader, participant_identity: str) -> None:
        self._spawn(self._read_bytes(reader, participant_identity), participant_identity)

    def _spawn(self, read: Any, identity: str) -> None:
        """Read the stream now, queue it after the sender's previous stream."""
        previous = self._last_stream.get(identity)
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(self._queue_in_open_order(read, previous))
        self._last_stream[identity] = task
        self._stream_tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._stream_tasks.discard(finished)
            if self._last_stream.get(identity) is finished:
                del self._last_stream[identity]

        task.add_done_callback(done)

    async def _queue_in_open_order(self, read: Any, previous: asyncio.Task[None] | None) -> None:
        observation: Observation = await read
        if previous is not None:
            await asyncio.wait({previous})  # done, failed or cancelled: never raises
        self._put(observation)

    async def _read_text(self, reader: rtc.TextStreamReader, identity: str) -> Observation:
        info = reader.info
        data, spooled, error = await _read_spooled(
            (chunk.encode("utf-8", "surrogatepass") async for chunk in reader), self.ingest, info.stream_id, info.topic
        )
        attrs = dict(info.attributes or {})
        return lambda: self.ingest.text_stream(
            data, topic=info.topic, stream_id=info.stream_id, sender_identity=identity, attributes=attrs,
            timestamp_ms=info.timestamp, error=error, spooled=spooled)

    async def _read_bytes(self, reader: rtc.ByteStreamReader, identity: str) -> Observation:
        info = reader.info
        data, spooled, error = await _read_spooled(
            (chunk async for chunk in reader), self.ingest, info.stream_id, info.topic
        )
        attrs = dict(info.attributes or {})
        return lambda: self.ingest.byte_stream(
            data, topic=info.topic, stream_id=info.stream_id, sender_identity=identity, attributes=attrs,
            name=info.name, timestamp_ms=info.timestamp, error=error, spooled=spooled)


async def _read_spooled(chunks: AsyncIterator[bytes], ingest: Ingest, stream_id: str,
                        topic: str) -> tuple[bytes, ev.PayloadRef | None, str | None]:
    """Read a stream to its end, whatever its size: ``(bytes, spooled, error)``.

    Up to the inline limit it stays in memory. Past it, every chunk goes to the spool file and
    to the payload bucket as it arrives (memory stays at a few chunks however large the stream),
    and ``spooled`` is its reference. The whole is read back only when it is to be parsed (a typed topic, or JSON) and
    within the hard limit; otherwise ``bytes`` is just its head. A stream that fails midway keeps
    what arrived and names the failure.
    """
    parts: list[bytes] = []
    kept = 0
    writer: SpoolWriter | None = None
    error: str | None = None
    try:
        try:
            async for data in chunks:
                if writer is not None:
                    writer.write(data)
                    continue
                parts.append(data)
                kept += len(data)
                if kept > ingest.inline_limit:
                    writer = ingest.spool.writer(ingest.stream_payload_name(stream_id), upload=True)
                    for part in parts:
                        writer.write(part)
                    head = b"".join(parts)[: 4096]
                    parts = [head]
        except rtc.StreamError as exc:
            error = exc.description or "stream error"
        except Exception as exc:
            error = type(exc).__name__
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is None:
        return b"".join(parts), None, error
    ref = writer.finish()
    await writer.stored()  # the bucket has the bytes about when the stream ends
    head = parts[0]
    if error is None and ref.size <= ingest.max_payload and (
            topic in TYPED_TOPICS or head.lstrip()[:1] in (b"{", b"[")):
        whole = await asyncio.to_thread(writer.read_all)
        return whole, ref, None
    return head, ref, error
