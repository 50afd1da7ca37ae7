"""One frozen settings object, built from the environment; command flags override it.

Every variable is read in one place (:meth:`Settings.from_env`), and a bad value fails at
start with an error naming the variable and the form it expects.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Final

from room_ledger.errors import SettingsError

_DURATION_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE_RE: Final = re.compile(r"^\s*(\d+)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS: Final = {
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
}
_TOKEN_RE: Final = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_STREAM_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

#: The smallest duplicate window that still covers a bridge retrying after a NATS blip.
MIN_DUPLICATE_WINDOW_S: Final = 120.0
#: Payloads larger than this go to the Object Store bucket beside the stream, not inline.
DEFAULT_INLINE_LIMIT: Final = 64 * 1024
#: The hard limit: a payload larger than this is still stored byte-exact, but as ``data`` with the
#: reason, never parsed or applied; the agent helpers refuse to send one.
DEFAULT_MAX_PAYLOAD: Final = 64 * 1024 * 1024
#: Events one direct-get request returns (``Ledger.read_recent``); hydration reads a tail this short
#: that way, without a consumer.
DIRECT_BATCH: Final = 1_000


def parse_duration(value: str, variable: str) -> float:
    """``90``, ``90s``, ``5m``, ``12h``, ``30d`` -> seconds."""
    match = _DURATION_RE.match(value)
    if not match:
        raise SettingsError(f"{variable}={value!r} is not a duration: expected e.g. 90s, 5m, 12h or 30d")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def format_duration(seconds: float) -> str:
    """``0.42`` -> ``420ms``, ``75`` -> ``1m15s``."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def parse_size(value: str, variable: str) -> int:
    match = _SIZE_RE.match(value)
    if not match:
        raise SettingsError(f"{variable}={value!r} is not a size: expected bytes, or e.g. 512KiB, 1MiB")
    return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()]


def parse_bool(value: str, variable: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{variable}={value!r} is not a boolean: expected true or false")


def parse_int(value: str, variable: str, *, minimum: int, maximum: int | None = None) -> int:
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum or (maximum is not None and number > maximum):
        upper = f" and {maximum}" if maximum is not None else ""
        raise SettingsError(f"{variable}={value!r}: expected a whole number between {minimum}{upper}")
    return number


def _nats_urls(value: str, variable: str) -> tuple[str, ...]:
    urls = tuple(part.strip() for part in value.split(",") if part.strip())
    for url in urls:
        if not re.match(r"^(nats|tls|ws|wss)://[^/\s]+/?$", url):
            raise SettingsError(
                f"{variable}: {url!r} is not a NATS URL: expected nats://host:port "
                "(comma-separated for a cluster), or unset it to use the embedded server"
            )
    if not urls:
        raise SettingsError(f"{variable} is empty: set nats://host:port, or unset it to use the embedded server")
    return urls


def _database_url(value: str, variable: str) -> str:
    if not re.match(r"^postgres(ql)?(\+asyncpg)?://", value):
        raise SettingsError(
            f"{variable}={value!r} is not a PostgreSQL URL: expected postgresql://user:pass@host:port/db, "
            "or unset it to use the embedded PostgreSQL"
        )
    return value


def _existing_file(value: str, variable: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise SettingsError(f"{variable}={value!r}: no such file")
    return path


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable. Build with :meth:`from_env`; override with :meth:`replace`."""

    nats_urls: tuple[str, ...] | None = None
    nats_creds: Path | None = None
    nats_nkey_seed: Path | None = None
    nats_user: str | None = None
    nats_password: str | None = None
    nats_tls_ca: Path | None = None
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None
    #: fsync on every write on the embedded server (the ledger promises to lose nothing).
    nats_sync_always: bool = True
    database_url: str | None = None
    home: Path = Path(".ledger")
    stream: str = "ROOMS"
    subject_prefix: str = "ledger"
    replicas: int = 1
    max_age_s: float | None = None
    max_msg_size: int = 1024 * 1024
    inline_limit: int = DEFAULT_INLINE_LIMIT
    max_payload: int = DEFAULT_MAX_PAYLOAD
    duplicate_window_s: float = MIN_DUPLICATE_WINDOW_S
    livekit_url: str | None = None
    livekit_api_key: str | None = None
    livekit_api_secret: str | None = None
    bridge_agent_name: str = "ledger-bridge"

    @property
    def payload_bucket(self) -> str:
        """The Object Store bucket of payloads above the inline limit (beside the stream)."""
        return f"{self.stream}-payloads"

    @property
    def embedded_nats(self) -> bool:
        return self.nats_urls is None

    @property
    def embedded_postgres(self) -> bool:
        return self.database_url is None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name)
            return value if value not in (None, "") else None

        values: dict[str, Any] = {}
        if (raw := get("LEDGER_NATS_URL")) is not None:
            values["nats_urls"] = _nats_urls(raw, "LEDGER_NATS_URL")
        for var, field_name in (
            ("LEDGER_NATS_CREDS", "nats_creds"),
            ("LEDGER_NATS_NKEY_SEED", "nats_nkey_seed"),
            ("LEDGER_NATS_TLS_CA", "nats_tls_ca"),
            ("LEDGER_NATS_TLS_CERT", "nats_tls_cert"),
            ("LEDGER_NATS_TLS_KEY", "nats_tls_key"),
        ):
            if (raw := get(var)) is not None:
                values[field_name] = _existing_file(raw, var)
        if (raw := get("LEDGER_NATS_USER")) is not None:
            values["nats_user"] = raw
        if (raw := get("LEDGER_NATS_PASSWORD")) is not None:
            values["nats_password"] = raw
        if (raw := get("LEDGER_NATS_SYNC_ALWAYS")) is not None:
            values["nats_sync_always"] = parse_bool(raw, "LEDGER_NATS_SYNC_ALWAYS")
        if (raw := get("LEDGER_DATABASE_URL")) is not None:
            values["database_url"] = _database_url(raw, "LEDGER_DATABASE_URL")
        if (raw := get("LEDGER_HOME")) is not None:
            values["home"] = Path(raw).expanduser()
        if (raw := get("LEDGER_STREAM")) is not None:
            if not _STREAM_NAME_RE.match(raw):
                raise SettingsError(
                    f"LEDGER_STREAM={raw!r} is not a stream name: expected up to 64 of A-Z a-z 0-9 _ -"
                )
            values["stream"] = raw
        if (raw := get("LEDGER_SUBJECT_PREFIX")) is not None:
            if not _TOKEN_RE.match(raw):
                raise SettingsError(
                    f"LEDGER_SUBJECT_PREFIX={raw!r} is not a subject prefix: expected tokens of "
                    "A-Z a-z 0-9 _ - separated by dots, e.g. ledger or acme.ledger"
                )
            values["subject_prefix"] = raw
        if (raw := get("LEDGER_REPLICAS")) is not None:
            values["replicas"] = parse_int(raw, "LEDGER_REPLICAS", minimum=1, maximum=5)
        if (raw := get("LEDGER_MAX_AGE")) is not None:
            age = parse_duration(raw, "LEDGER_MAX_AGE")
            values["max_age_s"] = age if age > 0 else None
        if (raw := get("LEDGER_MAX_MSG_SIZE")) is not None:
            values["max_msg_size"] = parse_size(raw, "LEDGER_MAX_MSG_SIZE")
        if (raw := get("LEDGER_INLINE_LIMIT")) is not None:
            values["inline_limit"] = parse_size(raw, "LEDGER_INLINE_LIMIT")
        if (raw := get("LEDGER_MAX_PAYLOAD")) is not None:
            values["max_payload"] = parse_size(raw, "LEDGER_MAX_PAYLOAD")
            if values["max_payload"] < 1024:
                raise SettingsError(f"LEDGER_MAX_PAYLOAD={raw!r} is under 1KiB: expected e.g. 64MiB")
        if (raw := get("LEDGER_DUPLICATE_WINDOW")) is not None:
            window = parse_duration(raw, "LEDGER_DUPLICATE_WINDOW")
            if window < MIN_DUPLICATE_WINDOW_S:
                raise SettingsError(
                    f"LEDGER_DUPLICATE_WINDOW={raw!r} is under 2m: a shorter window lets a retried "
                    "event be stored twice; expected e.g. 2m or 10m"
                )
            values["duplicate_window_s"] = window
        for var, field_name in (
            ("LIVEKIT_URL", "livekit_url"),
            ("LIVEKIT_API_KEY", "livekit_api_key"),
            ("LIVEKIT_API_SECRET", "livekit_api_secret"),
            ("LEDGER_BRIDGE_AGENT_NAME", "bridge_agent_name"),
        ):
            if (raw := get(var)) is not None:
                values[field_name] = raw
        if "livekit_url" in values and not re.match(r"^(wss?|https?)://", values["livekit_url"]):
            raise SettingsError(f"LIVEKIT_URL={values['livekit_url']!r}: expected ws(s)://host or http(s)://host")
        values.update({k: v for k, v in overrides.items() if v is not None})
        inline = values.get("inline_limit", DEFAULT_INLINE_LIMIT)
        if inline > values.get("max_msg_size", 1024 * 1024) // 4:
            raise SettingsError(
                f"LEDGER_INLINE_LIMIT={inline} bytes is over a quarter of LEDGER_MAX_MSG_SIZE: an inline payload "
                "is kept twice at worst (typed body and the JSON as sent) and escaped; expected e.g. 64KiB"
            )
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed; ``None`` values are ignored (an unset flag)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def describe(self) -> dict[str, Any]:
        """The settings as shown by ``ledger doctor``: secrets masked."""
        shown: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("nats_password", "livekit_api_secret") and value:
                value = "***"
            elif f.name == "database_url" and value:
                value = re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", value)
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            shown[f.name] = value
        return shown
