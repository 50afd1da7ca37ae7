"""``ledger serve``: a live, read-only web view of every room (aiohttp; assets in room_ledger/web/static).

Pages
    ``/``              the rooms: events, last activity, who is present, bridge gaps (refreshed live)
    ``/room?room=R``   one room: live timeline, floor lanes, handoffs with dead air, participants and
                       agent states, the session document and its patches, the conversation; a slider
                       travels to the room's state at any sequence; search within the room
API (JSON; what the pages read)
    ``/api/rooms``                     :func:`room_ledger.rooms.room_rows`
    ``/api/room?room=R[&at=SEQ|TIME]`` the room's view now (or at a point), see :func:`view_json`
    ``/api/events?room=R[&after=SEQ]`` server-sent events: one ``record`` per event, following the log
    ``/api/live?room=R[&after=SEQ]``   the same as a WebSocket of JSON arrays (what the room page reads)
    ``/api/search?room=R&q=TEXT``      the room's events whose content contains TEXT
    ``/metrics``                       Prometheus metrics of this process (room_ledger/metrics.py)

One follower per room (:class:`RoomHub`): a single ordered consumer follows the room's log, folds
it with :class:`web.roomview.RoomCollector` (the HTML report's derivation) and fans the events
out to every browser watching, so a room watched by twenty people costs one consumer. A state at a
point is folded from the log with the same reducers ``ledger replay --at`` uses.

Everything that comes from a room reaches the page as JSON and is put into the document with
``textContent`` (never parsed as HTML); the pages carry a Content-Security-Policy that allows no
inline script and nothing from another origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import ipaddress
import logging
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from aiohttp import web

from room_ledger import events as ev
from room_ledger import metrics
from room_ledger.client import Ledger, Record
from room_ledger.errors import LedgerError, SettingsError, UnknownRoom
from room_ledger.rooms import room_rows
from room_ledger.timeline import ndjson_line
from room_ledger.web.html import floor_svg, speech_svg  # the report's lanes, escaped there
from room_ledger.web.roomview import PageData, RoomCollector, collect, item_text, participant_views
from room_ledger.window import parse_point
from room_ledger.words import event_time, summary

log = logging.getLogger("ledger.serve")

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8790
TOKEN_ENV: Final = "LEDGER_SERVE_TOKEN"
COOKIE: Final = "ledger_serve_token"

#: Events each room keeps ready for a browser that connects (its first screen of the timeline).
RECENT: Final = 2000
#: Events sent to a browser that connects without a position (the latest ones).
FIRST_SCREEN: Final = 300
#: Events queued for one browser before it is dropped as too slow (it reconnects where it was).
MAX_BACKLOG: Final = 20_000
#: A room nobody has watched for this long stops following its log.
IDLE_S: Final = 120.0
#: Comment line sent on a quiet event stream, so dead connections are noticed.
HEARTBEAT_S: Final = 15.0
#: Items of the conversation and session changes sent with a view (the latest ones).
VIEW_ITEMS: Final = 150
SEARCH_LIMIT: Final = 500
#: The room list is read from the log at most this often, however many rooms pages are open.
ROOMS_EVERY_S: Final = 1.0

_STATIC: Final = importlib.resources.files("room_ledger.web") / "static"
_CSP: Final = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_TYPES: Final = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


# --- what a room looks like as JSON ----------------------------------------------------------------


def record_json(record: Record) -> dict[str, Any]:
    """One timeline line: the event in words, with what the page needs to place and colour it."""
    event = record.event
    return {
        "seq": record.seq,
        "time": event_time(record).isoformat(),
        "type": ev.event_type(event),
        "sender": event.sender.identity,
        "kind": event.sender.kind,
        "text": summary(event),
    }


def view_json(page: PageData, *, live: bool) -> dict[str, Any]:
    """What the room page shows: the same derivation as ``ledger replay --html`` (room_ledger/web/roomview.py)."""

    state = page.state
    timeline = page.floor
    index = state.index
    floor = state.floor
    conversation = state.conversation[-VIEW_ITEMS:]
    return {
        "room": page.room,
        "live": live,
        "seq": state.seq,
        "events": index.events,
        "first_seq": index.first_seq,
        "last_seq": index.last_seq,
        "last_activity": index.last_activity.isoformat() if index.last_activity else None,
        "start": timeline.start.isoformat() if timeline.start else None,
        "end": timeline.end.isoformat() if timeline.end else None,
        "floor": {
            "holder": floor.holder, "task": floor.task, "since_seq": floor.since_seq,
            "queue": [{"agent_id": c.agent_id, "task": c.task, "seq": c.seq} for c in floor.queue],
        },
        "floor_svg": floor_svg(timeline),
        "speech_svg": speech_svg(page.speech),
        "speech": [{"speaker": s.speaker, "start": s.start.isoformat(), "end": s.end.isoformat(), "text": s.text}
                   for s in page.speech[-VIEW_ITEMS:]],
        "tenures": [
            {"holder": t.holder, "task": t.task, "start_seq": t.start_seq, "start": t.start_time.isoformat(),
             "end_seq": t.end_seq, "end": t.end_time.isoformat() if t.end_time else None,
             "end_reason": t.end_reason}
            for t in timeline.tenures
        ],
        "handoffs": msgspec.to_builtins([h.to_builtins() for h in page.handoffs]),
        "participants": [p.to_builtins() for p in participant_views(state)],
        "conversation": [
            {"seq": i.seq, "time": i.time.isoformat(), "role": i.role or i.type, "speaker": i.speaker,
             "text": item_text(i)}
            for i in conversation
        ],
        "conversation_total": page.conversation_total,
        "session": msgspec.to_builtins(state.session),
        "session_version": state.session_version,
        "session_changes": [
            {"seq": c.seq, "time": c.time.isoformat(), "sender": c.sender, "patch": msgspec.to_builtins(c.patch),
             "set": msgspec.to_builtins(c.set_values)}
            for c in page.session_changes[-VIEW_ITEMS:]
        ],
        "session_changes_total": page.session_changes_total,
        "summary": None if state.summary is None else {
            "text": state.summary.text, "covers_seq": state.summary.covers_seq, "seq": state.summary.seq},
        "gaps": [
            {"seq": g.seq, "bridge_id": g.bridge_id, "started_at": g.started_at.isoformat(),
             "ended_at": g.ended_at.isoformat(), "reason": g.reason}
            for g in index.gaps
        ],
    }


def _record_bytes(record: Record) -> bytes:
    return msgspec.json.encode(record_json(record))


# --- one follower per room ---------------------------------------------------------------------


@dataclass(eq=False)
class _Subscriber:
    queue: asyncio.Queue[tuple[int, bytes]] = field(default_factory=asyncio.Queue)
    dropped: bool = False


class RoomHub:
    """Follows one room's log once and fans it out; keeps the folded view of the room live."""

    def __init__(self, ledger: Ledger, room: str) -> None:
        self.ledger = ledger
        self.room = room
        self.collector = RoomCollector(room)
        self.recent: deque[tuple[int, bytes]] = deque(maxlen=RECENT)
        self.subscribers: set[_Subscriber] = set()
        self.caught_up = asyncio.Event()
        self.failed: BaseException | None = None
        self.last_used = time.monotonic()
        self._view: tuple[int, bytes] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"serve-follow-{self.room}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    @property
    def seq(self) -> int:
        return self.collector.seq

    async def _run(self) -> None:
        try:
            head = await self.ledger.room_last_seq(self.room)
            if head == 0:
                self.caught_up.set()
            async for record in self.ledger.follow(self.room):
                self.collector.feed(record)
                line = (record.seq, _record_bytes(record))
                self.recent.append(line)
                for sub in list(self.subscribers):
                    if sub.queue.qsize() >= MAX_BACKLOG:
                        # Too slow: it reconnects with Last-Event-ID and reads on from the log.
                        sub.dropped = True
                        self.subscribers.discard(sub)
                        sub.queue.put_nowait((-1, b""))
                    else:
                        sub.queue.put_nowait(line)
                if record.seq >= head:
                    self.caught_up.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a reader that failed: every waiting request hears why
            log.warning("following room failed: %s", exc)
            self.failed = exc
            self.caught_up.set()
            for sub in list(self.subscribers):
                sub.queue.put_nowait((-1, b""))

    async def ready(self, timeout: float = 30.0) -> None:
        self.last_used = time.monotonic()
        try:
            await asyncio.wait_for(self.caught_up.wait(), timeout)
        except TimeoutError:
            raise LedgerError(f"room {self.room!r}: the log did not answer within {timeout:.0f}s; "
                              "`ledger doctor` shows the stream's state") from None
        if self.failed is not None:
            raise LedgerError(f"room {self.room!r} cannot be followed: {self.failed}")

    def view(self) -> bytes:
        """The room's view now as JSON (built once per new sequence, whoever asks)."""
        seq = self.seq
        if self._view is None or self._view[0] != seq:
            page = self.collector.page()
            self._view = (seq, msgspec.json.encode(view_json(page, live=True)))
        return self._view[1]

    def subscribe(self) -> _Subscriber:
        sub = _Subscriber()
        self.subscribers.add(sub)
        self.last_used = time.monotonic()
        return sub

    def unsubscribe(self, sub: _Subscriber) -> None:
        self.subscribers.discard(sub)
        self.last_used = time.monotonic()


class Hubs:
    """The rooms being followed; a room nobody watches stops after :data:`IDLE_S`."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.hubs: dict[str, RoomHub] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._rows: tuple[float, list[Any]] | None = None
        self._rows_task: asyncio.Future[list[Any]] | None = None

    async def room_rows(self) -> list[Any]:
        """:func:`room_ledger.rooms.room_rows`, read at most once per :data:`ROOMS_EVERY_S` whoever asks
        (every open rooms page asks every two seconds; each read looks into every room)."""

        now = time.monotonic()
        if self._rows is None or now - self._rows[0] > ROOMS_EVERY_S:
            if self._rows_task is None or self._rows_task.done():
                self._rows_task = asyncio.ensure_future(room_rows(self.ledger))
            task = self._rows_task
            rows = await asyncio.shield(task)
            self._rows = (time.monotonic(), rows)
        return self._rows[1]

    def get(self, room: str) -> RoomHub:
        hub = self.hubs.get(room)
        if hub is None or hub.failed is not None:
            hub = self.hubs[room] = RoomHub(self.ledger, room)
            hub.start()
        return hub

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap(), name="serve-reaper")

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(IDLE_S / 4)
            now = time.monotonic()
            for room, hub in list(self.hubs.items()):
                if not hub.subscribers and now - hub.last_used > IDLE_S:
                    del self.hubs[room]
                    await hub.close()

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for hub in list(self.hubs.values()):
            await hub.close()
        self.hubs.clear()


# --- handlers ---------------------------------------------------------------------------------

LEDGER: Final = web.AppKey("ledger", Ledger)
HUBS: Final = web.AppKey("hubs", Hubs)


def _room_of(request: web.Request) -> str:
    room = request.query.get("room")
    if not room:
        raise web.HTTPBadRequest(text="missing ?room=<room name>")
    return room


def _json(data: Any, *, status: int = 200) -> web.Response:
    body = data if isinstance(data, bytes) else msgspec.json.encode(data)
    return web.Response(body=body, status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status=status)


async def _page(request: web.Request) -> web.StreamResponse:
    name = {"/": "rooms.html", "/room": "room.html"}[request.path]
    return _static_response(name)


def _static_response(name: str) -> web.Response:
    resource = _STATIC / name
    if "/" in name or not resource.is_file():
        raise web.HTTPNotFound()
    suffix = name[name.rfind("."):]
    return web.Response(body=resource.read_bytes(), content_type=_TYPES[suffix].split(";")[0], charset="utf-8"
                        if "charset" in _TYPES[suffix] else None, headers={"Cache-Control": "no-cache"})


async def _static(request: web.Request) -> web.StreamResponse:
    return _static_response(request.match_info["name"])


async def _rooms(request: web.Request) -> web.StreamResponse:
    rows = await request.app[HUBS].room_rows()
    hubs = request.app[HUBS].hubs
    data = []
    for row in rows:
        item = row.to_builtins()
        hub = hubs.get(row.room)
        item["watchers"] = len(hub.subscribers) if hub is not None else 0
        data.append(item)
    return _json(data)


async def _room(request: web.Request) -> web.StreamResponse:
    room = _room_of(request)
    ledger = request.app[LEDGER]
    at = request.query.get("at")
    if at:
        try:
            point = parse_point(at, "at")
        except SettingsError as exc:
            return _error(400, str(exc))
        try:
            page = await collect(ledger, room, until=point)
        except UnknownRoom as exc:
            return _error(404, str(exc))
        if page.state.seq == 0:
            return _error(404, f"room {room!r} has no events at or before {point.describe()}")
        return _json(view_json(page, live=False))
    try:
        await ledger.require_room(room)
    except UnknownRoom as exc:
        return _error(404, str(exc))
    hub = request.app[HUBS].get(room)
    await hub.ready()
    return _json(hub.view())


async def _search(request: web.Request) -> web.StreamResponse:
    room = _room_of(request)
    query = request.query.get("q", "").strip()
    if not query:
        return _error(400, "missing ?q=<text to find>")
    needle = query.casefold()
    ledger = request.app[LEDGER]
    try:
        await ledger.require_room(room)
    except UnknownRoom as exc:
        return _error(404, str(exc))
    hits: list[dict[str, Any]] = []
    scanned = 0
    more = False
    async for record in ledger.read(room):
        scanned += 1
        line = record_json(record)
        content = ndjson_line(record).decode("utf-8", "replace")
        if needle in line["text"].casefold() or needle in content.casefold():
            if len(hits) >= SEARCH_LIMIT:
                more = True
                break
            hits.append(line)
    return _json({"room": room, "q": query, "hits": hits, "scanned": scanned, "more": more})


#: A batch of the room's events as ``(seq, record JSON)``; empty: nothing for a while (heartbeat).
Batch = list[tuple[int, bytes]]


async def _batches(hub: RoomHub, sub: _Subscriber, after: int | None) -> AsyncIterator[Batch]:
    """What a client has not seen yet: the room's buffer (or the log before it), then live batches.

    Ends when the subscriber was dropped as too slow or the room's reader failed: the client
    reconnects from the last sequence it has.
    """
    backlog = list(hub.recent)
    if after is None:
        backlog = backlog[-FIRST_SCREEN:]
        sent = backlog[0][0] - 1 if backlog else 0
    else:
        sent = after
        first = backlog[0][0] if backlog else hub.seq + 1
        if after + 1 < first:
            older: Batch = []
            async for record in hub.ledger.read(hub.room, after=after, until=first - 1):
                older.append((record.seq, _record_bytes(record)))
                if len(older) >= 1000:
                    yield older
                    older = []
                sent = record.seq
            if older:
                yield older
    chunk = [(seq, data) for seq, data in backlog if seq > sent]
    if chunk:
        yield chunk
        sent = chunk[-1][0]
    while True:
        try:
            seq, data = await asyncio.wait_for(sub.queue.get(), HEARTBEAT_S)
        except TimeoutError:
            yield []
            continue
        if seq < 0:
            return
        batch = [(seq, data)] if seq > sent else []
        sent = max(sent, seq)
        # Whatever else is waiting goes in the same write (a busy room is not one write per event).
        while not sub.queue.empty():
            seq, data = sub.queue.get_nowait()
            if seq < 0:
                break
            if seq > sent:
                batch.append((seq, data))
                sent = seq
        if batch:
            yield batch
        if seq < 0:
            return


def _after(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


async def _events(request: web.Request) -> web.StreamResponse:
    """Server-sent events (for scripts: ``curl -N``; EventSource resumes with Last-Event-ID)."""
    room = _room_of(request)
    after = _after(request.headers.get("Last-Event-ID") or request.query.get("after"))
    hub = request.app[HUBS].get(room)
    await hub.ready()
    sub = hub.subscribe()
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"})
    try:
        await response.prepare(request)
        await response.write(b"retry: 1000\n\n")
        async for batch in _batches(hub, sub, after):
            if not batch:
                await response.write(b": keep-alive\n\n")
                continue
            await response.write(b"".join(b"id: %d\nevent: record\ndata: %s\n\n" % item for item in batch))
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        hub.unsubscribe(sub)
    return response


async def _live(request: web.Request) -> web.StreamResponse:
    """The room page's live timeline: a WebSocket of JSON arrays of records (each batch one message).

    A WebSocket rather than server-sent events: browsers open at most six HTTP/1.1 connections
    per server, and an event stream holds one for good, so a seventh tab of the view would hang.
    """
    room = _room_of(request)
    after = _after(request.query.get("after"))
    hub = request.app[HUBS].get(room)
    await hub.ready()
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, compress=False)
    await ws.prepare(request)
    sub = hub.subscribe()

    async def send() -> None:
        async for batch in _batches(hub, sub, after):
            if batch:
                await ws.send_str((b"[" + b",".join(data for _, data in batch) + b"]").decode())
        await ws.close()

    sender = asyncio.create_task(send())
    try:
        async for _ in ws:  # the page sends nothing; this ends when it goes away
            pass
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionResetError, Exception):
            await sender
        hub.unsubscribe(sub)
    return ws


async def _metrics(request: web.Request) -> web.StreamResponse:

    hubs = request.app[HUBS].hubs
    metrics.SERVE_ROOMS.set(len(hubs))
    metrics.SERVE_CLIENTS.set(sum(len(h.subscribers) for h in hubs.values()))
    body, content_type = metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


# --- authentication ---------------------------------------------------------------------------


def _auth_middleware(token: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    expected = token.encode()

    def given(request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            return header[7:].strip()
        return request.query.get("token") or request.cookies.get(COOKIE)

    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        offered = given(request)
        if offered is None or not hmac.compare_digest(offered.encode(), expected):
            return web.Response(
                status=401, headers={"WWW-Authenticate": 'Bearer realm="ledger serve"'},
                text="401: this ledger serve needs its token (ledger serve --token / LEDGER_SERVE_TOKEN): send "
                     "'Authorization: Bearer <token>', or open the page once as /?token=<token>\n",
            )
        if "token" in request.query and request.method == "GET" and not request.path.startswith("/api/"):
            # Opened with ?token=: remember it in a cookie (the event stream cannot send headers) and
            # drop it from the address bar.
            query = {k: v for k, v in request.query.items() if k != "token"}
            response = web.HTTPFound(request.rel_url.with_query(query))
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")
            raise response
        return await handler(request)

    return check


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException:
        raise
    except LedgerError as exc:
        return _error(503, str(exc))
    if request.path in ("/", "/room") or request.path.startswith("/static/"):
        response.headers["Content-Security-Policy"] = _CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
    return response


def make_app(ledger: Ledger, *, token: str | None = None) -> web.Application:
    """The web view over a connected ledger (the caller closes the ledger)."""
    middlewares: list[Any] = [_errors]
    if token:
        middlewares.insert(0, _auth_middleware(token))
    app = web.Application(middlewares=middlewares)
    app[LEDGER] = ledger
    hubs = Hubs(ledger)
    app[HUBS] = hubs

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        hubs.start()
        yield
        await hubs.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/", _page)
    app.router.add_get("/room", _page)
    app.router.add_get("/static/{name}", _static)
    app.router.add_get("/api/rooms", _rooms)
    app.router.add_get("/api/room", _room)
    app.router.add_get("/api/events", _events)
    app.router.add_get("/api/live", _live)
    app.router.add_get("/api/search", _search)
    app.router.add_get("/metrics", _metrics)
    return app


@dataclass(frozen=True)
class Served:
    url: str
    host: str
    port: int
    token: bool


async def start(ledger: Ledger, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                token: str | None = None) -> tuple[web.AppRunner, Served]:
    """Start serving (port 0: a free one); returns the runner (``await runner.cleanup()`` stops it)."""
    runner = web.AppRunner(make_app(ledger, token=token), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise LedgerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port "
                       "(0: any free one)") from exc
    bound = runner.addresses[0] if runner.addresses else (host, port)
    shown = f"[{bound[0]}]" if ":" in str(bound[0]) else str(bound[0])
    return runner, Served(url=f"http://{shown}:{bound[1]}/", host=str(bound[0]), port=int(bound[1]),
                          token=bool(token))


def open_to_others(host: str, token: str | None) -> bool:
    """True when the view listens beyond this machine with no token: anyone reaching it reads every room."""
    if token:
        return False
    try:
        return not ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host != "localhost"


async def serve(settings: Any, *, host: str, port: int, token: str | None, as_json: bool) -> None:
    """``ledger serve``: run until Ctrl-C."""

    async with Ledger(settings, name="ledger-serve") as ledger:
        runner, served = await start(ledger, host=host, port=port, token=token)
        if open_to_others(host, token):
            print(f"warning: ledger serve listens on {host} with no token: anyone who can reach it "
                  "reads every room; set --token (or LEDGER_SERVE_TOKEN)", file=sys.stderr, flush=True)
        try:
            if as_json:
                print(msgspec.json.encode({"event": "serving", "url": served.url, "host": served.host,
                                           "port": served.port, "token": served.token}).decode(), flush=True)
            else:
                print(f"ledger serve: {served.url} (read-only"
                      + (", token required" if served.token else "") + "); Ctrl-C stops", flush=True)
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "TOKEN_ENV", "RoomHub", "make_app", "serve", "start", "view_json"]
