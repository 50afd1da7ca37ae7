"""Prometheus metrics of hydration, and the HTTP exposition of every metric of the process.

Everything is registered in prometheus_client's default registry, the one LiveKit Agents
workers expose too, so a process that already serves Agents metrics shows these beside them.
``ledger bridge|project|serve --metrics-port [HOST:]PORT`` (or ``LEDGER_METRICS_PORT``) serves
``/metrics``; ``ledger serve`` also answers ``/metrics`` on its own port.

The same measurements become OpenTelemetry spans when an OTLP endpoint is configured
(room_ledger/tracing.py).

The services define their own metrics beside their code and register them in the same
registry when they are imported: the bridge's in room_ledger/bridge/metrics.py, the projector's
in room_ledger/projections/metrics.py.

Metrics (counters end in ``_total`` on the wire)
    bridge      see room_ledger/bridge/metrics.py
    projector   see room_ledger/projections/metrics.py
    hydration   ledger_hydrate_seconds{source} (histogram), ledger_hydrate_caught_up_events{source}
    serve       ledger_serve_rooms_followed, ledger_serve_event_streams
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.parser import text_string_to_metric_families

from room_ledger import tracing
from room_ledger.errors import SettingsError
from room_ledger.processes import pid_alive

log = logging.getLogger("ledger.metrics")

PORT_ENV: Final = "LEDGER_METRICS_PORT"
#: Histogram buckets of every latency the ledger measures (seconds).
LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# --- hydration ---------------------------------------------------------------------------------

HYDRATE_SECONDS: Final = Histogram(
    "ledger_hydrate_seconds", "Time to hydrate a room, by where the state came from (projection+log, log).",
    ["source"], buckets=LATENCY_BUCKETS,
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


def serving() -> bool:
    """Whether this process serves ``/metrics`` (measurements that cost a read run only then)."""
    return _serving

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
