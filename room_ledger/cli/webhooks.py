"""``ledger webhooks``: receive livekit-server's webhooks into the room logs (see :mod:`bridge.webhooks`)."""

from __future__ import annotations

import asyncio
import contextlib
import signal

from aiohttp import web

from room_ledger.bridge.webhooks import Recorded, WebhookRecorder, webhook_app
from room_ledger.cli.common import CliError, console, write_json
from room_ledger.client import Ledger
from room_ledger.settings import Settings


def _keys(settings: Settings) -> tuple[str, str]:
    if not settings.livekit_api_key or not settings.livekit_api_secret:
        raise CliError("set LIVEKIT_API_KEY and LIVEKIT_API_SECRET: webhooks are verified with the key the "
                       "server signs them with (its webhook.api_key)")
    return settings.livekit_api_key, settings.livekit_api_secret


async def webhooks(settings: Settings, *, host: str, port: int, as_json: bool) -> None:

    api_key, api_secret = _keys(settings)
    async with Ledger(settings, name="ledger-webhooks") as ledger:
        recorder = WebhookRecorder(ledger, api_key, api_secret)

        def printed(recorded: Recorded) -> None:
            if as_json:
                write_json({"type": recorded.type, "room": recorded.room, "seq": recorded.position.seq,
                            "duplicate": recorded.position.duplicate})
            else:
                again = " (again: stored once)" if recorded.position.duplicate else ""
                console.print(f"{recorded.type:<38} {recorded.room}  seq {recorded.position.seq}{again}")

        runner = web.AppRunner(webhook_app(recorder, on_recorded=printed), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port") from exc
        bound = runner.addresses[0] if runner.addresses else (host, port)
        url = f"http://{bound[0]}:{bound[1]}/"
        if as_json:
            write_json({"listening": url, "stream": settings.stream})
        else:
            console.print(f"ledger webhooks: listening on {url} (stream {settings.stream}); point livekit-server's "
                          f"webhook.urls here, signed with key {api_key!r}. Ctrl-C ends.")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
        stats = recorder.stats.to_builtins()
        if as_json:
            write_json({"stopped": True, **stats})
        else:
            console.print(f"stored {stats['stored']}, again {stats['duplicates']}, refused {stats['rejected']}, "
                          f"without a room {stats['unroutable']}, failed {stats['failed']}")
