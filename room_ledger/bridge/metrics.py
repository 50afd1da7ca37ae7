"""Prometheus metrics of the bridge, exposed by the core's endpoint (room_ledger/metrics.py).

The hot path stays cheap: events are counted by type in plain dicts, and the writers' own
counters (room_ledger/bridge/stats.py) are read when Prometheus scrapes, not copied on every event.

    ledger_bridge_rooms, ledger_bridge_events_observed_total{type},
    ledger_bridge_events_written_total{type}, ledger_bridge_duplicates_total{type},
    ledger_bridge_rejected_total{reason}, ledger_bridge_gaps_total,
    ledger_bridge_spilled_total, ledger_bridge_spill_pending, ledger_bridge_pending,
    ledger_bridge_append_failures_total, ledger_bridge_append_seconds (histogram, per batch),
    ledger_bridge_last_write_timestamp_seconds, ledger_bridge_nats_ok
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any, Final, Protocol

from prometheus_client import REGISTRY, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from room_ledger import tracing
from room_ledger.metrics import LATENCY_BUCKETS


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
    buckets=LATENCY_BUCKETS,
)


class _BridgeCollector(Collector):
    def __init__(self) -> None:
        self.writers: weakref.WeakSet[Any] = weakref.WeakSet()
        self.observed: dict[str, int] = {}
        self.written: dict[str, int] = {}
        self.duplicates: dict[str, int] = {}

    def collect(self) -> Iterable[Metric]:
        writers: list[_Writer] = list(self.writers)
        # The writers of one process's rooms share its counters: count those once.
        shared = list({id(w.counters): w.counters for w in writers}.values())
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
        for counters in shared:
            for reason, n in counters.reasons.items():
                by_reason[reason] = by_reason.get(reason, 0) + n
        for reason, n in sorted(by_reason.items()):
            reasons.add_metric([reason], n)
        yield reasons

        def total(attr: str) -> float:
            return float(sum(getattr(c, attr) for c in shared))

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
        last = max((c.last_write_at for c in shared), default=0.0)
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
