"""Who may read the view: a bearer token (a header, or ``?token=`` once and then a cookie), and
whether a view without one is open to other machines."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

TOKEN_ENV: Final = "LEDGER_SERVE_TOKEN"
COOKIE: Final = "ledger_serve_token"


def auth_middleware(token: str) -> Callable[..., Awaitable[web.StreamResponse]]:
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


def open_to_others(host: str, token: str | None) -> bool:
    """True when the view listens beyond this machine with no token: anyone reaching it reads every room."""
    if token:
        return False
    try:
        return not ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host != "localhost"
