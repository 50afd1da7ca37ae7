"""Prometheus metrics of the projector, exposed by the core's endpoint (room_ledger/metrics.py).

    ledger_projector_events_folded_total{partition}, ledger_projector_batch_seconds{partition},
    ledger_projector_errors_total{partition}, ledger_projector_checkpoint{partition},
    ledger_projector_lag_events{partition}, ledger_stream_head
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Iterable
from typing import Any, Final

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from room_ledger import metrics, tracing

#: Seconds between two reads of the stream's head for the projectors' lag (only while serving).
HEAD_EVERY_S: Final = 2.0

FOLDED: Final = Counter("ledger_projector_events_folded", "Events folded into the projection.", ["partition"])
BATCH_SECONDS: Final = Histogram(
    "ledger_projector_batch_seconds", "Time to fold one batch (and finish writing the one before).",
    ["partition"], buckets=metrics.LATENCY_BUCKETS,
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
    if metrics.serving() and projector not in _head_tasks:
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
