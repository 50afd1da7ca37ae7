"""``ledger serve`` under load: N live timelines of one room at R events/s, beside a direct follower.

    python bench/serve.py [--clients 20] [--browsers 1] [--rate 1000] [--seconds 10] [--runs 3]

Starts ``ledger serve`` as its own process (on the embedded nats-server of a scratch home unless
LEDGER_NATS_URL is set), opens ``--clients`` server-sent-event streams of one room (what the room
page's EventSource used to read; scripts read it with curl) and ``--browsers`` real room pages in
headless Chromium (each following over its WebSocket, one browser: several tabs), then appends
``--rate`` events/s for ``--seconds`` seconds. For every event it takes the time from its
append call to its arrival at each client (for a browser: its arrival in the page's script, and
its row appearing in the page's timeline, seen by a MutationObserver; a page that falls behind
draws only the latest 500 rows of a batch). The baseline, in the same run, is a
``Ledger.follow`` of the room in this process: the log's own delivery, with no web server between.
The stream clients run in a process of their own, so that reading 20 streams does not slow the
producer.

Targets (issue 16.4): every client receives every event (delivered = 1.0, in order); p99 from
acknowledgement to client <= 1 s ("a new event appears within a second"), for streams and pages.
Figures are medians over ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp

from bench._common import median, percentile, print_json, print_table
from room_ledger import embedded
from room_ledger import events as ev
from room_ledger.client import Ledger
from room_ledger.settings import Settings

TARGET_P99_S = 1.0
ROOT = Path(__file__).resolve().parents[1]


class Arrivals:
    """seq -> arrival time (time.time()) at one client, and whether they came in order."""

    def __init__(self) -> None:
        self.at: dict[int, float] = {}
        self.in_order = True
        self._last = 0
        self.wanted = 0
        self.got_wanted = asyncio.Event()

    def note(self, seq: int, when: float) -> None:
        if seq <= self._last:
            self.in_order = False
        self._last = seq
        self.at.setdefault(seq, when)
        if self.wanted and seq >= self.wanted:
            self.got_wanted.set()


_ID = re.compile(rb"^id: (\d+)$", re.MULTILINE)


async def sse_client(http: aiohttp.ClientSession, url: str, arrivals: Arrivals, ready: asyncio.Event,
                     expect: int) -> None:
    """Read one event stream until ``expect`` events arrived (chunks, not lines: 20 clients at 1,000/s)."""
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as response:
        assert response.status == 200, await response.text()
        ready.set()
        tail = b""
        async for chunk in response.content.iter_any():
            now = time.time()
            data = tail + chunk
            cut = data.rfind(b"\n")
            tail = data[cut + 1:]
            for match in _ID.finditer(data, 0, cut + 1):
                arrivals.note(int(match.group(1)), now)
            if len(arrivals.at) >= expect:
                return


async def clients_main(url: str, clients: int, expect: int, timeout: float) -> None:
    """The event-stream clients, in a process of their own (so they do not slow the producer):
    prints ``ready`` once all are attached, then one JSON line of arrivals when done."""
    streams = [Arrivals() for _ in range(clients)]
    readies = [asyncio.Event() for _ in range(clients)]
    async with aiohttp.ClientSession() as http:
        tasks = [asyncio.create_task(sse_client(http, url, a, r, expect)) for a, r in zip(streams, readies, strict=True)]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 60)
        print("ready", flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks), timeout)
        for task in tasks:
            task.cancel()
    print(json.dumps([{"at": a.at, "in_order": a.in_order} for a in streams]), flush=True)


async def follower(ledger: Ledger, room: str, after: int, arrivals: Arrivals, ready: asyncio.Event) -> None:
    ready.set()
    async for record in ledger.follow(room, after=after):
        arrivals.note(record.seq, time.time())


_OBSERVER = """
window.__ledgerArrivals = [];
window.__arrivals = [];
new MutationObserver((changes) => {
  const now = Date.now() / 1000;
  for (const change of changes) for (const node of change.addedNodes) {
    if (node.dataset && node.dataset.seq) window.__arrivals.push([+node.dataset.seq, now]);
  }
}).observe(document.getElementById('timeline'), { childList: true });
true
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_once(args: argparse.Namespace, settings: Settings, url: str, browser: Any,
                   server_pid: int) -> dict[str, Any]:
    room = f"bench-serve-{uuid.uuid4().hex[:8]}"
    sender = ev.Sender("agent-bench", "agent")
    async with Ledger(settings) as ledger:
        first = await ledger.append(ev.make_event(room, ev.ParticipantJoined(identity="agent-bench", kind="agent"),
                                                  sender=sender))
        total = int(args.rate * args.seconds)
        direct = Arrivals()
        pages: list[Any] = []
        events_url = f"{url}api/events?{urlencode({'room': room, 'after': first.seq})}"
        clients = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--_clients", events_url, str(args.clients), str(total),
            str(args.seconds + 60), stdout=subprocess.PIPE)
        assert clients.stdout is not None
        ready = asyncio.Event()
        follow_task = asyncio.create_task(follower(ledger, room, first.seq, direct, ready))
        for _ in range(args.browsers):
            page = await browser.page()
            await page.goto(f"{url}room?{urlencode({'room': room})}")
            await page.wait_for("document.querySelectorAll('#timeline li').length >= 1", 30)
            await page.evaluate(_OBSERVER)
            pages.append(page)
        # Each stream answers with its headers once it is attached to the room's follower.
        assert (await asyncio.wait_for(clients.stdout.readline(), 90)).strip() == b"ready"
        await ready.wait()
        acked: dict[int, float] = {}
        batch = max(1, args.rate // 50)  # 50 appends a second
        cpu_before = cpu_seconds(server_pid)
        started = time.perf_counter()
        sent = 0
        while sent < total:
            due = started + sent / args.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            n = min(batch, total - sent)
            events = [ev.make_event(room, ev.Transcript(speaker="agent-bench", text=f"line {sent + i} " + "x" * 60,
                                                        segment_id=f"s{sent + i}"), sender=sender)
                      for i in range(n)]
            at = time.time()  # from the append call: what "appears within a second" counts
            positions = await ledger.append_many(events)
            for position in positions:
                acked[position.seq] = at
            sent += n
        produce_s = time.perf_counter() - started
        last = max(acked)
        out = await asyncio.wait_for(clients.stdout.read(), args.seconds + 90)
        # The server's CPU for producing-time worth of events, delivered to every stream.
        server_cpu = cpu_seconds(server_pid) - cpu_before
        await clients.wait()
        streams = []
        for client in json.loads(out.decode().strip().splitlines()[-1]):
            got = Arrivals()
            got.at = {int(k): float(v) for k, v in client["at"].items()}
            got.in_order = bool(client["in_order"])
            streams.append(got)
        direct.wanted = last
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(direct.got_wanted.wait(), 30)
        page_arrivals: list[Arrivals] = []
        page_rows: list[Arrivals] = []
        for page in pages:
            with contextlib.suppress(Exception):
                await page.wait_for(f"window.__ledgerArrivals.some(a => a[0] === {last})", 30)
            got = Arrivals()
            for seq, when in await page.evaluate("window.__ledgerArrivals"):
                got.note(int(seq), float(when))
            page_arrivals.append(got)
            # Rows drawn: a page that falls behind draws only the latest 500 of a batch.
            rows = Arrivals()
            for seq, when in await page.evaluate("window.__arrivals"):
                rows.note(int(seq), float(when))
            page_rows.append(rows)
            await page.close()
        follow_task.cancel()
        await asyncio.gather(follow_task, return_exceptions=True)

    def latencies(group: list[Arrivals]) -> list[float]:
        return [max(0.0, a.at[seq] - t) for a in group for seq, t in acked.items() if seq in a.at]

    def delivered(group: list[Arrivals]) -> float:
        return min((sum(1 for seq in acked if seq in a.at) / len(acked)) for a in group) if group else 1.0

    stream_lat = latencies(streams)
    direct_lat = latencies([direct])
    page_lat = latencies(page_arrivals)
    row_lat = latencies(page_rows)
    return {
        "rate": total / produce_s,
        "server_cpu": server_cpu / produce_s,
        "streams_delivered": delivered(streams),
        "streams_in_order": all(a.in_order for a in streams),
        "streams_p50_s": percentile(stream_lat, 50) if stream_lat else None,
        "streams_p99_s": percentile(stream_lat, 99) if stream_lat else None,
        "direct_delivered": delivered([direct]),
        "direct_p50_s": percentile(direct_lat, 50) if direct_lat else None,
        "direct_p99_s": percentile(direct_lat, 99) if direct_lat else None,
        "pages_delivered": delivered(page_arrivals),
        "pages_p50_s": percentile(page_lat, 50) if page_lat else None,
        "pages_p99_s": percentile(page_lat, 99) if page_lat else None,
        "rows_p50_s": percentile(row_lat, 50) if row_lat else None,
        "rows_p99_s": percentile(row_lat, 99) if row_lat else None,
    }


@contextlib.asynccontextmanager
async def served(settings: Settings) -> Any:
    env = {**os.environ, "LEDGER_NATS_URL": ",".join(settings.nats_urls or ()), "LEDGER_HOME": str(settings.home),
           "LEDGER_STREAM": settings.stream, "LEDGER_SUBJECT_PREFIX": settings.subject_prefix}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "room_ledger.cli.main", "serve", "--port", "0", "--json",
                                                stdout=subprocess.PIPE, env=env,
                                                cwd=str(ROOT))
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        yield json.loads(line)["url"], proc.pid
    finally:
        proc.terminate()
        await proc.wait()


async def main(args: argparse.Namespace) -> None:
    base = Settings.from_env()
    home = Path(tempfile.mkdtemp(prefix="ledger-bench-serve-"))
    started_nats = base.nats_urls is None
    nats_urls = base.nats_urls or (embedded.ensure_nats(home, sync_always=False).url,)
    tag = uuid.uuid4().hex[:8]
    settings = base.replace(nats_urls=nats_urls, home=home, stream=f"BENCH_{tag}", subject_prefix=f"bench{tag}")
    try:
        async with Ledger(settings) as ledger:
            await ledger.stream.ensure()
        results: list[dict[str, Any]] = []
        async with served(settings) as (url, server_pid), contextlib.AsyncExitStack() as stack:
            browser = None
            if args.browsers:
                from tests.cdp import Browser

                browser = await stack.enter_async_context(Browser.launch())
            for run in range(args.runs):
                result = await run_once(args, settings, url, browser, server_pid)
                results.append(result)
                print(f"run {run + 1}: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})}",
                      flush=True)
    finally:
        if started_nats:
            embedded.stop_nats(home)
        shutil.rmtree(home, ignore_errors=True)

    def med(key: str) -> float | None:
        values = [r[key] for r in results if r[key] is not None]
        return median(values) if values else None

    figures = {
        "clients": args.clients, "browsers": args.browsers, "rate_events_per_s": med("rate"),
        "server_cpu_share": med("server_cpu"),
        "streams_delivered": min(r["streams_delivered"] for r in results),
        "streams_in_order": all(r["streams_in_order"] for r in results),
        "streams_p50_ms": _ms(med("streams_p50_s")), "streams_p99_ms": _ms(med("streams_p99_s")),
        "pages_delivered": min(r["pages_delivered"] for r in results),
        "pages_p50_ms": _ms(med("pages_p50_s")), "pages_p99_ms": _ms(med("pages_p99_s")),
        "rows_p50_ms": _ms(med("rows_p50_s")), "rows_p99_ms": _ms(med("rows_p99_s")),
    }
    baselines = {"direct_follow_p50_ms": _ms(med("direct_p50_s")), "direct_follow_p99_ms": _ms(med("direct_p99_s")),
                 "direct_delivered": min(r["direct_delivered"] for r in results)}
    ratios = {"streams_p99_vs_direct": (figures["streams_p99_ms"] / baselines["direct_follow_p99_ms"])
              if figures["streams_p99_ms"] and baselines["direct_follow_p99_ms"] else None}
    targets = {"delivered": 1.0, "p99_ms": TARGET_P99_S * 1000, "rate_events_per_s": args.rate * 0.95}
    met = (figures["streams_delivered"] == 1.0 and figures["streams_in_order"]
           and (figures["streams_p99_ms"] or 1e9) <= targets["p99_ms"]
           and (figures["rate_events_per_s"] or 0) >= targets["rate_events_per_s"]
           and (not args.browsers or (figures["pages_delivered"] == 1.0
                                      and (figures["pages_p99_ms"] or 1e9) <= targets["p99_ms"])))
    print(f"\nledger serve: {args.clients} event streams + {args.browsers} Chromium page(s) following one room at "
          f"{args.rate} events/s for {args.seconds}s (median of {args.runs} runs)")
    print_table([
        ("produced", f"{figures['rate_events_per_s']:.0f} events/s"),
        ("ledger serve's CPU while producing", f"{figures['server_cpu_share'] * 100:.0f}% of one core"),
        ("streams delivered (worst client)", f"{figures['streams_delivered']:.4f} (in order: {figures['streams_in_order']})"),
        ("streams: append -> client p50 / p99", f"{figures['streams_p50_ms']} / {figures['streams_p99_ms']} ms"),
        ("pages delivered (worst page)", f"{figures['pages_delivered']:.4f}"),
        ("pages: append -> in the page p50 / p99", f"{figures['pages_p50_ms']} / {figures['pages_p99_ms']} ms"),
        ("pages: append -> row drawn p50 / p99", f"{figures['rows_p50_ms']} / {figures['rows_p99_ms']} ms"),
        ("baseline: Ledger.follow p50 / p99", f"{baselines['direct_follow_p50_ms']} / {baselines['direct_follow_p99_ms']} ms"),
        ("target", f"every event to every client, p99 <= {targets['p99_ms']:.0f} ms"),
        ("met", str(met)),
    ])
    print_json(figures=figures, baselines=baselines, ratios=ratios, targets=targets, met=met)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--_clients":
        asyncio.run(clients_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20, help="server-sent-event streams (default 20)")
    parser.add_argument("--browsers", type=int, default=1, help="headless Chromium room pages (default 1)")
    parser.add_argument("--rate", type=int, default=1000, help="events per second (default 1000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to produce (default 10)")
    parser.add_argument("--runs", type=int, default=3, help="runs; figures are medians (default 3)")
    asyncio.run(main(parser.parse_args()))
