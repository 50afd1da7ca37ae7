"""Every use of the LiveKit Python SDK (``livekit.rtc``) beyond its public API, in one module.

The bridge needs two things the SDK does not offer:

- **every stream topic** (``catch_all_streams``): the SDK hands a text or byte stream to the
  handler registered for its topic (``Room._text_stream_handlers.get(topic)``) and drops the
  others; the bridge records "anything else as data", so it swaps those private tables for ones
  whose ``get`` answers every topic, and puts plain tables back when it detaches.
- **only its own room's events** (``only_own_room_events``): livekit 1.x gives every FFI event
  to every connected ``rtc.Room`` of the process (``FfiClient.instance.queue._subscribers``,
  each room's ``_ffi_queue`` filtered by its ``_ffi_handle``); the worker narrows its rooms'
  subscriptions to their own room events.

tests/test_sdk.py checks each private field this module relies on, so an SDK upgrade that moves
one fails there (and here the code falls back to the public behaviour rather than break).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from livekit import rtc

log = logging.getLogger("bridge.sdk")


class CatchAll(dict[str, Any]):
    """A stream-handler table that answers every topic (one handler per topic per room)."""

    def __init__(self, fallback: Any) -> None:
        super().__init__()
        self.fallback = fallback

    def get(self, key: str, default: Any = None) -> Any:
        found = super().get(key)
        return found if found is not None else self.fallback


def has_stream_tables(room: rtc.Room) -> bool:
    """Whether this SDK keeps its stream handlers in the private tables :func:`catch_all_streams` swaps."""
    return isinstance(getattr(room, "_text_stream_handlers", None), dict) and isinstance(
        getattr(room, "_byte_stream_handlers", None), dict)


def catch_all_streams(room: rtc.Room, on_text: Any, on_byte: Any) -> Callable[[], None]:
    """Hand every text and byte stream of ``room`` without a handler of its own to ``on_text`` /
    ``on_byte``. Returns the undo: plain tables again, with every handler registered meanwhile."""
    text_table = CatchAll(on_text)
    text_table.update(room._text_stream_handlers)
    room._text_stream_handlers = text_table
    byte_table = CatchAll(on_byte)
    byte_table.update(room._byte_stream_handlers)
    room._byte_stream_handlers = byte_table

    def restore() -> None:
        if room._text_stream_handlers is text_table:
            room._text_stream_handlers = dict(text_table)
        if room._byte_stream_handlers is byte_table:
            room._byte_stream_handlers = dict(byte_table)

    return restore


def only_own_room_events(room: rtc.Room) -> None:
    """Stop handing other rooms' events to this connected room's event loop.

    livekit 1.1 gives every FFI event to every connected ``rtc.Room`` of the process, and each
    room's listener wakes for it and passes it through its own queue, whichever room it belongs
    to. The worker runs each room in a thread with its own loop: one data packet woke every
    room's thread, N² work behind the GIL (p99 of seconds at 50 rooms x 5 packets/s, see
    bench/capture.py). Other rooms' room events are now dropped in the FFI callback, before any
    loop wakes; every other event (callbacks, streams, RPC) is delivered as before.
    """
    try:
        # Inside the try: an SDK without this module keeps its public behaviour (every event).
        from livekit.rtc._ffi_client import FfiClient  # noqa: PLC0415 - inside the try: an SDK without this private module keeps its public behaviour

        queue = FfiClient.instance.queue
        if room._ffi_handle is None:
            return
        own, handle = room._ffi_queue, room._ffi_handle.handle
        with queue._lock:
            for i, (subscriber, loop, keep) in enumerate(queue._subscribers):
                if subscriber is own:
                    def only_own(event: Any, keep: Any = keep) -> bool:
                        if event.WhichOneof("message") == "room_event" and event.room_event.room_handle != handle:
                            return False
                        return keep is None or bool(keep(event))

                    queue._subscribers[i] = (subscriber, loop, only_own)
    except (AttributeError, ImportError, TypeError, ValueError):  # another SDK: every event, as before
        log.debug("bridge: cannot narrow the room's FFI events on this livekit version")
