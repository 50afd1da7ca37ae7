"""The loopback SFU's server API: Twirp over HTTP, as ``livekit.api.LiveKitAPI`` calls it.

``POST /twirp/livekit.<Service>/<Method>`` with ``Authorization: Bearer <jwt>`` and a protobuf
body (``Content-Type: application/protobuf``, what the Python client sends) or JSON
(``application/json``); the answer comes in the same encoding; errors are Twirp JSON
``{"code": ..., "msg": ...}`` with the matching HTTP status.  Every method needs the
``room_admin`` grant (``room_list`` for ``ListRooms``), for the request's room if the token
names one.

Implemented: ``AgentDispatchService`` ``CreateDispatch``/``ListDispatch``/``DeleteDispatch``;
``RoomService`` ``CreateRoom`` (with ``agents``: dispatches), ``ListRooms``, ``DeleteRoom``,
``ListParticipants``, ``GetParticipant``, ``RemoveParticipant``, ``UpdateRoomMetadata``.
Anything else answers ``bad_route`` (404).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from livekit.protocol import agent_dispatch, models, room

if TYPE_CHECKING:
    from .server import LoopbackSFU


#: HTTP status of each Twirp error code used here.
_STATUS = {"not_found": 404, "bad_route": 404, "invalid_argument": 400, "malformed": 400,
           "unauthenticated": 401, "permission_denied": 403, "internal": 500}


class TwirpError(Exception):

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code, self.msg = code, msg

    def response(self) -> web.Response:
        return web.json_response({"code": self.code, "msg": self.msg}, status=_STATUS.get(self.code, 500))


@dataclass(frozen=True)
class Method:
    request: type[Message]
    call: Callable[[Any], Awaitable[Message]]
    grant: str = "room_admin"


class TwirpAPI:
    def __init__(self, sfu: LoopbackSFU) -> None:
        self.sfu = sfu
        agents = sfu.agents
        self.methods: dict[str, Method] = {
            "livekit.AgentDispatchService/CreateDispatch": Method(
                agent_dispatch.CreateAgentDispatchRequest, self._create_dispatch),
            "livekit.AgentDispatchService/ListDispatch": Method(
                agent_dispatch.ListAgentDispatchRequest,
                self._sync(lambda r: agent_dispatch.ListAgentDispatchResponse(
                    agent_dispatches=agents.list_dispatch(r)))),
            "livekit.AgentDispatchService/DeleteDispatch": Method(
                agent_dispatch.DeleteAgentDispatchRequest, self._delete_dispatch),
            "livekit.RoomService/CreateRoom": Method(room.CreateRoomRequest, self._create_room, "room_create"),
            "livekit.RoomService/ListRooms": Method(
                room.ListRoomsRequest,
                self._sync(lambda r: room.ListRoomsResponse(rooms=[
                    x.info() for x in sfu.rooms.values() if not r.names or x.name in r.names])),
                "room_list"),
            "livekit.RoomService/DeleteRoom": Method(room.DeleteRoomRequest, self._delete_room, "room_create"),
            "livekit.RoomService/ListParticipants": Method(
                room.ListParticipantsRequest,
                self._sync(lambda r: room.ListParticipantsResponse(participants=[
                    p.info() for p in self._existing_room(r.room).participants.values()]))),
            "livekit.RoomService/GetParticipant": Method(
                room.RoomParticipantIdentity,
                self._sync(lambda r: self._participant(r.room, r.identity).info())),
            "livekit.RoomService/RemoveParticipant": Method(room.RoomParticipantIdentity, self._remove_participant),
            "livekit.RoomService/UpdateRoomMetadata": Method(room.UpdateRoomMetadataRequest, self._room_metadata),
        }

    @staticmethod
    def _sync(fn: Callable[[Any], Message]) -> Callable[[Any], Awaitable[Message]]:
        async def call(req: Any) -> Message:
            return fn(req)

        return call

    def _existing_room(self, name: str) -> Any:
        found = self.sfu.rooms.get(name)
        if found is None:
            raise TwirpError("not_found", f"room {name!r} does not exist")
        return found

    def _participant(self, room_name: str, identity: str) -> Any:
        found = self._existing_room(room_name).participants.get(identity)
        if found is None:
            raise TwirpError("not_found", "participant not found")
        return found

    async def _create_dispatch(self, req: agent_dispatch.CreateAgentDispatchRequest) -> Message:
        if not req.room:
            raise TwirpError("invalid_argument", "room is required")
        return self.sfu.agents.create_dispatch(req)

    async def _delete_dispatch(self, req: agent_dispatch.DeleteAgentDispatchRequest) -> Message:
        deleted = self.sfu.agents.delete_dispatch(req)
        if deleted is None:
            raise TwirpError("not_found", "dispatch ID not found")
        return deleted

    async def _create_room(self, req: room.CreateRoomRequest) -> Message:
        created = req.name not in self.sfu.rooms
        r = self.sfu._room(req.name)
        if req.metadata:
            await self.sfu._set_room_metadata(req.name, req.metadata)
        if created:
            for a in req.agents:
                self.sfu.agents.create_dispatch(agent_dispatch.CreateAgentDispatchRequest(
                    agent_name=a.agent_name, room=req.name, metadata=a.metadata, deployment=a.deployment))
        return r.info()

    async def _delete_room(self, req: room.DeleteRoomRequest) -> Message:
        self._existing_room(req.room)
        await self.sfu._delete_room(req.room)
        return room.DeleteRoomResponse()

    async def _remove_participant(self, req: room.RoomParticipantIdentity) -> Message:
        self._participant(req.room, req.identity)
        await self.sfu._remove_participant(req.room, req.identity, models.PARTICIPANT_REMOVED)
        return room.RemoveParticipantResponse()

    async def _room_metadata(self, req: room.UpdateRoomMetadataRequest) -> Message:
        self._existing_room(req.room)
        await self.sfu._set_room_metadata(req.room, req.metadata)
        return self.sfu.rooms[req.room].info()

    async def handle(self, request: web.Request) -> web.Response:
        try:
            method = self.methods.get(request.match_info["method"])
            if method is None:
                raise TwirpError("bad_route", f"no handler for {request.path}")
            claims = self.sfu._claims(request)
            if claims is None or claims.video is None:
                raise TwirpError("unauthenticated", "invalid token")
            as_json = request.content_type == "application/json"
            body = await request.read()
            try:
                req = json_format.Parse(body or b"{}", method.request()) if as_json else method.request.FromString(body)
            except (DecodeError, json_format.ParseError) as exc:
                raise TwirpError("malformed", f"bad request body: {exc}") from None
            target = getattr(req, "room", "") or getattr(req, "name", "")
            if not getattr(claims.video, method.grant, False) or (claims.video.room and target
                                                                   and claims.video.room != target):
                raise TwirpError("permission_denied", f"needs the {method.grant} grant for this room")
            res = await method.call(req)
        except TwirpError as exc:
            return exc.response()
        if as_json:
            return web.Response(body=json_format.MessageToJson(res, preserving_proto_field_name=True),
                                content_type="application/json")
        return web.Response(body=res.SerializeToString(), content_type="application/protobuf")
