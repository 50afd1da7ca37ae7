"""Settings: from the environment, overridden by flags, bad values named."""

from __future__ import annotations

from pathlib import Path

import pytest

from room_ledger.errors import SettingsError
from room_ledger.settings import Settings


def test_defaults_use_the_embedded_servers() -> None:
    settings = Settings.from_env({})
    assert settings.embedded_nats and settings.embedded_postgres
    assert settings.stream == "ROOMS" and settings.subject_prefix == "ledger"
    assert settings.home == Path(".ledger")
    assert settings.replicas == 1 and settings.max_age_s is None
    assert settings.bridge_agent_name == "ledger-bridge"


def test_environment_is_read() -> None:
    settings = Settings.from_env(
        {
            "LEDGER_NATS_URL": "nats://a:4222, nats://b:4222",
            "LEDGER_DATABASE_URL": "postgresql://u:secret@db/ledger",
            "LEDGER_REPLICAS": "3",
            "LEDGER_MAX_AGE": "30d",
            "LEDGER_STREAM": "ROOMS_2",
            "LEDGER_SUBJECT_PREFIX": "acme.ledger",
        }
    )
    assert settings.nats_urls == ("nats://a:4222", "nats://b:4222")
    assert settings.replicas == 3
    assert settings.max_age_s == 30 * 86400
    assert settings.describe()["database_url"] == "postgresql://u:***@db/ledger"


def test_flags_override_the_environment() -> None:
    settings = Settings.from_env({"LEDGER_STREAM": "A"}, stream="B")
    assert settings.stream == "B"
    assert settings.replace(stream=None).stream == "B"
    assert settings.replace(replicas=3).replicas == 3


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("LEDGER_NATS_URL", "http://x", "LEDGER_NATS_URL.*nats://host:port"),
        ("LEDGER_DATABASE_URL", "mysql://x", "LEDGER_DATABASE_URL.*postgresql://"),
        ("LEDGER_REPLICAS", "three", "LEDGER_REPLICAS.*whole number between 1 and 5"),
        ("LEDGER_REPLICAS", "7", "LEDGER_REPLICAS"),
        ("LEDGER_MAX_AGE", "forever", "LEDGER_MAX_AGE.*duration"),
        ("LEDGER_DUPLICATE_WINDOW", "30s", "LEDGER_DUPLICATE_WINDOW.*under 2m"),
        ("LEDGER_STREAM", "a.b", "LEDGER_STREAM"),
        ("LEDGER_SUBJECT_PREFIX", "a.*", "LEDGER_SUBJECT_PREFIX"),
        ("LEDGER_NATS_SYNC_ALWAYS", "maybe", "LEDGER_NATS_SYNC_ALWAYS.*true or false"),
        ("LEDGER_NATS_CREDS", "/nonexistent/creds", "LEDGER_NATS_CREDS.*no such file"),
        ("LIVEKIT_URL", "livekit.example.com", "LIVEKIT_URL"),
    ],
)
def test_bad_values_name_the_variable_and_form(variable: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError, match=expected):
        Settings.from_env({variable: value})


def test_settings_are_frozen() -> None:
    settings = Settings.from_env({})
    with pytest.raises(AttributeError):
        settings.stream = "X"  # type: ignore[misc]


def test_payload_limits_from_the_environment() -> None:
    from room_ledger.settings import DEFAULT_INLINE_LIMIT, DEFAULT_MAX_PAYLOAD

    default = Settings.from_env({})
    assert default.inline_limit == DEFAULT_INLINE_LIMIT == 64 * 1024
    assert default.max_payload == DEFAULT_MAX_PAYLOAD == 64 * 1024 * 1024
    assert default.payload_bucket == "ROOMS-payloads"
    chosen = Settings.from_env({"LEDGER_INLINE_LIMIT": "16KiB", "LEDGER_MAX_PAYLOAD": "1GiB", "LEDGER_STREAM": "X"})
    assert (chosen.inline_limit, chosen.max_payload, chosen.payload_bucket) == (16 * 1024, 1024**3, "X-payloads")
    with pytest.raises(SettingsError, match="LEDGER_INLINE_LIMIT"):
        Settings.from_env({"LEDGER_INLINE_LIMIT": "512KiB"})  # over a quarter of the 1 MiB message
    with pytest.raises(SettingsError, match="LEDGER_MAX_PAYLOAD"):
        Settings.from_env({"LEDGER_MAX_PAYLOAD": "lots"})
