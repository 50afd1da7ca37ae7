"""``ledger demo`` through a real LiveKit room, when ``LIVEKIT_URL`` is set.

The same script as the offline demo, but every caller and agent is a real participant
(``livekit.rtc.Room``) and what they do goes over LiveKit: transcripts as ``lk.transcription``
text streams, the seed-000 status packets as data packets, ``lk.agent.state`` as attributes,
ledger events on topic ``ledger``.  A bridge in the room (the same code as ``ledger bridge``)
records it all.  Each step waits until the log has it before the next one starts, so the floor
decided from the log is the one the script means, however the network orders packets between
participants.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from livekit import api, rtc

from room_ledger.agents import protocol_event_id
from room_ledger.bridge.room import RoomBridge
from room_ledger.bridge.worker import bridge_one_room
from room_ledger.bridge.writer import BridgeWriter
from room_ledger.cli.common import CliError
from room_ledger.client import Ledger, Record
from room_ledger.settings import Settings
from room_ledger.watch import RoomWatch, watch

#: Reliable data packets carry at most this much; larger ledger events go as a text stream.
PACKET_LIMIT = 15 * 1024
#: How long one step may take to reach the log before the demo gives up.
STEP_TIMEOUT_S = 20.0

Match = Callable[[Record], bool]


def _field(record: Record, name: str) -> Any:
    """A field of a record's body (None for events without one, or without that field)."""
    return getattr(getattr(record.event, "body", None), name, None)


class _LiveIngest:
    """What the offline script asks of the bridge's ingest directly, done by the real room instead."""

    def __init__(self, script: LiveScript) -> None:
        self._script = script

    def bridge_joined(self, _url: str) -> None:
        """The real bridge records its own arrival."""

    def participant_left(self, identity: str, **_: Any) -> None:
        self._script.steps.append(self._script.leave(identity))


class LiveScript:
    """``cli.demo.Script``'s steps, played by real participants; ``beat`` runs them in order."""

    def __init__(self, settings: Settings, writer: BridgeWriter, room: str, log: RoomWatch) -> None:
        self.settings = settings
        self.writer = writer
        self.room = room
        self.log = log
        self.ingest = _LiveIngest(self)
        self.participants: dict[str, rtc.Room] = {}
        #: identity -> sid of the audio track it published (transcripts name the track, not the speaker)
        self.tracks: dict[str, str] = {}
        self.steps: list[Any] = []
        self._n = 0
        self._seen = 0

    def _id(self) -> str:
        self._n += 1
        return f"{self.room}-{self._n:04d}"

    def _token(self, identity: str, kind: str, attributes: dict[str, str]) -> str:
        assert self.settings.livekit_api_key and self.settings.livekit_api_secret
        return (api.AccessToken(self.settings.livekit_api_key, self.settings.livekit_api_secret)
                .with_identity(identity).with_kind(kind)  # type: ignore[arg-type]
                .with_attributes(attributes)
                .with_grants(api.VideoGrants(room_join=True, room=self.room, can_update_own_metadata=True,
                                             agent=kind == "agent"))
                .to_jwt())

    async def _recorded(self, match: Match, what: str) -> None:
        # WatchTimeout is a LedgerError: the CLI prints it (what the log has, what to check) and exits 1.
        self._seen = await self.log.next_index(match, after=self._seen, timeout=STEP_TIMEOUT_S,
                                               what=f"the bridge to record {what}") + 1

    # ---- the offline Script's vocabulary ---------------------------------------------------

    def join(self, identity: str, kind: str) -> None:
        self.steps.append(self._join(identity, kind))

    async def _join(self, identity: str, kind: str) -> None:
        attributes = {"lk.agent.state": "listening"} if kind == "agent" else {}
        room = rtc.Room()
        await room.connect(self.settings.livekit_url or "", self._token(identity, kind, attributes))
        self.participants[identity] = room
        if kind != "agent":
            # A caller speaks through a microphone track; an agent transcribing the caller names that
            # track, which is how the bridge tells whose words they are (as with LiveKit Agents).
            source = rtc.AudioSource(48000, 1)
            track = rtc.LocalAudioTrack.create_audio_track("microphone", source)
            publication = await room.local_participant.publish_track(
                track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
            self.tracks[identity] = publication.sid
        await self._recorded(lambda r: r.type == "participant.joined"
                             and _field(r, "identity") == identity, f"{identity} joining")

    async def leave(self, identity: str) -> None:
        room = self.participants.pop(identity)
        await room.disconnect()
        await self._recorded(lambda r: r.type == "participant.left"
                             and _field(r, "identity") == identity, f"{identity} leaving")

    def say(self, speaker: str, text: str, *, transcriber: str | None = None) -> None:
        self.steps.append(self._say(speaker, text, transcriber or speaker))

    async def _say(self, speaker: str, text: str, transcriber: str) -> None:
        sender = self.participants[transcriber]
        track = self.tracks.get(speaker, f"TR_{speaker}")
        await sender.local_participant.send_text(
            text, topic="lk.transcription",
            attributes={"lk.transcription_final": "true", "lk.segment_id": f"SG_{self._id()}",
                        "lk.transcribed_track_id": track})
        await self._recorded(lambda r: r.type == "transcript" and _field(r, "text") == text,
                             f"{speaker}'s words")

    def state(self, agent: str, state: str, old: str | None = None) -> None:
        self.steps.append(self._state(agent, state))

    async def _state(self, agent: str, state: str) -> None:
        await self.participants[agent].local_participant.set_attributes({"lk.agent.state": state})
        await self._recorded(lambda r: r.type == "agent.state" and _field(r, "identity") == agent
                             and _field(r, "state") == state, f"{agent} {state}")

    def status(self, agent: str, status: str, lock: bool, task: str | None = None) -> None:
        payload: dict[str, Any] = {"agent_id": agent, "status": status, "action_lock": lock}
        if task:
            payload["task"] = task
        self.steps.append(self._packet(agent, json.dumps(payload).encode(), "agent-state",
                                       lambda r: r.type == "agent.status" and r.event.sender.identity == agent
                                       and _field(r, "status") == status,
                                       f"{agent}'s status {status}"))

    def publish(self, agent: str, type_: str, **body: Any) -> None:
        event_id = self._id()
        payload = json.dumps({"type": type_, "id": event_id, **body}).encode()
        stored_id = protocol_event_id(self.room, event_id)  # the id the bridge gives the sender's id
        self.steps.append(self._packet(agent, payload, "ledger", lambda r: r.event.id == stored_id,
                                       f"{agent}'s {type_}"))

    async def _packet(self, agent: str, payload: bytes, topic: str, match: Match, what: str) -> None:
        participant = self.participants[agent].local_participant
        if len(payload) > PACKET_LIMIT:
            await participant.send_text(payload.decode(), topic=topic)
        else:
            await participant.publish_data(payload, reliable=True, topic=topic)
        await self._recorded(match, what)

    async def beat(self, pause: float = 0.04) -> None:
        steps, self.steps = self.steps, []
        for step in steps:
            await step
        await asyncio.sleep(pause)

    async def close(self) -> None:
        for room in self.participants.values():
            with contextlib.suppress(Exception):
                await room.disconnect()
        self.participants.clear()


@contextlib.asynccontextmanager
async def live_room(settings: Settings, ledger: Ledger, writer: BridgeWriter, room: str) -> Any:
    """A bridge in ``room`` on the LiveKit of ``settings``; yields the script to play there."""
    stop = asyncio.Event()
    connected = asyncio.Event()

    def on_connected(_bridge: RoomBridge) -> None:
        connected.set()

    task = asyncio.create_task(bridge_one_room(settings, room, writer, stop, on_connected=on_connected))
    waiter = asyncio.ensure_future(connected.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=STEP_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        stop.set()
        if task.done() and task.exception() is not None:
            raise CliError(f"the bridge could not join {settings.livekit_url}: {task.exception()}")
        raise CliError(f"the bridge could not join a room on {settings.livekit_url} within "
                       f"{STEP_TIMEOUT_S:.0f}s: is livekit-server running there?")
    log = watch(ledger, room)
    script = LiveScript(settings, writer, room, log)
    try:
        yield script
    finally:
        await script.close()
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 20)
        await log.close()
