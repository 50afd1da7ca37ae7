"""``ledger serve``: a live, read-only web view of every room (aiohttp; assets in room_ledger/web/static).

Pages
    ``/``              the rooms: events, last activity, who is present, bridge gaps (refreshed live)
    ``/room?room=R``   one room: live timeline, floor lanes, handoffs with dead air, participants and
                       agent states, the session document and its patches, the conversation; a slider
                       travels to the room's state at any sequence; search within the room
API (JSON; what the pages read)
    ``/api/rooms``                     :func:`room_ledger.room_list.room_rows`
    ``/api/room?room=R[&at=SEQ|TIME]`` the room's view now (or at a point), see :func:`room_ledger.web.room_json.view_json`
    ``/api/events?room=R[&after=SEQ]`` server-sent events: one ``record`` per event, following the log
    ``/api/live?room=R[&after=SEQ]``   the same as a WebSocket of JSON arrays (what the room page reads)
    ``/api/search?room=R&q=TEXT``      the room's events whose content contains TEXT
    ``/metrics``                       Prometheus metrics of this process (room_ledger/metrics.py)

Here: the routes, the app and its start. One follower per watched room fans its log out to every
browser (:mod:`room_ledger.web.hub`); a request carries a token when one is set
(:mod:`room_ledger.web.auth`). A state at a point is folded from the log with the same reducers
``ledger replay --at`` uses.

Everything that comes from a room reaches the page as JSON and is put into the document with
``textContent`` (never parsed as HTML); the pages carry a Content-Security-Policy that allows no
inline script and nothing from another origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from aiohttp import web

from room_ledger import metrics
from room_ledger.client import Ledger
from room_ledger.errors import LedgerError, SettingsError, UnknownRoom
from room_ledger.timeline import ndjson_line
from room_ledger.web.auth import auth_middleware, open_to_others
from room_ledger.web.hub import HEARTBEAT_S, Hubs, batches
from room_ledger.web.room_json import record_json, view_json
from room_ledger.web.roomview import collect
from room_ledger.window import parse_point

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8790
SEARCH_LIMIT: Final = 500

_STATIC: Final = importlib.resources.files("room_ledger.web") / "static"
_CSP: Final = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_TYPES: Final = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


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
        async for batch in batches(hub, sub, after):
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
        async for batch in batches(hub, sub, after):
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
        middlewares.insert(0, auth_middleware(token))
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


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "make_app", "serve", "start"]
