"""The server's own view of every room: livekit-server's webhooks, verified, appended to the room's log.

The bridge records what it sees once it is in a room; a room it never reached, or a participant
who came and went during a gap, leaves no trace there. livekit-server reports every room
(started/finished), participant (joined/left/connection aborted), track (published/unpublished),
egress and ingress to its webhook URLs. :class:`WebhookRecorder` checks each request's signature
(``livekit.api.WebhookReceiver``: a JWT signed with the API secret carrying the body's sha256;
the server's tokens are valid for 5 minutes) and appends the event to the room's log as
``server.<event>`` (see :class:`room_ledger.events.ServerEvent`), beside the bridge's view.

* The event id derives from the webhook's own ``id``: a webhook the server delivers again (it
  retries when an answer is not 2xx) is stored once (``Nats-Msg-Id``, within the stream's
  duplicate window).
* A request whose signature does not verify (unsigned, another secret, a body changed after
  signing, an expired token) is refused (401) and nothing is stored.
* The log failing to take the event is a 503: the server tries again.

::

    recorder = WebhookRecorder(ledger, api_key, api_secret)
    app = webhook_app(recorder)          # aiohttp; POST on any path
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import msgspec

from room_ledger import events as ev
from room_ledger.errors import LedgerError

if TYPE_CHECKING:
    from aiohttp import web
    from livekit.protocol.webhook import WebhookEvent

    from room_ledger.client import Ledger, Position

log = logging.getLogger("bridge.webhooks")

#: Webhook event name -> the body of its ``server.*`` type; others are ``server.webhook``.
WEBHOOK_BODIES: Final[dict[str, type[ev.ServerEvent]]] = {
    "room_started": ev.ServerRoomStarted,
    "room_finished": ev.ServerRoomFinished,
    "participant_joined": ev.ServerParticipantJoined,
    "participant_left": ev.ServerParticipantLeft,
    "participant_connection_aborted": ev.ServerParticipantConnectionAborted,
    "track_published": ev.ServerTrackPublished,
    "track_unpublished": ev.ServerTrackUnpublished,
    "egress_started": ev.ServerEgressStarted,
    "egress_updated": ev.ServerEgressUpdated,
    "egress_ended": ev.ServerEgressEnded,
    "ingress_started": ev.ServerIngressStarted,
    "ingress_ended": ev.ServerIngressEnded,
}
#: ``ParticipantInfo.Kind`` (livekit_models.proto) -> the envelope's sender kind.
_KINDS: Final[dict[int, ev.SenderKind]] = {0: "standard", 1: "ingress", 2: "egress", 3: "sip", 4: "agent"}
#: What a webhook body may weigh (the server's are a few KiB; an egress with many files more).
MAX_WEBHOOK_BYTES: Final = 1024 * 1024


class WebhookRejected(LedgerError):
    """The request is not a webhook of this LiveKit deployment (answered 401, nothing stored)."""


class WebhookUnroutable(LedgerError):
    """A verified webhook that names no room (answered 200 so the server does not retry; not stored)."""


@dataclass(slots=True)
class WebhookStats:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    unroutable: int = 0
    failed: int = 0
    by_event: dict[str, int] = field(default_factory=dict)

    def to_builtins(self) -> dict[str, Any]:
        return {"received": self.received, "stored": self.stored, "duplicates": self.duplicates,
                "rejected": self.rejected, "unroutable": self.unroutable, "failed": self.failed,
                "by_event": dict(self.by_event)}


@dataclass(frozen=True, slots=True)
class Recorded:
    """A webhook as stored: its type, room and place in the log (``position.duplicate``: a redelivery)."""

    type: str
    room: str
    position: Position


def webhook_event_id(webhook_id: str, body: bytes) -> str:
    """The log event id of a webhook: from its own id (from the body's hash if it has none)."""
    if webhook_id:
        return ev.derived_event_id("livekit.webhook", webhook_id)
    return ev.derived_event_id("livekit.webhook.sha256", hashlib.sha256(body).hexdigest())


def _room_of(event: WebhookEvent) -> str:
    if event.HasField("room") and event.room.name:
        return str(event.room.name)
    if event.HasField("egress_info") and event.egress_info.room_name:
        return str(event.egress_info.room_name)
    if event.HasField("ingress_info") and event.ingress_info.room_name:
        return str(event.ingress_info.room_name)
    return ""


def to_event(webhook: WebhookEvent, body: bytes) -> ev.KnownEvent:
    """The ``server.*`` event of a verified webhook (``body``: its bytes as received)."""
    room = _room_of(webhook)
    if not room:
        raise WebhookUnroutable(f"webhook {webhook.event!r} ({webhook.id}) names no room")
    participant = webhook.participant if webhook.HasField("participant") else None
    body_type = WEBHOOK_BODIES.get(webhook.event, ev.ServerWebhook)
    try:
        as_sent = msgspec.json.decode(body)
    except msgspec.DecodeError:
        as_sent = {}
    created = datetime.fromtimestamp(webhook.created_at, UTC) if webhook.created_at else None
    server_body = body_type(
        event=str(webhook.event),
        webhook_id=str(webhook.id),
        created_at=int(webhook.created_at),
        room_sid=str(webhook.room.sid) if webhook.HasField("room") else "",
        identity=str(participant.identity) if participant is not None else "",
        participant_sid=str(participant.sid) if participant is not None else "",
        kind=_KINDS.get(int(participant.kind), "unknown") if participant is not None else "unknown",
        track_sid=str(webhook.track.sid) if webhook.HasField("track") else "",
        egress_id=str(webhook.egress_info.egress_id) if webhook.HasField("egress_info") else "",
        ingress_id=str(webhook.ingress_info.ingress_id) if webhook.HasField("ingress_info") else "",
        webhook=as_sent if isinstance(as_sent, dict) else {},
    )
    return ev.make_event(room, server_body, id=webhook_event_id(str(webhook.id), body), at=created)


class WebhookRecorder:
    """Verifies LiveKit webhooks and appends them to the log."""

    def __init__(self, ledger: Ledger, api_key: str, api_secret: str) -> None:
        from livekit import api  # noqa: PLC0415 - livekit-api and aiohttp load only where webhooks are received

        self.ledger = ledger
        self.stats = WebhookStats()
        self._receiver = api.WebhookReceiver(api.TokenVerifier(api_key, api_secret))

    def verify(self, body: bytes, authorization: str) -> WebhookEvent:
        """The webhook, if ``authorization`` signs ``body`` with this deployment's key; else :class:`WebhookRejected`."""
        token = authorization.strip()
        if token.lower().startswith("bearer "):
            token = token[7:].strip()
        if not token:
            raise WebhookRejected("no Authorization header: LiveKit signs every webhook; is this a LiveKit server?")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WebhookRejected("the body is not UTF-8 JSON") from exc
        try:
            return self._receiver.receive(text, token)
        except Exception as exc:  # jwt's errors, "hash mismatch", protobuf's ParseError: all mean "not ours"
            raise WebhookRejected(f"signature does not verify: {type(exc).__name__}: {exc}") from exc

    async def record(self, body: bytes, authorization: str) -> Recorded:
        """Verify and append one webhook; returns where it is in the log (``duplicate`` for a redelivery)."""
        self.stats.received += 1
        try:
            webhook = self.verify(body, authorization)
        except WebhookRejected:
            self.stats.rejected += 1
            raise
        try:
            event = to_event(webhook, body)
        except WebhookUnroutable:
            self.stats.unroutable += 1
            raise
        try:
            position = await self.ledger.append(event)
        except Exception:
            self.stats.failed += 1
            raise
        name = ev.event_type(event)
        self.stats.by_event[name] = self.stats.by_event.get(name, 0) + 1
        if position.duplicate:
            self.stats.duplicates += 1
        else:
            self.stats.stored += 1
        return Recorded(name, event.room, position)


def sign(body: bytes, api_key: str, api_secret: str, *, ttl_s: float = 300.0) -> str:
    """An Authorization value for ``body`` as livekit-server makes it (for tests and tools)."""

    from livekit import api  # noqa: PLC0415 - livekit-api and aiohttp load only where webhooks are received

    digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
    token = api.AccessToken(api_key, api_secret).with_ttl(dt.timedelta(seconds=ttl_s)).with_sha256(digest)
    return token.to_jwt()


def webhook_app(
    recorder: WebhookRecorder, *, on_recorded: Callable[[Recorded], None] | None = None,
) -> web.Application:
    """An aiohttp application: POST (any path) records a webhook; GET /healthz answers with the counts.

    ``on_recorded`` is called after each stored webhook (the CLI prints a line).
    """
    from aiohttp import web  # noqa: PLC0415 - livekit-api and aiohttp load only where webhooks are received

    async def receive(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_WEBHOOK_BYTES:
            return web.json_response({"error": f"body over {MAX_WEBHOOK_BYTES} bytes"}, status=413)
        body = await request.read()
        try:
            recorded = await recorder.record(body, request.headers.get("Authorization", ""))
        except WebhookRejected as exc:
            log.warning("webhook refused: %s", exc)
            return web.json_response({"error": str(exc)}, status=401)
        except WebhookUnroutable as exc:
            return web.json_response({"stored": False, "reason": str(exc)})
        except LedgerError as exc:
            # The server retries a non-2xx answer: the log may take it then.
            log.warning("webhook not stored: %s", exc)
            return web.json_response({"error": f"the log did not take the event: {exc}"}, status=503)
        if on_recorded is not None:
            on_recorded(recorded)
        position = recorded.position
        return web.json_response({"stored": True, "seq": position.seq, "duplicate": position.duplicate})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, **recorder.stats.to_builtins()})

    app = web.Application(client_max_size=MAX_WEBHOOK_BYTES)
    app.router.add_get("/healthz", health)
    app.router.add_post("/{tail:.*}", receive)
    return app
