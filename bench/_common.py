"""Shared bench plumbing: servers in a scratch home (or the configured ones) and a private stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NatsClient

from room_ledger import embedded
from room_ledger.settings import Settings


@contextlib.contextmanager
def bench_settings(keep_home: str | None = None) -> Iterator[Settings]:
    """Settings from the environment; embedded servers in a scratch home when none are configured."""
    base = Settings.from_env()
    home = Path(keep_home) if keep_home else Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    started: list[str] = []
    nats_urls = base.nats_urls
    db_url = base.database_url
    if nats_urls is None:
        nats_urls = (embedded.ensure_nats(home, sync_always=False).url,)
        started.append("nats")
    if db_url is None:
        db_url = embedded.ensure_postgres(home).url
        started.append("postgres")
    tag = uuid.uuid4().hex[:8]
    try:
        yield base.replace(nats_urls=nats_urls, database_url=db_url, home=home, stream=f"BENCH_{tag}",
                           subject_prefix=f"bench{tag}")
    finally:
        if not keep_home:
            if "postgres" in started:
                embedded.stop_postgres(home)
            if "nats" in started:
                embedded.stop_nats(home)
            # A full hydrate run leaves gigabytes of log and tables behind.
            shutil.rmtree(home, ignore_errors=True)


@contextlib.asynccontextmanager
async def raw_nats(settings: Settings) -> AsyncIterator[NatsClient]:
    """A plain nats-py connection to the ledger's servers: the baseline a bench compares the
    ledger with (straight publishes, nats-py's own Object Store), never the ledger's own."""
    nc = await nats.connect(servers=list(settings.nats_urls or ()))
    try:
        yield nc
    finally:
        await nc.close()


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def print_json(*, figures: Any, baselines: Any, ratios: Any, targets: Any, met: bool | dict[str, bool],
               **extra: Any) -> None:
    """The bench's last line: ``{"figures", "baselines", "ratios", "targets", "met": true|false, ...}``.

    ``met`` is one verdict (every target met); given per target, the detail goes on as
    ``met_by_target`` (which ``bench/run`` shows row by row)."""
    line: dict[str, Any] = {"figures": figures, "baselines": baselines, "ratios": ratios, "targets": targets}
    if isinstance(met, dict):
        line["met"] = bool(met) and all(bool(v) for v in met.values())
        line["met_by_target"] = {k: bool(v) for k, v in met.items()}
    else:
        line["met"] = bool(met)
    print(json.dumps({**line, **extra}, sort_keys=False))


def run_with_livekit(script: str, work: Coroutine[Any, Any, int]) -> int:
    """Run a LiveKit bench's ``work``: inside the tests' private network namespace (re-running
    ``script`` there), unless ``LIVEKIT_URL`` names a server to use instead.

    libwebrtc gathers no candidate on loopback, so a local livekit-server needs the namespace's
    non-loopback address. SIGTERM (bench/run's timeout) cancels ``work``, so its servers and
    subprocesses are stopped.
    """
    from tests.livekit import netns

    name = Path(script).stem
    if not os.environ.get("LIVEKIT_URL") and not netns.inside():
        work.close()
        try:
            argv = netns.command([sys.executable, str(Path(script).resolve()), *sys.argv[1:]])
        except RuntimeError as exc:
            print(f"bench/{name}: needs a private network namespace for livekit-server ({exc}); "
                  f"or set LIVEKIT_URL/LIVEKIT_API_KEY/LIVEKIT_API_SECRET", file=sys.stderr)
            return 1
        inner = subprocess.Popen(argv, env={**os.environ, netns.INSIDE_ENV: "1"})
        # unshare and sh exec the inner run: it is this pid, and cleans up on SIGTERM
        signal.signal(signal.SIGTERM, lambda *_: inner.terminate())
        return inner.wait()

    async def cancelled_on_sigterm() -> int:
        task = asyncio.ensure_future(work)
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return int(await task)

    return asyncio.run(cancelled_on_sigterm())
