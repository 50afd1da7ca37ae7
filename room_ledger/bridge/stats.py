"""Counters of a bridge process, and the small JSON file ``ledger doctor`` reads.

Each bridge process writes ``<LEDGER_HOME>/bridge/stats-<bridge_id>.json`` about once a second
while it runs (and once more when it stops); :func:`read_stats` returns every such file, newest
first, with ``alive`` telling whether the process that wrote it still runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from room_ledger.processes import pid_alive


@dataclass
class Counters:
    """What a bridge saw and did. Plain integers: read them any time, from any task."""

    #: Events recorded with their own type (participant.*, agent.status, transcript, …).
    typed: int = 0
    #: Recorded as ``data`` because nothing more specific applies (an ordinary packet).
    raw: int = 0
    #: Recorded as ``data`` *with a reason*: input that looked like something typed but was not.
    rejected: int = 0
    #: Observations deliberately not recorded (interim transcripts).
    skipped: int = 0
    #: Events handed to the writer.
    submitted: int = 0
    #: Events acknowledged by JetStream (duplicates included).
    written: int = 0
    #: Of ``written``: already stored (a retry, or a second bridge in the room).
    duplicates: int = 0
    #: Events that went through the spill file because memory was full or NATS was down.
    spilled: int = 0
    #: Failed append attempts (each is retried; nothing is dropped).
    append_failures: int = 0
    #: Reconnects to LiveKit that left a gap.
    gaps: int = 0
    #: Rooms currently bridged by this process.
    rooms: int = 0
    #: Counts per reason of rejected input (reason -> n).
    reasons: dict[str, int] = field(default_factory=dict)
    last_error: str = ""
    last_write_at: float = 0.0

    def reject(self, reason: str) -> None:
        self.rejected += 1
        key = reason.split(":", 1)[0][:80]
        self.reasons[key] = self.reasons.get(key, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def stats_dir(home: Path) -> Path:
    return Path(home) / "bridge"


def stats_path(home: Path, bridge_id: str) -> Path:
    return stats_dir(home) / f"stats-{bridge_id}.json"


def write_stats(home: Path, bridge_id: str, counters: Counters, *, extra: dict[str, Any] | None = None) -> None:
    """Write the counters atomically (temp file + rename). Never raises."""
    path = stats_path(home, bridge_id)
    data = {
        "bridge_id": bridge_id,
        "pid": os.getpid(),
        "updated_at": time.time(),
        "counters": counters.as_dict(),
        **(extra or {}),
    }
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)


def read_stats(home: Path) -> list[dict[str, Any]]:
    """Every bridge's last counters under ``home``, newest first, each with ``alive``."""
    found: list[dict[str, Any]] = []
    directory = stats_dir(home)
    if not directory.is_dir():
        return found
    for path in directory.glob("stats-*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        data["alive"] = pid_alive(int(data.get("pid", 0) or 0)) if data.get("pid") else False
        data["path"] = str(path)
        found.append(data)
    found.sort(key=lambda d: float(d.get("updated_at", 0)), reverse=True)
    return found
