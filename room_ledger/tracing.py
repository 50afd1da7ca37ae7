"""OpenTelemetry traces of the bridge, the projector and hydration; off unless an OTLP endpoint is set.

Configured the standard way, by the ``OTEL_`` variables: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) turns it on, ``OTEL_EXPORTER_OTLP_PROTOCOL`` picks
``http/protobuf`` (the default) or ``grpc``, ``OTEL_SERVICE_NAME`` names the process,
``OTEL_EXPORTER_OTLP_HEADERS`` and the rest are read by the exporter itself, and
``OTEL_SDK_DISABLED=true`` turns it off again. Unset, nothing is imported and every call here
returns at once.

Spans are recorded where the metrics are (room_ledger/metrics.py, and bridge/ and projections/
each have a metrics.py), from the same measurement: one span per bridge append batch
(``ledger.bridge.append``), per projector batch (``ledger.projector.batch``) and per hydration (``ledger.hydrate``). A process that already has a
tracer provider (a LiveKit Agents worker set up for observability) keeps it; spans go there.

:func:`span` wraps a block and hands its W3C ``traceparent`` on, for work that crosses processes
(a handoff: the source puts it into the handoff event, the target continues the trace with it).
"""

# OpenTelemetry is imported only once traces are asked for ("Unset, nothing is imported"), and
# each exporter only when its protocol is chosen: every import here is inside the function using it.
# ruff: noqa: PLC0415

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any, Final

log = logging.getLogger("ledger.tracing")

ENDPOINT_ENVS: Final = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

_tracer: Any = None
_checked = False


def configured(environ: Mapping[str, str] | None = None) -> bool:
    """True when the environment asks for traces (an OTLP endpoint, and the SDK not disabled)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(env.get(name, "").strip() for name in ENDPOINT_ENVS)


def tracer() -> Any:
    """The tracer, set up on first use; None when traces are off."""
    global _tracer, _checked
    if _checked:
        return _tracer
    _checked = True
    if not configured():
        return None
    try:
        _tracer = _setup()
    except Exception as exc:  # tracing must never stop the ledger
        log.warning("OpenTelemetry traces are off: %s", exc)
        _tracer = None
    return _tracer


def _setup() -> Any:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current.get_tracer("room-ledger")
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
    exporter: Any
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        exporter = GrpcExporter()
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        exporter = HttpExporter()
    else:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: expected http/protobuf or grpc")
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by Resource.create.
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "room-ledger"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("OpenTelemetry traces to %s (%s)", next(os.environ[n] for n in ENDPOINT_ENVS if os.environ.get(n)),
             protocol)
    return trace.get_tracer("room-ledger")


def record(name: str, seconds: float, attributes: Mapping[str, Any], *, traceparent: str | None = None) -> None:
    """A span that ends now and lasted ``seconds`` (measured by the caller); nothing when traces are off.

    Its parent is the current span, or the one ``traceparent`` names.
    """
    active = _tracer if _checked else tracer()
    if active is None:
        return
    context = None
    if traceparent:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        context = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    end = time.time_ns()
    span = active.start_span(name, context=context, start_time=end - int(seconds * 1e9),
                             attributes={k: v for k, v in attributes.items() if v is not None})
    span.end(end_time=end)


@contextlib.contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None, *,
         traceparent: str | None = None) -> Iterator[dict[str, str]]:
    """A span around a block (the current one inside it), child of ``traceparent`` when given.

    Yields the W3C trace context to hand on (``{"traceparent": …}``; empty when traces are off):
    a handoff puts it into its event so the target's ``span(…, traceparent=…)`` continues the same
    trace — A's handoff, the dispatch, B's hydration (recorded inside it) and B's first reply.
    """
    active = tracer()
    if active is None:
        yield {}
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagator = TraceContextTextMapPropagator()
    parent = propagator.extract({"traceparent": traceparent}) if traceparent else None
    with active.start_as_current_span(name, context=parent,
                                      attributes={k: v for k, v in (attributes or {}).items() if v is not None}):
        carrier: dict[str, str] = {}
        propagator.inject(carrier)
        yield carrier


def flush(timeout_s: float = 5.0) -> None:
    """Send what is buffered (before a short-lived process ends)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    force = getattr(provider, "force_flush", None)
    if force is not None:
        force(int(timeout_s * 1000))
