"""``ledger doctor`` reads the running processes' Prometheus metrics: the figures Grafana graphs.

Endpoints come from ``LEDGER_HOME/metrics/<pid>.json`` (noted by every ``ledger bridge|project|serve
--metrics-port`` on this machine while it runs) and from ``LEDGER_METRICS_URLS`` (comma-separated,
for processes elsewhere). A bridge whose process answers on a metrics endpoint is reported from its
metrics; a bridge with no reachable endpoint falls back to its stats file, and the report says so.
"""

from __future__ import annotations

import asyncio
from typing import Any

from room_ledger import metrics
from room_ledger.settings import Settings

FROM_METRICS = "metrics"
FROM_STATS_FILE = "stats file (no metrics endpoint reachable)"


async def check_metrics(report: Any, settings: Settings) -> None:
    found = metrics.endpoints(settings.home)
    read = await asyncio.gather(*(asyncio.to_thread(metrics.read_endpoint, e["url"]) for e in found))
    report.metrics = [{**endpoint, **result} for endpoint, result in zip(found, read, strict=True)]
    answering: dict[int, dict[str, Any]] = {}
    for entry in report.metrics:
        if not entry["reachable"]:
            report.problem("warning", f"metrics endpoint {entry['url']} (from {entry['from']}) does not answer: "
                           f"{entry['error']}")
        elif entry.get("pid") is not None:
            answering[int(entry["pid"])] = entry
    for bridge in report.bridges:
        entry = answering.get(int(bridge.get("pid") or 0)) if bridge.get("alive") else None
        if entry is not None:
            bridge["source"] = FROM_METRICS
            bridge["metrics_url"] = entry["url"]
            bridge["metrics"] = entry["figures"]["bridge"]
        else:
            bridge["source"] = FROM_STATS_FILE


def _flat(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        rows: list[tuple[str, Any]] = []
        for key, inner in value.items():
            rows.extend(_flat(f"{prefix}{key}" if not prefix else f"{prefix} {key}", inner))
        return rows
    return [(prefix, value)]


def metrics_rows(entry: dict[str, Any]) -> list[tuple[str, Any]]:
    """One endpoint's figures as (key, value) rows, leaving out what is zero or empty."""
    rows = [("url", entry["url"]), ("from", entry["from"])]
    if not entry["reachable"]:
        return [*rows, ("error", entry.get("error"))]
    for part, figures in entry["figures"].items():
        for key, value in _flat(part, figures):
            if value not in (0, None, {}, ""):
                rows.append((key, value))
    return rows


def render_metrics(report: Any, section: Any) -> None:
    for entry in getattr(report, "metrics", []):
        role = entry.get("role") or "process"
        pid = f" pid {entry['pid']}" if entry.get("pid") else ""
        section(f"metrics of {role}{pid}", metrics_rows(entry))
