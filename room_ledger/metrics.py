"""Prometheus metrics of the bridge, the projector and hydration, and their HTTP exposition.

Everything is registered in prometheus_client's default registry, the one LiveKit Agents
workers expose too, so a process that already serves Agents metrics shows these beside them.
``ledger bridge|project|serve --metrics-port [HOST:]PORT`` (or ``LEDGER_METRICS_PORT``) serves
``/metrics``; ``ledger serve`` also answers ``/metrics`` on its own port.

The same measurements become OpenTelemetry spans when an OTLP endpoint is configured
(room_ledger/tracing.py).

Hot paths stay cheap: the bridge counts events by type in plain dicts and its writers' own
counters (room_ledger/bridge/stats.py) are read when Prometheus scrapes, not copied on every event.

Metrics (counters end in ``_total`` on the wire)
    bridge      ledger_bridge_rooms, ledger_bridge_events_observed_total{type},
                ledger_bridge_events_written_total{type}, ledger_bridge_duplicates_total{type},
                ledger_bridge_rejected_total{reason}, ledger_bridge_gaps_total,
                ledger_bridge_spilled_total, ledger_bridge_spill_pending, ledger_bridge_pending,
                ledger_bridge_append_failures_total, ledger_bridge_append_seconds (histogram, per batch),
                ledger_bridge_last_write_timestamp_seconds, ledger_bridge_nats_ok
    projector   ledger_projector_events_folded_total{partition}, ledger_projector_batch_seconds{partition},
                ledger_projector_errors_total{partition}, ledger_projector_checkpoint{partition},
                ledger_projector_lag_events{partition}, ledger_stream_head
    hydration   ledger_hydrate_seconds{source} (histogram), ledger_hydrate_caught_up_events{source}
    serve       ledger_serve_rooms_followed, ledger_serve_event_streams
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from room_ledger import tracing
from room_ledger.embedded import pid_alive
from room_ledger.errors import SettingsError

log = logging.getLogger("ledger.metrics")

PORT_ENV: Final = "LEDGER_METRICS_PORT"
#: Seconds between two reads of the stream's head for the projectors' lag (only while serving).
HEAD_EVERY_S: Final = 2.0

_LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# --- bridge ------------------------------------------------------------------------------------


class _Counters(Protocol):
    typed: int
    rejected: int
    spilled: int
    append_failures: int
    gaps: int
    rooms: int
    reasons: dict[str, int]
    last_write_at: float


class _Writer(Protocol):
    @property
    def counters(self) -> _Counters: ...

    @property
    def pending(self) -> int: ...

    @property
    def spill_pending(self) -> int: ...

    nats_ok: bool


APPEND_SECONDS: Final = Histogram(
    "ledger_bridge_append_seconds", "Time to store one batch of events in JetStream (acknowledged).",
    buckets=_LATENCY_BUCKETS,
)


class _BridgeCollector(Collector):
    def __init__(self) -> None:
        self.writers: weakref.WeakSet[Any] = weakref.WeakSet()
        self.observed: dict[str, int] = {}
        self.written: dict[str, int] = {}
        self.duplicates: dict[str, int] = {}
        # Counters of writers that are gone, so totals never go down.
        self._retired: dict[str, float] = {}

    def collect(self) -> Iterable[Metric]:
        writers: list[_Writer] = list(self.writers)
        for name, doc, counts in (
            ("ledger_bridge_events_observed", "Events the bridge handed to its writer, by type.", self.observed),
            ("ledger_bridge_events_written", "Events acknowledged by JetStream, by type.", self.written),
            ("ledger_bridge_duplicates", "Of the written events, those JetStream already had, by type.",
             self.duplicates),
        ):
            family = CounterMetricFamily(name, doc, labels=["type"])
            for event_type, n in sorted(counts.items()):
                family.add_metric([event_type], n)
            yield family
        reasons = CounterMetricFamily("ledger_bridge_rejected",
                                      "Input recorded as data with a reason instead of typed, by reason.",
                                      labels=["reason"])
        by_reason: dict[str, int] = {}
        for writer in writers:
            for reason, n in writer.counters.reasons.items():
                by_reason[reason] = by_reason.get(reason, 0) + n
        for reason, n in sorted(by_reason.items()):
            reasons.add_metric([reason], n)
        yield reasons

        def total(attr: str) -> float:
            return float(sum(getattr(w.counters, attr) for w in writers))

        yield CounterMetricFamily("ledger_bridge_gaps", "Reconnects that left a bridge.gap in a room's log.",
                                  value=total("gaps"))
        yield CounterMetricFamily("ledger_bridge_spilled", "Events that went through the disk buffer.",
                                  value=total("spilled"))
        yield CounterMetricFamily("ledger_bridge_append_failures", "Failed append attempts (each retried).",
                                  value=total("append_failures"))
        yield GaugeMetricFamily("ledger_bridge_rooms", "Rooms bridged by this process now.", value=total("rooms"))
        yield GaugeMetricFamily("ledger_bridge_pending", "Events not yet acknowledged (memory and disk).",
                                value=float(sum(w.pending for w in writers)))
        yield GaugeMetricFamily("ledger_bridge_spill_pending", "Events waiting in the disk buffer.",
                                value=float(sum(w.spill_pending for w in writers)))
        last = max((w.counters.last_write_at for w in writers), default=0.0)
        yield GaugeMetricFamily("ledger_bridge_last_write_timestamp_seconds",
                                "When the bridge last stored events (Unix time; 0: never).", value=last)
        yield GaugeMetricFamily("ledger_bridge_nats_ok", "1 while appends succeed, 0 while they fail.",
                                value=float(all(w.nats_ok for w in writers)))


BRIDGE: Final = _BridgeCollector()
REGISTRY.register(BRIDGE)


def track_writer(writer: Any) -> None:
    """Export this bridge writer's counters (held weakly: a closed writer drops out)."""
    BRIDGE.writers.add(writer)


def observed(event_type: str) -> None:
    counts = BRIDGE.observed
    counts[event_type] = counts.get(event_type, 0) + 1


def written(events: Sequence[Any], positions: Sequence[Any], seconds: float) -> None:
    """A batch acknowledged: counts by type, duplicates, and how long it took."""
    APPEND_SECONDS.observe(seconds)
    done = BRIDGE.written
    dup = BRIDGE.duplicates
    duplicates = 0
    for event, position in zip(events, positions, strict=False):
        kind: str = event.type
        done[kind] = done.get(kind, 0) + 1
        if position.duplicate:
            dup[kind] = dup.get(kind, 0) + 1
            duplicates += 1
    tracing.record("ledger.bridge.append", seconds, {
        "ledger.events": len(events), "ledger.duplicates": duplicates,
        "ledger.first_seq": positions[0].seq if positions else None,
        "ledger.last_seq": positions[-1].seq if positions else None,
    })


# --- projector ---------------------------------------------------------------------------------


FOLDED: Final = Counter("ledger_projector_events_folded", "Events folded into the projection.", ["partition"])
BATCH_SECONDS: Final = Histogram(
    "ledger_projector_batch_seconds", "Time to fold one batch (and finish writing the one before).",
    ["partition"], buckets=_LATENCY_BUCKETS,
)
PROJECTION_ERRORS: Final = Counter(
    "ledger_projector_errors", "Events that could not be projected (recorded in projection_errors).",
    ["partition"],
)


class _ProjectorCollector(Collector):
    def __init__(self) -> None:
        self.projectors: weakref.WeakSet[Any] = weakref.WeakSet()
        self.head: int | None = None

    def collect(self) -> Iterable[Metric]:
        checkpoint = GaugeMetricFamily("ledger_projector_checkpoint",
                                       "Last stream sequence committed with the projection's rows.",
                                       labels=["partition"])
        lag = GaugeMetricFamily("ledger_projector_lag_events",
                                "Stream head minus the committed checkpoint (events not yet projected).",
                                labels=["partition"])
        for projector in list(self.projectors):
            label = [str(projector.partition)]
            checkpoint.add_metric(label, float(projector.checkpoint))
            if self.head is not None:
                lag.add_metric(label, float(max(self.head - projector.checkpoint, 0)))
        yield checkpoint
        yield lag
        head = GaugeMetricFamily("ledger_stream_head", "Last sequence of the stream (as last read).", labels=[])
        if self.head is not None:
            head.add_metric([], float(self.head))
        yield head


PROJECTOR: Final = _ProjectorCollector()
REGISTRY.register(PROJECTOR)
_head_tasks: weakref.WeakKeyDictionary[Any, asyncio.Task[None]] = weakref.WeakKeyDictionary()


def track_projector(projector: Any) -> None:
    """Export this projector's checkpoint and lag; while serving, read the head every few seconds."""
    PROJECTOR.projectors.add(projector)
    if _serving and projector not in _head_tasks:
        with contextlib.suppress(RuntimeError):  # no running loop: the lag shows from the next batch
            _head_tasks[projector] = asyncio.get_running_loop().create_task(_follow_head(weakref.ref(projector)))


async def _follow_head(ref: weakref.ref[Any]) -> None:
    while True:
        projector = ref()
        ledger = projector.ledger if projector is not None else None
        if projector is None or ledger is None:
            return
        with contextlib.suppress(Exception):
            PROJECTOR.head = int(await ledger.head())
        del projector, ledger
        await asyncio.sleep(HEAD_EVERY_S)


def projected(partition: int, events: int, errors: int, seconds: float) -> None:
    label = str(partition)
    FOLDED.labels(label).inc(events)
    BATCH_SECONDS.labels(label).observe(seconds)
    if errors:
        PROJECTION_ERRORS.labels(label).inc(errors)
    tracing.record("ledger.projector.batch", seconds,
                   {"ledger.partition": partition, "ledger.events": events, "ledger.errors": errors})


# --- hydration ---------------------------------------------------------------------------------

HYDRATE_SECONDS: Final = Histogram(
    "ledger_hydrate_seconds", "Time to hydrate a room, by where the state came from (projection+log, log).",
    ["source"], buckets=_LATENCY_BUCKETS,
)
HYDRATE_CAUGHT_UP: Final = Histogram(
    "ledger_hydrate_caught_up_events", "Events folded from the log on top of the projection row.",
    ["source"], buckets=(0, 1, 4, 16, 64, 256, 1024, 4096, 16384),
)


def hydrated(source: str, seconds: float, caught_up: int) -> None:
    HYDRATE_SECONDS.labels(source).observe(seconds)
    HYDRATE_CAUGHT_UP.labels(source).observe(caught_up)
    tracing.record("ledger.hydrate", seconds, {"ledger.source": source, "ledger.caught_up": caught_up})


# --- ledger serve ------------------------------------------------------------------------------

SERVE_ROOMS: Final = Gauge("ledger_serve_rooms_followed", "Rooms ledger serve follows for its web view now.")
SERVE_CLIENTS: Final = Gauge("ledger_serve_event_streams", "Browsers following a room's live timeline now.")


# --- exposition --------------------------------------------------------------------------------

_serving: bool = False
_ADDRESS_RE: Final = re.compile(r"^(?:(?P<host>\[[0-9a-fA-F:.]+\]|[^:\[\]]+):)?(?P<port>\d{1,5})$")


def parse_address(value: str, variable: str = PORT_ENV) -> tuple[str, int]:
    """``9100`` (loopback) or ``0.0.0.0:9100`` / ``[::]:9100`` -> (host, port)."""
    match = _ADDRESS_RE.match(value.strip())
    port = int(match.group("port")) if match else -1
    if match is None or not 0 <= port <= 65535:
        raise SettingsError(f"{variable}={value!r}: expected a port (9100) or HOST:PORT (0.0.0.0:9100)")
    host = (match.group("host") or "127.0.0.1").strip("[]")
    return host, port


def serve(address: str, variable: str = "--metrics-port", *, home: Path | None = None,
          role: str = "") -> tuple[str, int]:
    """Serve ``/metrics`` on ``[HOST:]PORT`` (a thread of its own); returns where it listens.

    With ``home``, the address is noted in ``<home>/metrics/<pid>.json`` while the process runs,
    so ``ledger doctor`` on this machine finds it.
    """
    global _serving
    host, port = parse_address(address, variable)
    try:
        server, _thread = start_http_server(port, addr=host)
    except OSError as exc:
        raise SettingsError(f"{variable} {address}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                            "choose another port") from exc
    _serving = True
    bound = int(server.server_port)
    log.info("metrics on http://%s:%d/metrics", host, bound)
    if home is not None:
        _note_endpoint(Path(home), host, bound, role)
    return host, bound


# --- where the endpoints are, and what they say (ledger doctor) ---------------------------------

URLS_ENV: Final = "LEDGER_METRICS_URLS"


def _endpoints_dir(home: Path) -> Path:
    return home / "metrics"


def _note_endpoint(home: Path, host: str, port: int, role: str) -> None:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}/metrics"
    path = _endpoints_dir(home) / f"{os.getpid()}.json"
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"pid": os.getpid(), "role": role, "url": url, "started_at": time.time()}))
        atexit.register(lambda: path.unlink(missing_ok=True))


def endpoints(home: Path, environ: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Metrics endpoints to read: those noted under ``home`` by running processes, then ``LEDGER_METRICS_URLS``."""
    found: list[dict[str, Any]] = []
    directory = _endpoints_dir(Path(home))
    if directory.is_dir():
        for path in sorted(directory.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                pid = int(data["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if not pid_alive(pid):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            found.append({"url": str(data["url"]), "pid": pid, "role": str(data.get("role", "")),
                          "from": str(path)})
    env = os.environ if environ is None else environ
    for url in (u.strip() for u in env.get(URLS_ENV, "").split(",")):
        if url and url not in {e["url"] for e in found}:
            found.append({"url": url, "pid": None, "role": "", "from": URLS_ENV})
    return found


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Estimate a quantile from cumulative histogram buckets (upper bound, count), as PromQL does."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            span = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / span if span else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound


def summarize(text: str) -> dict[str, Any]:
    """The figures ``ledger doctor`` shows, from one exposition (the same numbers Grafana graphs)."""

    values: dict[str, float] = {}
    by_label: dict[str, dict[str, float]] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels = sample.name, sample.labels
            if name == "process_start_time_seconds":
                continue
            if name.endswith("_bucket") and "le" in labels:
                key = name[: -len("_bucket")]
                buckets.setdefault(key, []).append((float(labels["le"]), float(sample.value)))
                continue
            label = next((v for k, v in labels.items() if k in ("type", "reason", "partition", "source")), None)
            if label is None:
                values[name] = values.get(name, 0.0) + float(sample.value)
            else:
                group = by_label.setdefault(name, {})
                group[label] = group.get(label, 0.0) + float(sample.value)
    for key in buckets:
        buckets[key].sort()

    def total(name: str) -> float:
        return values.get(name, 0.0) + sum(by_label.get(name, {}).values())

    append = buckets.get("ledger_bridge_append_seconds", [])
    hydrate_count = total("ledger_hydrate_seconds_count")
    last_write = values.get("ledger_bridge_last_write_timestamp_seconds", 0.0)
    figures: dict[str, Any] = {
        "bridge": {
            "rooms": int(values.get("ledger_bridge_rooms", 0)),
            "events_written": int(total("ledger_bridge_events_written_total")),
            "duplicates": int(total("ledger_bridge_duplicates_total")),
            "rejected": {k: int(v) for k, v in by_label.get("ledger_bridge_rejected_total", {}).items()},
            "gaps": int(values.get("ledger_bridge_gaps_total", 0)),
            "pending": int(values.get("ledger_bridge_pending", 0)),
            "spill_pending": int(values.get("ledger_bridge_spill_pending", 0)),
            "append_failures": int(values.get("ledger_bridge_append_failures_total", 0)),
            "append_p50_ms": _ms(_quantile(append, 0.5)),
            "append_p99_ms": _ms(_quantile(append, 0.99)),
            "last_write_age_s": round(time.time() - last_write, 1) if last_write else None,
        },
        "projector": {
            "events_folded": {k: int(v) for k, v in by_label.get("ledger_projector_events_folded_total", {}).items()},
            "lag": {k: int(v) for k, v in by_label.get("ledger_projector_lag_events", {}).items()},
            "checkpoint": {k: int(v) for k, v in by_label.get("ledger_projector_checkpoint", {}).items()},
            "errors": int(total("ledger_projector_errors_total")),
        },
        "hydrate": {
            "count": int(hydrate_count),
            "mean_ms": _ms(total("ledger_hydrate_seconds_sum") / hydrate_count) if hydrate_count else None,
        },
    }
    return figures


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def read_endpoint(url: str, timeout: float = 2.0) -> dict[str, Any]:
    """Scrape one endpoint: ``{"url", "reachable", "error"?, "figures"?}`` (blocking; run it in a thread)."""

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return {"url": url, "reachable": False, "error": str(reason)}
    return {"url": url, "reachable": True, "figures": summarize(text)}


def exposition() -> tuple[bytes, str]:
    """The metrics in Prometheus' text format, with its content type."""

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def now() -> float:
    return time.perf_counter()
