"""Headless Chromium driven over the DevTools protocol (a websocket, with aiohttp): no extra package.

``async with Browser.launch() as browser: page = await browser.page()`` then ``await
page.goto(url)``, ``await page.evaluate(js)`` and ``await page.wait_for(js, timeout)`` (polls a
JavaScript expression until it is truthy: a condition, never a sleep).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-extensions", "--no-first-run", "--mute-audio", "--disable-dev-shm-usage",
         # Every page is watched as if it were in front (a background tab would be throttled).
         "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
         "--disable-backgrounding-occluded-windows"]


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (apt-get install -y chromium)")


class PageError(AssertionError):
    pass


class Page:
    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._session = session
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self.console: list[str] = []
        self.exceptions: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                future = self._waiting.pop(data["id"], None)
                if future is not None and not future.done():
                    if "error" in data:
                        future.set_exception(PageError(f"DevTools: {data['error']}"))
                    else:
                        future.set_result(data.get("result", {}))
            elif data.get("method") == "Runtime.consoleAPICalled":
                args = data["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
            elif data.get("method") == "Runtime.exceptionThrown":
                self.exceptions.append(json.dumps(data["params"]["exceptionDetails"])[:500])
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(PageError("the browser closed the DevTools connection"))

    async def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30) -> Any:
        ident = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        await self._ws.send_str(json.dumps({"id": ident, "method": method, "params": params or {}}))
        return await asyncio.wait_for(future, timeout)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                      "awaitPromise": True})
        if "exceptionDetails" in result:
            raise PageError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0, *, every: float = 0.02) -> Any:
        """The expression's value once truthy; fails with the last value after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        value: Any = None
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise PageError(f"{expression!r} still {value!r} after {timeout}s; page errors: {self.exceptions}")
            await asyncio.sleep(every)

    async def goto(self, url: str, *, timeout: float = 30.0) -> int | None:
        """Navigate and wait for the document to load; returns the HTTP status of the document."""
        await self.evaluate("window.__ledgerNav = 1")
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise PageError(f"navigating to {url} failed: {result['errorText']}")
        await self.wait_for("document.readyState === 'complete' && window.__ledgerNav === undefined", timeout)
        status = await self.evaluate(
            "(performance.getEntriesByType('navigation')[0] || {}).responseStatus || null")
        return int(status) if status else None

    async def text(self, selector: str) -> str:
        return str(await self.evaluate(f"(document.querySelector({json.dumps(selector)}) || {{}}).textContent || ''"))

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


class Browser:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, profile: str,
                 session: aiohttp.ClientSession) -> None:
        self.proc = proc
        self.port = port
        self.profile = profile
        self.session = session

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(cls) -> AsyncIterator[Browser]:
        profile = tempfile.mkdtemp(prefix="ledger-chromium-")
        proc = await asyncio.create_subprocess_exec(
            chromium_path(), *FLAGS, "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
            f"--user-data-dir={profile}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        session = aiohttp.ClientSession()
        browser: Browser | None = None
        try:
            assert proc.stderr is not None
            seen: list[str] = []

            async def listening() -> int:
                assert proc.stderr is not None
                while True:
                    line = (await proc.stderr.readline()).decode(errors="replace")
                    if not line:
                        raise PageError(f"chromium exited before listening: {''.join(seen)[-2000:]}")
                    seen.append(line)
                    found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
                    if found:
                        return int(found.group(1))

            port = await asyncio.wait_for(listening(), 60)
            browser = cls(proc, port, profile, session)
            # Keep reading stderr so chromium never blocks on a full pipe.
            drain = asyncio.create_task(_drain(proc))
            try:
                yield browser
            finally:
                drain.cancel()
        finally:
            await session.close()
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            shutil.rmtree(profile, ignore_errors=True)

    async def page(self) -> Page:
        async with self.session.put(f"http://127.0.0.1:{self.port}/json/new?about:blank") as response:
            target = await response.json()
        ws = await self.session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        page = Page(self.session, ws)
        await page.send("Runtime.enable")
        await page.send("Page.enable")
        return page


async def _drain(proc: asyncio.subprocess.Process) -> None:
    assert proc.stderr is not None
    while await proc.stderr.readline():
        pass
