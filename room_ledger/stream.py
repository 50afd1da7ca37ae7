"""The ledger's stream and the server it lives on: the configuration the settings ask for,
bringing the stream to it, and what ``ledger doctor`` asks the server (its info, varz, the
account's JetStream usage), so no caller talks to nats-py for it."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import api as js_api

from room_ledger import _wire
from room_ledger.connection import Connection
from room_ledger.errors import LogUnavailable, StreamConfigError
from room_ledger.subjects import Subjects

log = logging.getLogger("ledger.client")

#: The settings of an existing stream compared with the configured ones.
_COMPARED = ("subjects", "num_replicas", "max_age", "max_msg_size", "duplicate_window", "allow_direct", "allow_atomic")


@dataclass(slots=True)
class StreamLimits:
    """What the stream accepts, as learnt when it was ensured (the log frames its appends by it)."""

    atomic: bool
    max_msg_size: int


class StreamAdmin:
    """Desired configuration, ensure, differences and info of the stream; the server's probes."""

    def __init__(self, connection: Connection, subjects: Subjects) -> None:
        self._connection = connection
        self._subjects = subjects
        self.settings = connection.settings
        self.limits = StreamLimits(atomic=False, max_msg_size=self.settings.max_msg_size)

    def desired_config(self) -> js_api.StreamConfig:
        s = self.settings
        return js_api.StreamConfig(
            name=s.stream,
            description="room-ledger: every event of every LiveKit room",
            subjects=self._subjects.stream_subjects(),
            retention=js_api.RetentionPolicy.LIMITS,
            storage=js_api.StorageType.FILE,
            num_replicas=s.replicas,
            max_age=s.max_age_s or 0,
            max_msg_size=s.max_msg_size,
            duplicate_window=s.duplicate_window_s,
            discard=js_api.DiscardPolicy.OLD,
            allow_direct=True,
            allow_atomic=True,
            deny_delete=False,
            deny_purge=False,
        )

    async def ensure(self) -> js_api.StreamInfo:
        """Create the stream, or bring an existing one to the configured settings."""
        desired = self.desired_config()
        jsm = self._connection.js
        try:
            info = await jsm.stream_info(desired.name or "")
        except nats.js.errors.NotFoundError:
            info = None
        try:
            if info is None:
                info = await jsm.add_stream(desired)
            else:
                current = info.config
                changes = self.differences(current)
                if "subjects" in changes:
                    # Re-pointing an existing stream at other subjects would cut off every writer
                    # still using the old ones: a different prefix is a mistake, not an update.
                    now, wanted = changes["subjects"]
                    raise StreamConfigError(
                        f"stream {desired.name!r} holds subjects {now}, but the configured prefix gives {wanted}: "
                        f"set LEDGER_SUBJECT_PREFIX to match the stream, or LEDGER_STREAM to a stream of its own"
                    )
                if changes:
                    if "num_replicas" in changes and (current.num_replicas or 1) != desired.num_replicas:
                        log.info(
                            "changing stream replicas from %s to %s",
                            current.num_replicas,
                            desired.num_replicas,
                        )
                    info = await jsm.update_stream(desired)
        except nats.js.errors.APIError as exc:
            raise StreamConfigError(
                f"cannot create or update stream {desired.name!r} with subjects {desired.subjects}: "
                f"{exc.description} (err_code {exc.err_code}); if another stream already holds these "
                "subjects, set LEDGER_STREAM / LEDGER_SUBJECT_PREFIX to ones of your own"
            ) from exc
        self.limits.atomic = bool(info.config.allow_atomic)
        max_msg_size = int(info.config.max_msg_size or self.settings.max_msg_size)
        self.limits.max_msg_size = max_msg_size if max_msg_size > 0 else self.settings.max_msg_size
        return info

    def differences(self, current: js_api.StreamConfig) -> dict[str, tuple[Any, Any]]:
        """Settings of an existing stream that differ from the configured ones: name -> (now, wanted)."""
        desired = self.desired_config()
        differences: dict[str, tuple[Any, Any]] = {}
        for field in _COMPARED:
            now = getattr(current, field)
            wanted = getattr(desired, field)
            if field == "max_age":
                now, wanted = now or 0, wanted or 0
            if field in ("max_age", "duplicate_window"):
                if abs(float(now or 0) - float(wanted or 0)) > 0.001:
                    differences[field] = (now, wanted)
            elif field == "num_replicas":
                if (now or 1) != (wanted or 1):
                    differences[field] = (now, wanted)
            elif bool(now) != bool(wanted) if isinstance(wanted, bool) else now != wanted:
                differences[field] = (now, wanted)
        return differences

    async def info(self) -> js_api.StreamInfo:
        """The stream's configuration and state (nats-py's NotFoundError when it does not exist)."""
        return await self._connection.js.stream_info(self.settings.stream)

    async def find(self) -> js_api.StreamInfo | None:
        """The stream's configuration and state; None when it does not exist yet."""
        try:
            return await self.info()
        except nats.js.errors.NotFoundError:
            return None

    async def delete(self) -> None:
        """Delete the stream and every event in it (tests and benchmarks clean up with it)."""
        await self._connection.js.delete_stream(self.settings.stream)

    # --- the server, for `ledger doctor` -----------------------------------------------------

    def server_info(self) -> dict[str, Any]:
        """The INFO the connected server sent (version, name, cluster, jetstream)."""
        return _wire.server_info(self._connection.nc)

    async def flush(self, timeout: int = 5) -> None:
        """One round trip to the server."""
        await self._connection.nc.flush(timeout=timeout)

    async def system_varz(self, timeout: float = 0.5) -> dict[str, Any] | None:
        """The server's varz through the system account; None when this account may not ask."""
        try:
            msg = await self._connection.nc.request("$SYS.REQ.SERVER.PING.VARZ", b"{}", timeout=timeout)
            reply = json.loads(msg.data)
        except (nats.errors.Error, TimeoutError, ValueError):
            return None
        data = reply.get("data") if isinstance(reply, dict) else None
        return data if isinstance(data, dict) else None

    async def last_stored_seq(self) -> int | None:
        """The sequence of the last event still stored (a purge of the newest room leaves the
        stream's last_seq behind it); None when there is none or the server does not say."""
        try:
            msg = await self._connection.js.get_last_msg(self.settings.stream, self._subjects.all_rooms(), direct=True)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
            return None
        return msg.seq

    async def account(self) -> js_api.AccountInfo:
        """The account's JetStream usage. Raises :class:`LogUnavailable` when JetStream does not answer."""
        try:
            return await self._connection.js.account_info()
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise LogUnavailable(str(exc) or type(exc).__name__) from exc
