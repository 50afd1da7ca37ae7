"""A LiveKit-compatible loopback SFU for tests: signalling and data channels only, no media.

Real ``livekit.rtc.Room`` participants (the Rust core, libwebrtc, SCTP data channels and all)
connect to it.  It speaks the single-peer-connection signal path of protocol 17
(``GET /rtc/v1?join_request=...``, see ``livekit-api/src/signal_client`` in livekit/rust-sdks):

* one binary ``SignalRequest`` per WebSocket frame from the client, one ``SignalResponse`` back;
* the first response is a ``JoinResponse``; the client always offers and the server answers
  (aiortc), candidates trickle as JSON;
* the client opens ``_reliable`` and ``_lossy`` data channels and also reads on them, so each
  ``DataPacket`` is forwarded to every other participant on *that* participant's channel of the
  same label, stamped with the sender's identity and sid.

The server runs its own event loop in a daemon thread, so it works with any pytest-asyncio loop
scope and keeps serving while a test's loop is busy; the async methods of :class:`LoopbackSFU`
hop to that thread.

Everything the Rust core receives must be well formed: a sid without its ``RM_``/``PA_`` prefix,
an unparsable SDP or trickle JSON, or ``ping_interval == 0`` aborts the whole Python process.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import gzip
import json
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aioice.ice
from aiohttp import WSMsgType, web
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import candidate_from_sdp
from livekit import api
from livekit.protocol import models, rtc

from .agents import AgentService
from .twirp import TwirpAPI

log = logging.getLogger("tests.livekit_sfu")

T = TypeVar("T")

#: Labels of the client's data channels that carry ``DataPacket`` protobufs.
DATA_LABELS = {"_reliable": models.DataPacket.RELIABLE, "_lossy": models.DataPacket.LOSSY}
#: Seconds between client pings, and before the client declares the signal dead.
PING_INTERVAL, PING_TIMEOUT = 5, 15
#: How long a participant whose signal dropped is kept, waiting for it to come back.
DEPARTURE_TIMEOUT = 20.0
#: The only host address aioice gathers on: traffic stays inside 127.0.0.0/8.
ICE_HOST = "127.0.0.1"
SERVER_VERSION = "1.9.0-loopback"

_KINDS: dict[str, models.ParticipantInfo.Kind] = {
    "": models.ParticipantInfo.STANDARD,
    "standard": models.ParticipantInfo.STANDARD,
    "agent": models.ParticipantInfo.AGENT,
    "sip": models.ParticipantInfo.SIP,
    "egress": models.ParticipantInfo.EGRESS,
    "ingress": models.ParticipantInfo.INGRESS,
}


def _sid(prefix: str) -> str:
    """A sid the Rust core accepts: ``RM_``/``PA_`` and 12 random alphanumerics."""
    return prefix + secrets.token_hex(6)


def _now_ms() -> int:
    return int(time.time() * 1000)


def decode_join_request(param: str) -> rtc.JoinRequest:
    """Decode the ``join_request`` query parameter (base64url ``WrappedJoinRequest``)."""
    raw = base64.urlsafe_b64decode(param + "=" * (-len(param) % 4))
    wrapped = rtc.WrappedJoinRequest.FromString(raw)
    payload = wrapped.join_request
    if wrapped.compression == rtc.WrappedJoinRequest.GZIP:
        payload = gzip.decompress(payload)
    return rtc.JoinRequest.FromString(payload)


@dataclass(eq=False)
class Participant:
    """One signal session: a participant as the room sees it, with its socket and peer connection."""

    room: Room
    identity: str
    name: str
    metadata: str
    attributes: dict[str, str]
    permission: models.ParticipantPermission
    kind: models.ParticipantInfo.Kind
    ws: web.WebSocketResponse
    #: What the client's SDK says it understands (RPC over data streams...): peers read it.
    client_protocol: int = 0
    sid: str = field(default_factory=lambda: _sid("PA_"))
    state: models.ParticipantInfo.State = models.ParticipantInfo.JOINED
    joined_at_ms: int = field(default_factory=_now_ms)
    version: int = 1
    pc: RTCPeerConnection | None = None
    channels: dict[str, RTCDataChannel] = field(default_factory=dict)
    #: Packets for channels the client has not opened yet (it connects before they are open).
    pending: dict[str, list[bytes]] = field(default_factory=dict)
    outbox: asyncio.Queue[rtc.SignalResponse | None] = field(default_factory=asyncio.Queue)
    signal_open: bool = True
    gone: bool = False
    departure: asyncio.TimerHandle | None = None

    @property
    def hidden(self) -> bool:
        return self.permission.hidden

    def info(self) -> models.ParticipantInfo:
        return models.ParticipantInfo(
            sid=self.sid,
            identity=self.identity,
            name=self.name,
            metadata=self.metadata,
            attributes=self.attributes,
            state=self.state,
            joined_at=self.joined_at_ms // 1000,
            joined_at_ms=self.joined_at_ms,
            version=self.version,
            permission=self.permission,
            kind=self.kind,
            client_protocol=self.client_protocol,
        )

    def send(self, response: rtc.SignalResponse) -> None:
        """Queue one signal message; a writer task keeps them in order."""
        if self.signal_open:
            self.outbox.put_nowait(response)

    def send_data(self, label: str, payload: bytes) -> None:
        channel = self.channels.get(label)
        if channel is not None and channel.readyState == "open":
            channel.send(payload)
        elif not self.gone:
            self.pending.setdefault(label, []).append(payload)

    def add_channel(self, channel: RTCDataChannel) -> None:
        self.channels[channel.label] = channel
        for payload in self.pending.pop(channel.label, []):
            channel.send(payload)


@dataclass(eq=False)
class Room:
    name: str
    sid: str = field(default_factory=lambda: _sid("RM_"))
    metadata: str = ""
    created_ms: int = field(default_factory=_now_ms)
    participants: dict[str, Participant] = field(default_factory=dict)

    def info(self) -> models.Room:
        return models.Room(
            sid=self.sid,
            name=self.name,
            metadata=self.metadata,
            creation_time=self.created_ms // 1000,
            creation_time_ms=self.created_ms,
            empty_timeout=300,
            departure_timeout=int(DEPARTURE_TIMEOUT),
            num_participants=sum(not p.hidden for p in self.participants.values()),
        )

    def others(self, me: Participant) -> list[Participant]:
        return [p for p in self.participants.values() if p is not me]


class LoopbackSFU:
    """The server.  ``start()``/``stop()`` from any thread; everything else runs on its own loop."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str = "devkey",
        api_secret: str = "loopback-sfu-secret-loopback-sfu-secret",
    ) -> None:
        self.host, self.port = host, port
        self.api_key, self.api_secret = api_key, api_secret
        self.rooms: dict[str, Room] = {}
        self._verifier = api.TokenVerifier(api_key, api_secret)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.deliveries: Counter[tuple[str, str]] = Counter()
        self.refused = 0
        self._changed_event: asyncio.Event | None = None
        self.agents = AgentService(self)
        self.twirp = TwirpAPI(self)

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def start(self) -> LoopbackSFU:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="loopback-sfu", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise RuntimeError("the loopback SFU did not start") from failure[0]
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(Exception):
            self.call(self._shutdown()).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop = self._thread = None

    def call(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the server's loop, from any thread."""
        assert self._loop is not None, "server not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on the server's loop from the caller's loop."""
        return await asyncio.wrap_future(self.call(coro))

    async def _serve(self) -> None:
        # aioice skips 127.0.0.1 when it gathers host candidates; in the test namespace it is the
        # only address we want (libwebrtc, on the client side, sits on the veth's 127.0.0.2).
        aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: [ICE_HOST]
        app = web.Application()
        app.router.add_get("/rtc/v1", self._handle_signal)
        app.router.add_get("/rtc/v1/validate", self._handle_validate)
        app.router.add_get("/rtc/validate", self._handle_validate)
        app.router.add_get("/agent", self.agents.handle_worker)
        app.router.add_post("/twirp/{method:.+}", self.twirp.handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]  # the free port the OS chose
        log.info("loopback SFU listening on %s", self.url)

    async def _shutdown(self) -> None:
        for room in list(self.rooms.values()):
            for p in list(room.participants.values()):
                p.send(rtc.SignalResponse(leave=rtc.LeaveRequest(
                    reason=models.SERVER_SHUTDOWN, action=rtc.LeaveRequest.DISCONNECT)))
                await self._remove(p)
        if self._runner is not None:
            await self._runner.cleanup()
        for task in list(self._tasks):
            task.cancel()

    @property
    def _changed(self) -> asyncio.Event:
        if self._changed_event is None:
            self._changed_event = asyncio.Event()
        return self._changed_event

    def _notify(self) -> None:
        """Wake :meth:`wait_until` callers: they re-check their predicate."""
        if self._changed_event is not None:
            self._changed_event.set()
            self._changed_event = None

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- tokens ----------------------------------------------------------------------------

    def token(
        self,
        identity: str,
        room: str,
        *,
        hidden: bool = False,
        can_publish: bool = True,
        can_publish_data: bool = True,
        can_subscribe: bool = True,
        attributes: dict[str, str] | None = None,
        name: str | None = None,
        metadata: str | None = None,
        kind: str = "standard",
    ) -> str:
        return mint_token(
            self.api_key, self.api_secret, identity, room,
            hidden=hidden, can_publish=can_publish, can_publish_data=can_publish_data,
            can_subscribe=can_subscribe, attributes=attributes, name=name, metadata=metadata, kind=kind,
        )

    def _claims(self, request: web.Request) -> api.access_token.Claims | None:
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ").strip() or request.query.get("access_token", "")
        try:
            return self._verifier.verify(token)
        except Exception:
            return None

    async def _handle_validate(self, request: web.Request) -> web.Response:
        if self._claims(request) is None:
            return web.Response(status=401, text="invalid token")
        return web.Response(text="success")

    # ---- signalling ------------------------------------------------------------------------

    async def _handle_signal(self, request: web.Request) -> web.StreamResponse:
        claims = self._claims(request)
        grants = claims.video if claims else None
        if claims is None or grants is None or not grants.room_join or not grants.room:
            return web.Response(status=401, text="invalid token")
        try:
            join = decode_join_request(request.query["join_request"])
        except Exception:
            return web.Response(status=400, text="bad join_request")

        ws = web.WebSocketResponse(heartbeat=None, max_msg_size=0)
        await ws.prepare(request)

        if join.reconnect:
            # A resume (ICE restart on the same session) needs what aiortc lacks: ask for a
            # full reconnect instead.  The SDK rejoins with a new sid and emits reconnected.
            await ws.send_bytes(rtc.SignalResponse(leave=rtc.LeaveRequest(
                can_reconnect=True, reason=models.SIGNAL_CLOSE,
                action=rtc.LeaveRequest.RECONNECT)).SerializeToString())
            await ws.close()
            return ws

        room = self._room(grants.room)
        permission = models.ParticipantPermission(
            can_subscribe=grants.can_subscribe,
            can_publish=grants.can_publish,
            can_publish_data=grants.can_publish_data,
            hidden=bool(grants.hidden),
            can_update_metadata=bool(grants.can_update_own_metadata),
            agent=bool(grants.agent),
        )
        attributes = dict(claims.attributes or {})
        attributes.update(join.participant_attributes)
        me = Participant(
            room=room,
            identity=claims.identity,
            name=claims.name,
            metadata=join.metadata or claims.metadata,
            attributes=attributes,
            permission=permission,
            kind=_KINDS.get(claims.kind, models.ParticipantInfo.STANDARD),
            ws=ws,
            client_protocol=join.client_info.client_protocol,
        )
        writer = asyncio.ensure_future(self._write_signal(me))

        previous = room.participants.get(me.identity)
        if previous is not None:  # same identity: the newcomer wins, like LiveKit
            previous.send(rtc.SignalResponse(leave=rtc.LeaveRequest(
                reason=models.DUPLICATE_IDENTITY, action=rtc.LeaveRequest.DISCONNECT)))
            await self._remove(previous)
        room.participants[me.identity] = me

        me.send(rtc.SignalResponse(join=rtc.JoinResponse(
            room=room.info(),
            participant=me.info(),
            other_participants=[p.info() for p in room.others(me) if not p.hidden],
            server_version=SERVER_VERSION,
            server_info=self.server_info(),
            ping_interval=PING_INTERVAL,
            ping_timeout=PING_TIMEOUT,
        )))
        self._announce(me)
        try:
            if join.HasField("publisher_offer"):
                await self._answer(me, join.publisher_offer)
            async for msg in ws:
                if msg.type != WSMsgType.BINARY:
                    continue
                await self._on_request(me, rtc.SignalRequest.FromString(msg.data))
        except Exception:
            log.exception("signal session of %s/%s failed", room.name, me.identity)
        finally:
            me.signal_open = False
            me.outbox.put_nowait(None)
            await writer
            if not me.gone:
                # The socket went away without a leave: keep the participant for a while, as
                # LiveKit does, in case it resumes (that ends in a full reconnect anyway).
                loop = asyncio.get_running_loop()
                me.departure = loop.call_later(
                    DEPARTURE_TIMEOUT, lambda: self._spawn(self._remove(me)))
        return ws

    async def _write_signal(self, me: Participant) -> None:
        while (response := await me.outbox.get()) is not None:
            try:
                await me.ws.send_bytes(response.SerializeToString())
            except Exception:  # socket already closing: the reader side cleans up
                return
            if response.HasField("leave"):
                await me.ws.close()
                return

    async def _on_request(self, me: Participant, req: rtc.SignalRequest) -> None:
        which = req.WhichOneof("message")
        if which == "offer":
            await self._answer(me, req.offer)
        elif which == "trickle":
            await self._add_candidate(me, req.trickle)
        elif which == "ping_req":
            me.send(rtc.SignalResponse(pong_resp=rtc.Pong(
                last_ping_timestamp=req.ping_req.timestamp, timestamp=_now_ms())))
        elif which == "ping":
            me.send(rtc.SignalResponse(pong=_now_ms()))
        elif which == "update_metadata":
            self._update_metadata(me, req.update_metadata)
        elif which == "leave":
            await self._remove(me)
        else:  # media, subscriptions, data tracks...: not implemented, ignored
            log.debug("ignoring %s from %s", which, me.identity)

    async def _answer(self, me: Participant, offer: rtc.SessionDescription) -> None:
        if me.pc is None:
            me.pc = self._peer_connection(me)
        await me.pc.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type=offer.type))
        await me.pc.setLocalDescription(await me.pc.createAnswer())
        local = me.pc.localDescription
        # aiortc gathers before answering: its candidates are in the SDP, nothing to trickle.
        me.send(rtc.SignalResponse(answer=rtc.SessionDescription(
            type=local.type, sdp=local.sdp, id=offer.id)))

    async def _add_candidate(self, me: Participant, trickle: rtc.TrickleRequest) -> None:
        init = json.loads(trickle.candidateInit)
        text = init.get("candidate", "")
        if me.pc is None or not text:
            return
        candidate = candidate_from_sdp(text.removeprefix("candidate:"))
        candidate.sdpMid = init.get("sdpMid")
        candidate.sdpMLineIndex = init.get("sdpMLineIndex")
        await me.pc.addIceCandidate(candidate)

    def _peer_connection(self, me: Participant) -> RTCPeerConnection:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))

        @pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            me.add_channel(channel)
            if channel.label in DATA_LABELS:
                channel.on("message", lambda payload: self._forward(me, channel.label, payload))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "connected" and me.state != models.ParticipantInfo.ACTIVE:
                me.state = models.ParticipantInfo.ACTIVE
                me.version += 1
                self._announce(me)
            elif pc.connectionState in ("failed", "closed") and pc is me.pc:
                await self._remove(me)

        return pc

    # ---- room logic ------------------------------------------------------------------------

    def server_info(self) -> models.ServerInfo:
        return models.ServerInfo(edition=models.ServerInfo.Standard, version=SERVER_VERSION, protocol=16,
                                 node_id="loopback")

    def _room(self, name: str) -> Room:
        """The room called ``name``, created if needed."""
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name)
            self._notify()
        return room

    async def _set_room_metadata(self, room: str, metadata: str) -> None:
        r = self._room(room)
        r.metadata = metadata
        update = rtc.SignalResponse(room_update=rtc.RoomUpdate(room=r.info()))
        for p in r.participants.values():
            p.send(update)
        self._notify()

    async def _remove_participant(self, room: str, identity: str,
                                  reason: models.DisconnectReason.ValueType) -> None:
        me = self._find(room, identity)
        me.send(rtc.SignalResponse(leave=rtc.LeaveRequest(reason=reason, action=rtc.LeaveRequest.DISCONNECT)))
        await self._remove(me)

    async def _delete_room(self, name: str) -> None:
        """Disconnect everyone (ROOM_DELETED), end the room's jobs, forget the room."""
        room = self.rooms.get(name)
        if room is None:
            return
        self.agents.room_deleted(name)
        for p in list(room.participants.values()):
            await self._remove_participant(name, p.identity, models.ROOM_DELETED)
        self.rooms.pop(name, None)
        self._notify()

    def _announce(self, me: Participant, *, to_self: bool = True) -> None:
        """Tell the room about ``me`` (hidden participants are told only about themselves)."""
        self._notify()
        update = rtc.SignalResponse(update=rtc.ParticipantUpdate(participants=[me.info()]))
        if to_self:
            me.send(update)
        if not me.hidden:
            for other in me.room.others(me):
                other.send(update)

    def _forward(self, sender: Participant, label: str, payload: bytes | str) -> None:
        if not sender.permission.can_publish_data or isinstance(payload, str):
            self.refused += 1
            self._notify()
            return
        try:
            packet = models.DataPacket.FromString(payload)
        except Exception:
            log.warning("dropping a malformed data packet from %s", sender.identity)
            self.refused += 1
            return
        packet.participant_identity = sender.identity
        packet.participant_sid = sender.sid
        targets = set(packet.destination_identities)
        data = packet.SerializeToString()
        for other in sender.room.others(sender):
            if other.permission.can_subscribe and (not targets or other.identity in targets):
                other.send_data(label, data)
                self.deliveries[sender.room.name, other.identity] += 1
        self._notify()

    def _update_metadata(self, me: Participant, req: rtc.UpdateParticipantMetadata) -> None:
        if not me.permission.can_update_metadata:
            reason = rtc.RequestResponse.NOT_ALLOWED
        else:
            reason = rtc.RequestResponse.OK
            if req.name:
                me.name = req.name
            if req.metadata:
                me.metadata = req.metadata
            for key, value in req.attributes.items():
                if value:
                    me.attributes[key] = value
                else:
                    me.attributes.pop(key, None)
            me.version += 1
        me.send(rtc.SignalResponse(request_response=rtc.RequestResponse(
            request_id=req.request_id, reason=reason, update_metadata=req)))
        if reason == rtc.RequestResponse.OK:
            self._announce(me)

    async def _remove(self, me: Participant) -> None:
        """Take ``me`` out of its room: announce it, close its socket and peer connection."""
        if me.gone:
            return
        me.gone = True
        if me.departure is not None:
            me.departure.cancel()
        room = me.room
        if room.participants.get(me.identity) is me:
            del room.participants[me.identity]
            me.state = models.ParticipantInfo.DISCONNECTED
            me.version += 1
            self._announce(me, to_self=False)
        me.signal_open = False
        me.outbox.put_nowait(None)
        if me.pc is not None:
            await me.pc.close()

    def _find(self, room: str, identity: str) -> Participant:
        try:
            return self.rooms[room].participants[identity]
        except KeyError:
            raise LookupError(f"no participant {identity!r} in room {room!r}") from None

    # ---- fault and admin API (awaitable from any loop) -------------------------------------

    async def list_participants(self, room: str) -> list[models.ParticipantInfo]:
        """Everyone in the room, hidden participants included (as LiveKit's RoomService)."""

        async def go() -> list[models.ParticipantInfo]:
            r = self.rooms.get(room)
            return [p.info() for p in r.participants.values()] if r else []

        return await self._run(go())

    async def drop_signal(self, room: str, identity: str) -> None:
        """Close the participant's signal WebSocket without a word, as a network failure would."""

        async def go() -> None:
            me = self._find(room, identity)
            me.signal_open = False
            await me.ws.close()

        await self._run(go())

    async def force_reconnect(self, room: str, identity: str) -> None:
        """Ask the participant to reconnect (leave with action RECONNECT): it rejoins, new sid."""

        async def go() -> None:
            self._find(room, identity).send(rtc.SignalResponse(leave=rtc.LeaveRequest(
                can_reconnect=True, reason=models.SIGNAL_CLOSE, action=rtc.LeaveRequest.RECONNECT)))

        await self._run(go())

    async def kick(self, room: str, identity: str) -> None:
        """Remove the participant (leave with reason PARTICIPANT_REMOVED); it does not come back."""

        await self._run(self._remove_participant(room, identity, models.PARTICIPANT_REMOVED))

    async def set_room_metadata(self, room: str, metadata: str) -> None:
        await self._run(self._set_room_metadata(room, metadata))

    async def wait_until(self, predicate: Callable[[LoopbackSFU], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate(server)`` holds; it is checked on the server's thread after every
        change of rooms, participants or data counters (no polling)."""

        async def go() -> None:
            while not predicate(self):
                await self._changed.wait()

        await asyncio.wait_for(self._run(go()), timeout)

    async def delivered(self, room: str, identity: str) -> int:
        """How many data packets the server has sent (or queued) to ``identity`` in ``room``.

        Lets a test assert that something was *not* delivered without waiting for nothing: the
        server decides every recipient of a packet at once.
        """

        async def go() -> int:
            return self.deliveries[room, identity]

        return await self._run(go())

    async def dropped(self) -> int:
        """How many data packets were refused (sender without ``can_publish_data``)."""

        async def go() -> int:
            return self.refused

        return await self._run(go())


def mint_token(
    api_key: str,
    api_secret: str,
    identity: str,
    room: str,
    *,
    hidden: bool = False,
    can_publish: bool = True,
    can_publish_data: bool = True,
    can_subscribe: bool = True,
    attributes: dict[str, str] | None = None,
    name: str | None = None,
    metadata: str | None = None,
    kind: str = "standard",
) -> str:
    """A join token with the given permissions (works for the loopback SFU and a real server)."""
    token = (
        api.AccessToken(api_key, api_secret)
        .with_identity(identity)
        .with_kind(kind)  # type: ignore[arg-type]
        .with_grants(api.VideoGrants(
            room_join=True, room=room, hidden=hidden, can_publish=can_publish,
            can_publish_data=can_publish_data, can_subscribe=can_subscribe,
            can_update_own_metadata=True, agent=kind == "agent"))
    )
    if name:
        token = token.with_name(name)
    if metadata:
        token = token.with_metadata(metadata)
    if attributes:
        token = token.with_attributes(attributes)
    return token.to_jwt()
