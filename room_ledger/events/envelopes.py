"""The envelopes: one tagged struct per event type around its body, the union of known types,
and the opaque event that keeps what this reader cannot type.

Part of :mod:`room_ledger.events` (import from there).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final, TypeAlias

import msgspec

from room_ledger.events.bodies import (
    UNKNOWN_SENDER,
    AgentState,
    AgentStatus,
    Body,
    BridgeGap,
    BridgeJoined,
    BridgeLeft,
    ChatMessage,
    ContextSummary,
    ConversationItem,
    Data,
    DispatchCreated,
    FloorRelease,
    FloorRequest,
    Handoff,
    ParticipantAttributes,
    ParticipantJoined,
    ParticipantLeft,
    PayloadRef,
    RoleClaim,
    RoleRelease,
    RoomMetadata,
    Sender,
    ServerEgressEnded,
    ServerEgressStarted,
    ServerEgressUpdated,
    ServerIngressEnded,
    ServerIngressStarted,
    ServerParticipantConnectionAborted,
    ServerParticipantJoined,
    ServerParticipantLeft,
    ServerRoomFinished,
    ServerRoomStarted,
    ServerTrackPublished,
    ServerTrackUnpublished,
    ServerWebhook,
    SessionPatch,
    ToolExecution,
    Transcript,
    utcnow,
)

# --- envelopes ------------------------------------------------------------------------------

_NO_RAW: Final = msgspec.Raw()


class _Envelope(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type"):
    id: str
    room: str
    at: datetime | None = None
    observed_at: datetime = msgspec.field(default_factory=utcnow)
    sender: Sender = UNKNOWN_SENDER
    #: The JSON payload exactly as sent, for typed events made from one (empty otherwise).
    sent: msgspec.Raw = _NO_RAW
    #: Where the payload lives when it is too large to be inline.
    payload: PayloadRef | None = None

    @property
    def type(self) -> str:
        return str(self.__struct_config__.tag)


class ParticipantJoinedEvent(_Envelope, frozen=True, tag="participant.joined"):
    body: ParticipantJoined


class ParticipantLeftEvent(_Envelope, frozen=True, tag="participant.left"):
    body: ParticipantLeft


class ParticipantAttributesEvent(_Envelope, frozen=True, tag="participant.attributes"):
    body: ParticipantAttributes


class RoomMetadataEvent(_Envelope, frozen=True, tag="room.metadata"):
    body: RoomMetadata


class AgentStateEvent(_Envelope, frozen=True, tag="agent.state"):
    body: AgentState


class AgentStatusEvent(_Envelope, frozen=True, tag="agent.status"):
    body: AgentStatus


class FloorRequestEvent(_Envelope, frozen=True, tag="floor.request"):
    body: FloorRequest


class FloorReleaseEvent(_Envelope, frozen=True, tag="floor.release"):
    body: FloorRelease


class TranscriptEvent(_Envelope, frozen=True, tag="transcript"):
    body: Transcript


class ChatMessageEvent(_Envelope, frozen=True, tag="chat.message"):
    body: ChatMessage


class ConversationItemEvent(_Envelope, frozen=True, tag="conversation.item"):
    body: ConversationItem


class ToolExecutionEvent(_Envelope, frozen=True, tag="tool.execution"):
    body: ToolExecution


class HandoffEvent(_Envelope, frozen=True, tag="handoff"):
    body: Handoff


class SessionPatchEvent(_Envelope, frozen=True, tag="session.patch"):
    body: SessionPatch


class ContextSummaryEvent(_Envelope, frozen=True, tag="context.summary"):
    body: ContextSummary


class DataEvent(_Envelope, frozen=True, tag="data"):
    body: Data


class BridgeJoinedEvent(_Envelope, frozen=True, tag="bridge.joined"):
    body: BridgeJoined


class BridgeGapEvent(_Envelope, frozen=True, tag="bridge.gap"):
    body: BridgeGap


class BridgeLeftEvent(_Envelope, frozen=True, tag="bridge.left"):
    body: BridgeLeft


class RoleClaimEvent(_Envelope, frozen=True, tag="role.claim"):
    body: RoleClaim


class RoleReleaseEvent(_Envelope, frozen=True, tag="role.release"):
    body: RoleRelease


class DispatchCreatedEvent(_Envelope, frozen=True, tag="dispatch.created"):
    body: DispatchCreated


class ServerRoomStartedEvent(_Envelope, frozen=True, tag="server.room_started"):
    body: ServerRoomStarted


class ServerRoomFinishedEvent(_Envelope, frozen=True, tag="server.room_finished"):
    body: ServerRoomFinished


class ServerParticipantJoinedEvent(_Envelope, frozen=True, tag="server.participant_joined"):
    body: ServerParticipantJoined


class ServerParticipantLeftEvent(_Envelope, frozen=True, tag="server.participant_left"):
    body: ServerParticipantLeft


class ServerParticipantConnectionAbortedEvent(_Envelope, frozen=True, tag="server.participant_connection_aborted"):
    body: ServerParticipantConnectionAborted


class ServerTrackPublishedEvent(_Envelope, frozen=True, tag="server.track_published"):
    body: ServerTrackPublished


class ServerTrackUnpublishedEvent(_Envelope, frozen=True, tag="server.track_unpublished"):
    body: ServerTrackUnpublished


class ServerEgressStartedEvent(_Envelope, frozen=True, tag="server.egress_started"):
    body: ServerEgressStarted


class ServerEgressUpdatedEvent(_Envelope, frozen=True, tag="server.egress_updated"):
    body: ServerEgressUpdated


class ServerEgressEndedEvent(_Envelope, frozen=True, tag="server.egress_ended"):
    body: ServerEgressEnded


class ServerIngressStartedEvent(_Envelope, frozen=True, tag="server.ingress_started"):
    body: ServerIngressStarted


class ServerIngressEndedEvent(_Envelope, frozen=True, tag="server.ingress_ended"):
    body: ServerIngressEnded


class ServerWebhookEvent(_Envelope, frozen=True, tag="server.webhook"):
    body: ServerWebhook


KnownEvent: TypeAlias = (
    ParticipantJoinedEvent
    | ParticipantLeftEvent
    | ParticipantAttributesEvent
    | RoomMetadataEvent
    | AgentStateEvent
    | AgentStatusEvent
    | FloorRequestEvent
    | FloorReleaseEvent
    | TranscriptEvent
    | ChatMessageEvent
    | ConversationItemEvent
    | ToolExecutionEvent
    | HandoffEvent
    | SessionPatchEvent
    | ContextSummaryEvent
    | DataEvent
    | BridgeJoinedEvent
    | BridgeGapEvent
    | BridgeLeftEvent
    | DispatchCreatedEvent
    | RoleClaimEvent
    | RoleReleaseEvent
    | ServerRoomStartedEvent
    | ServerRoomFinishedEvent
    | ServerParticipantJoinedEvent
    | ServerParticipantLeftEvent
    | ServerParticipantConnectionAbortedEvent
    | ServerTrackPublishedEvent
    | ServerTrackUnpublishedEvent
    | ServerEgressStartedEvent
    | ServerEgressUpdatedEvent
    | ServerEgressEndedEvent
    | ServerIngressStartedEvent
    | ServerIngressEndedEvent
    | ServerWebhookEvent
)


class OpaqueEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event this reader cannot type: an unknown type, or (with ``error``) a malformed one.

    It keeps its bytes; reducers skip it and count it; ``ledger replay`` shows it.
    """

    id: str
    room: str
    type: str
    raw: bytes
    at: datetime | None = None
    observed_at: datetime | None = None
    sender: Sender = UNKNOWN_SENDER
    #: Why a known type did not decode ("" for a type this reader does not know).
    error: str = ""


Event: TypeAlias = KnownEvent | OpaqueEvent

#: Tag -> envelope class, for every type this version knows.
EVENT_TYPES: Final[dict[str, type[_Envelope]]] = {
    str(cls.__struct_config__.tag): cls
    for cls in (
        ParticipantJoinedEvent,
        ParticipantLeftEvent,
        ParticipantAttributesEvent,
        RoomMetadataEvent,
        AgentStateEvent,
        AgentStatusEvent,
        FloorRequestEvent,
        FloorReleaseEvent,
        TranscriptEvent,
        ChatMessageEvent,
        ConversationItemEvent,
        ToolExecutionEvent,
        HandoffEvent,
        SessionPatchEvent,
        ContextSummaryEvent,
        DataEvent,
        BridgeJoinedEvent,
        BridgeGapEvent,
        BridgeLeftEvent,
        DispatchCreatedEvent,
        RoleClaimEvent,
        RoleReleaseEvent,
        ServerRoomStartedEvent,
        ServerRoomFinishedEvent,
        ServerParticipantJoinedEvent,
        ServerParticipantLeftEvent,
        ServerParticipantConnectionAbortedEvent,
        ServerTrackPublishedEvent,
        ServerTrackUnpublishedEvent,
        ServerEgressStartedEvent,
        ServerEgressUpdatedEvent,
        ServerEgressEndedEvent,
        ServerIngressStartedEvent,
        ServerIngressEndedEvent,
        ServerWebhookEvent,
    )
}

def _body_type(cls: type[_Envelope]) -> type[Body]:
    field_types: dict[str, Any] = {f.name: f.type for f in msgspec.structs.fields(cls)}
    body_type: type[Body] = field_types["body"]
    return body_type


_BODY_OF_EVENT: Final[dict[type[_Envelope], type[Body]]] = {cls: _body_type(cls) for cls in EVENT_TYPES.values()}
_EVENT_FOR_BODY: Final[dict[type[Body], type[_Envelope]]] = {b: e for e, b in _BODY_OF_EVENT.items()}


class _Head(msgspec.Struct, kw_only=True):
    """Just enough of an envelope to keep an event of unknown type."""

    id: str
    room: str
    type: str
    at: datetime | None = None
    observed_at: datetime | None = None
    sender: Sender = UNKNOWN_SENDER


