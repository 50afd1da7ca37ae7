"""``ledger doctor``: what the ledger connects to, in what shape, and what is wrong with it.

The doctor only looks: it starts no embedded server (a stopped one is reported as such) and it
does not create or update the stream, so the differences it reports are the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import asyncpg
import msgspec
from rich import box
from rich.table import Table
from rich.text import Text

from room_ledger import embedded, processes
from room_ledger.bridge.stats import read_stats
from room_ledger.cli.common import format_duration
from room_ledger.cli.doctor_metrics import check_metrics, render_metrics
from room_ledger.client import Ledger
from room_ledger.errors import LedgerError, LogUnavailable
from room_ledger.projections import projector as projector_module
from room_ledger.settings import Settings

Level = Literal["error", "warning", "info"]

#: Where a NATS server usually serves its monitoring endpoint (``http: 8222``).
DEFAULT_MONITOR_PORT = 8222


@dataclass
class Problem:
    level: Level
    message: str


@dataclass
class Report:
    settings: dict[str, Any]
    nats: dict[str, Any] = field(default_factory=dict)
    stream: dict[str, Any] = field(default_factory=dict)
    postgres: dict[str, Any] = field(default_factory=dict)
    projector: dict[str, Any] = field(default_factory=dict)
    bridges: list[dict[str, Any]] = field(default_factory=list)
    #: What the processes' Prometheus endpoints say (room_ledger/cli/doctor_metrics.py).
    metrics: list[dict[str, Any]] = field(default_factory=list)
    #: Embedded servers running on this machine, of any home (``ledger down`` with that home stops them).
    embedded: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def problem(self, level: Level, message: str) -> None:
        self.problems.append(Problem(level, message))

    @property
    def ok(self) -> bool:
        return not any(p.level == "error" for p in self.problems)

    def to_builtins(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "settings": self.settings,
            "nats": self.nats,
            "stream": self.stream,
            "postgres": self.postgres,
            "projector": self.projector,
            "bridges": self.bridges,
            "metrics": self.metrics,
            "embedded": self.embedded,
            "problems": [{"level": p.level, "message": p.message} for p in self.problems],
        }


def fsync_from_varz(varz: dict[str, Any]) -> bool | None:
    """Whether a server fsyncs every write, from its ``/varz`` (None when it has no JetStream)."""
    config = (varz.get("jetstream") or {}).get("config")
    if not isinstance(config, dict):
        return None
    return bool(config.get("sync_always"))


def _http_varz(url: str, timeout: float) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = json.loads(response.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


async def _varz(ledger: Ledger, monitor_url: str | None) -> tuple[dict[str, Any] | None, str]:
    """The server's varz: through the system account if we may, else over its monitoring port."""
    varz = await ledger.stream.system_varz(timeout=0.5)
    if varz is not None:
        return varz, "$SYS.REQ.SERVER.PING.VARZ"
    candidates: list[str] = []
    if monitor_url:
        candidates.append(monitor_url.rstrip("/") + "/varz")
    else:
        host = urlsplit(ledger.nats_url.split(",")[0]).hostname or "127.0.0.1"
        candidates.append(f"http://{host}:{DEFAULT_MONITOR_PORT}/varz")
    for url in candidates:
        data = await asyncio.to_thread(_http_varz, url, 1.0)
        if data is not None:
            return data, url
    return None, candidates[0]


def _stream_config(info: Any) -> dict[str, Any]:
    c = info.config
    s = info.state
    return {
        "name": c.name,
        "subjects": list(c.subjects or []),
        "storage": getattr(c.storage, "value", c.storage),
        "replicas": c.num_replicas,
        "max_age_s": c.max_age or 0,
        "max_msg_size": c.max_msg_size,
        "duplicate_window_s": c.duplicate_window,
        "allow_direct": c.allow_direct,
        "allow_atomic": getattr(c, "allow_atomic", None),
        "messages": s.messages,
        "bytes": s.bytes,
        "first_seq": s.first_seq,
        "last_seq": s.last_seq,
        "consumers": s.consumer_count,
    }


async def _check_nats(report: Report, settings: Settings, monitor_url: str | None) -> None:
    nats_part = report.nats
    embedded_mode = settings.embedded_nats
    if embedded_mode:
        live = embedded.status(settings.home)["nats"]
        nats_part["embedded"] = True
        nats_part["home"] = str(settings.home.resolve())
        if live is None:
            nats_part["running"] = False
            report.problem(
                "warning",
                f"the embedded NATS of {settings.home} is not running: it starts on first use, or run `ledger up`",
            )
            return
        nats_part.update(running=True, pid=live.pid, url=live.url)
        state_file = settings.home.resolve() / "nats.json"
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(state_file.read_text())
            nats_part["sync_always"] = bool(state.get("sync_always", True))
            if not nats_part["sync_always"]:
                report.problem(
                    "warning",
                    "the embedded NATS was started without fsync on every write (LEDGER_NATS_SYNC_ALWAYS=false): "
                    "a power loss can lose acknowledged events",
                )
        settings = settings.replace(nats_urls=(live.url,))
    else:
        nats_part["embedded"] = False
        nats_part["url"] = ",".join(settings.nats_urls or ())
    ledger = Ledger(settings, name="ledger-doctor")
    try:
        started = time.perf_counter()
        await ledger.connect(ensure_stream=False)
        nats_part["connect_ms"] = round((time.perf_counter() - started) * 1000, 1)
    except LedgerError as exc:
        nats_part["reachable"] = False
        report.problem("error", str(exc).splitlines()[0])
        return
    try:
        nats_part["reachable"] = True
        nats_part["connected_url"] = ledger.nats_url
        info = ledger.stream.server_info()
        nats_part["server_version"] = info.get("version")
        nats_part["server_name"] = info.get("server_name")
        nats_part["cluster"] = info.get("cluster")
        nats_part["jetstream"] = bool(info.get("jetstream"))
        started = time.perf_counter()
        await ledger.stream.flush(timeout=5)
        nats_part["rtt_ms"] = round((time.perf_counter() - started) * 1000, 2)
        if not embedded_mode or "sync_always" not in nats_part:
            varz, source = await _varz(ledger, monitor_url)
            if varz is None:
                nats_part["sync_always"] = None
                report.problem(
                    "warning",
                    f"cannot tell whether NATS fsyncs every write (no system account, nothing at {source}): "
                    "make sure its config has `jetstream { sync_interval: always }`, or pass --monitor-url",
                )
            else:
                nats_part["varz_from"] = source
                sync = fsync_from_varz(varz)
                nats_part["sync_always"] = sync
                if sync is False:
                    report.problem(
                        "warning",
                        "NATS does not fsync every write (jetstream sync_interval is not `always`): events "
                        "acknowledged shortly before a power loss can be lost; set `jetstream { sync_interval: always }`",
                    )
        await _check_stream(report, ledger)
    finally:
        await ledger.close()


async def _check_stream(report: Report, ledger: Ledger) -> None:
    name = ledger.settings.stream
    try:
        account = await ledger.stream.account()
        report.nats["account"] = {
            "streams": account.streams,
            "consumers": account.consumers,
            "storage_bytes": account.storage,
        }
    except LogUnavailable as exc:
        report.problem("error", f"JetStream does not answer on this account ({exc}): enable JetStream on the server")
        return
    info = await ledger.stream.find()
    if info is None:
        report.stream = {"name": name, "exists": False}
        report.problem(
            "info", f"stream {name!r} does not exist yet: the first command that writes (bridge, demo) creates it"
        )
        return
    report.stream = {"exists": True, **_stream_config(info)}
    # The last message still stored (a purge of the newest room leaves last_seq behind it).
    last_stored = await ledger.stream.last_stored_seq()
    if last_stored is not None:
        report.stream["last_stored_seq"] = last_stored
    differences = ledger.stream.differences(info.config)
    report.stream["differences"] = {k: {"now": now, "configured": want} for k, (now, want) in differences.items()}
    for key, (now, want) in differences.items():
        report.problem(
            "warning",
            f"stream {name!r} has {key}={now!r} but the settings say {want!r}: the next writer updates it "
            "where it can (subjects and replicas may need `nats stream edit`)",
        )
    await _check_payload_bucket(report, ledger)


async def _check_payload_bucket(report: Report, ledger: Ledger) -> None:
    """The Object Store bucket of payloads above LEDGER_INLINE_LIMIT: beside the stream, with its
    replicas and max age."""
    s = ledger.settings
    try:
        bucket = await ledger.payloads.bucket_status()
    except LogUnavailable as exc:
        report.problem("warning", f"payload bucket {s.payload_bucket!r} does not answer ({exc})")
        return
    limits = {"inline_limit": s.inline_limit, "max_payload": s.max_payload}
    if bucket is None:
        report.stream["payloads"] = {"bucket": s.payload_bucket, "exists": False, **limits}
        return
    report.stream["payloads"] = {"exists": True, **bucket, **limits}
    if bucket["replicas"] != s.replicas or abs((bucket["max_age_s"] or 0) - (s.max_age_s or 0)) > 0.001:
        report.problem(
            "warning",
            f"payload bucket {s.payload_bucket!r} has replicas={bucket['replicas']} max_age={bucket['max_age_s']} "
            f"but the stream's settings say replicas={s.replicas} max_age={s.max_age_s}: the next bridge "
            "that stores a payload updates it",
        )


async def _check_postgres(report: Report, settings: Settings) -> None:
    part = report.postgres
    url = settings.database_url
    if settings.embedded_postgres:
        live = embedded.status(settings.home)["postgres"]
        part["embedded"] = True
        if live is None:
            part["running"] = False
            report.problem(
                "warning",
                f"the embedded PostgreSQL of {settings.home} is not running: it starts on first use, or run `ledger up`",
            )
            return
        part.update(running=True, pid=live.pid)
        url = live.url
    else:
        part["embedded"] = False
    assert url is not None
    part["url"] = Settings(database_url=url).describe()["database_url"]
    try:

        connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"), timeout=5)
    except Exception as exc:
        part["reachable"] = False
        report.problem("error", f"cannot reach PostgreSQL at {part['url']}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        return
    try:
        part["reachable"] = True
        part["server_version"] = await connection.fetchval("SHOW server_version")
        with contextlib.suppress(Exception):
            part["migration"] = await connection.fetchval("SELECT version_num FROM alembic_version LIMIT 1")
        if part.get("migration") is None:
            report.problem("warning", "the projection tables are not migrated yet: run `ledger migrate`")
    finally:
        await connection.close()
    await _check_projector(report, settings.replace(database_url=url))


def _undefined_table(exc: BaseException) -> bool:
    """Whether PostgreSQL said a table does not exist (SQLSTATE 42P01), through SQLAlchemy's and
    asyncpg's wrappings."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, asyncpg.UndefinedTableError) or getattr(current, "sqlstate", None) == "42P01":
            return True
        orig = getattr(current, "orig", None)
        todo.extend([current.__cause__, current.__context__, orig if isinstance(orig, BaseException) else None])
    return False


async def _check_projector(report: Report, settings: Settings) -> None:
    """Projector checkpoints, lag and its errors table."""
    head = report.stream.get("last_stored_seq", report.stream.get("last_seq")) if report.stream.get("exists") else None
    try:
        status = await projector_module.status(settings, head=head)
    except Exception as exc:
        if _undefined_table(exc):
            return  # not migrated: reported above
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        report.problem("warning", f"cannot read the projector's status: {text}")
        return
    report.projector = msgspec.to_builtins(status)
    if status.errors_total:
        report.problem("warning", f"the projector recorded {status.errors_total} error(s): see the errors table")
    if status.lag is not None and status.lag > 1000:
        report.problem("warning", f"the projector is {status.lag:,} events behind the log: is `ledger project` running?")


def _check_bridges(report: Report, settings: Settings) -> None:
    report.bridges = read_stats(settings.home)


async def diagnose(settings: Settings, *, monitor_url: str | None = None) -> Report:
    report = Report(settings=settings.describe())
    await _check_nats(report, settings, monitor_url)
    await _check_postgres(report, settings)
    _check_bridges(report, settings)
    _list_embedded(report, settings)

    await check_metrics(report, settings)
    return report


def _list_embedded(report: Report, settings: Settings) -> None:
    here = settings.home.resolve()
    report.embedded = [{"kind": server.kind, "pid": server.pid, "home": str(server.home),
                        "this_home": server.home.resolve() == here}
                       for server in processes.running_anywhere()]
    elsewhere = sorted({entry["home"] for entry in report.embedded if not entry["this_home"]})
    if elsewhere:
        report.problem("info", f"embedded servers of other homes are running: {', '.join(elsewhere)} "
                               "(`ledger --home HOME down` stops a home's)")


def render_report(console: Any, report: Report) -> None:

    def section(title: str, rows: list[tuple[str, Any]]) -> None:
        table = Table(box=box.SIMPLE, show_header=False, title=title, title_justify="left", title_style="bold")
        table.add_column("key", style="bright_black", no_wrap=True)
        table.add_column("value", overflow="fold")
        for key, value in rows:
            if value is None or value == "" or value == []:
                continue
            table.add_row(key, value if isinstance(value, Text) else str(value))
        console.print(table)

    n = report.nats
    nats_rows: list[tuple[str, Any]] = [
        ("mode", "embedded" if n.get("embedded") else "your server"),
        ("url", n.get("connected_url") or n.get("url")),
        ("running", None if not n.get("embedded") else ("yes" if n.get("running") else "no")),
        ("reachable", _yes_no(n.get("reachable"))),
        ("server", " ".join(str(x) for x in (n.get("server_name"), n.get("server_version")) if x)),
        ("cluster", n.get("cluster")),
        ("connect / rtt", f"{n['connect_ms']} ms / {n.get('rtt_ms')} ms" if "connect_ms" in n else None),
        ("fsync every write", _yes_no(n.get("sync_always"), unknown="unknown", style="yellow")
         if "sync_always" in n else None),
    ]
    section("NATS", nats_rows)
    s = report.stream
    if s:
        if not s.get("exists"):
            section(f"stream {s.get('name')}", [("exists", "no (created on first write)")])
        else:
            section(f"stream {s['name']}", [
                ("subjects", ", ".join(s["subjects"])),
                ("storage / replicas", f"{s['storage']} / {s['replicas']}"),
                ("max age", format_age(s["max_age_s"])),
                ("max message", f"{s['max_msg_size']:,} bytes"),
                ("duplicate window", format_age(s["duplicate_window_s"])),
                ("atomic batches / direct get", f"{s['allow_atomic']} / {s['allow_direct']}"),
                ("messages", f"{s['messages']:,} ({s['bytes']:,} bytes), #{s['first_seq']}–#{s['last_seq']}"),
                ("consumers", s["consumers"]),
            ])
        b = s.get("payloads")
        if b:
            limits = f"inline up to {b['inline_limit']:,} bytes, hard limit {b['max_payload']:,} bytes"
            if not b.get("exists"):
                section(f"payload bucket {b['bucket']}", [("exists", "no (created with the first large payload)"),
                                                         ("limits", limits)])
            else:
                section(f"payload bucket {b['bucket']}", [
                    ("replicas / max age", f"{b['replicas']} / {format_age(b['max_age_s'])}"),
                    ("stored", f"{b['bytes']:,} bytes in {b['messages']:,} messages (chunks and metadata)"),
                    ("limits", limits),
                ])
    p = report.postgres
    section("PostgreSQL", [
        ("mode", "embedded" if p.get("embedded") else "your server"),
        ("url", p.get("url")),
        ("running", None if not p.get("embedded") else ("yes" if p.get("running") else "no")),
        ("reachable", _yes_no(p.get("reachable"))),
        ("server", p.get("server_version")),
        ("migration", p.get("migration")),
    ])
    if report.projector:
        proj = report.projector
        section("projector", [(k, v) for k, v in proj.items() if k != "errors" and not isinstance(v, list | dict)])
        errors = proj.get("errors") or []
        if errors:
            table = Table(box=box.SIMPLE_HEAD, title="projector errors", title_justify="left", title_style="bold red")
            keys = list(errors[0].keys()) if isinstance(errors[0], dict) else ["error"]
            for key in keys:
                table.add_column(str(key), overflow="fold")
            for error in errors[:20]:
                values = error if isinstance(error, dict) else {"error": error}
                table.add_row(*(str(values.get(k, "")) for k in keys))
            console.print(table)
    shown = [b for b in report.bridges if b.get("alive")] or report.bridges[:1]
    for b in shown:
        counters = dict(b.get("metrics") or b.get("counters", {}))
        if counters.get("last_write_at"):
            counters["last_write_at"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(counters["last_write_at"]))
        alive = "running" if b.get("alive") else "stopped"
        section(f"bridge {b.get('bridge_id')} ({alive}; from its {b.get('source', 'stats file')})", [
            (k, v) for k, v in counters.items() if v not in (0, "", {}, 0.0)
        ])
    if len(report.bridges) > len(shown):
        console.print(Text(f"({len(report.bridges) - len(shown)} older bridge stats files under "
                           f"{report.settings.get('home')}/bridge; --json lists them)", style="bright_black"))

    render_metrics(report, section)
    if report.embedded:
        homes: dict[str, list[str]] = {}
        for entry in report.embedded:
            mark = " (this home)" if entry["this_home"] else ""
            homes.setdefault(entry["home"] + mark, []).append(f"{entry['kind']} pid {entry['pid']}")
        section("embedded servers on this machine", [(home, ", ".join(servers)) for home, servers in homes.items()])
    if not report.problems:
        console.print(Text("no problems found", style="bold green"))
        return
    for problem in report.problems:
        style = {"error": "bold red", "warning": "yellow", "info": "bright_black"}[problem.level]
        console.print(Text(f"{problem.level}: ", style=style) + Text(problem.message))


def _yes_no(value: Any, *, unknown: str | None = None, style: str = "bold red") -> Any:

    if value is None:
        return unknown
    return "yes" if value else Text("no", style=style)


def format_age(seconds: float | int | None) -> str:
    if not seconds:
        return "forever"

    return format_duration(float(seconds))
